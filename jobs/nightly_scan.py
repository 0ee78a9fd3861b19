"""Ray job entrypoint of the nightly scan; the same code path as ``ezmia scan``.

    ray job submit --working-dir . -- python jobs/nightly_scan.py \\
        --registry s3://models/finetunes/ --out s3://audits/ --policy jobs/policy.example.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from ezmia.cli import command
except ImportError:  # run from a checkout without ezmia installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ezmia.cli import command

if __name__ == "__main__":
    sys.exit(command(["scan", *sys.argv[1:]]))
