"""``make bench``: ezmia's scoring path against the reference code's, with the machine's matmul
peak measured in the same run. Options: ``--help``; what is measured: ``benchmarks/README.md``."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.harness import main

    main()
