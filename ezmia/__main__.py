"""``python -m ezmia`` runs the command line."""

import sys

from ezmia.cli import command

sys.exit(command())
