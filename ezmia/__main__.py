"""``python -m ezmia`` runs the command line."""

import sys

from ezmia.cli import main

sys.exit(main())
