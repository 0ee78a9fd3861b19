"""Ray job entrypoint for an organization-wide audit.

    ray job submit --working-dir . -- python jobs/audit.py --config jobs/audit.example.yaml

Runs ``ezmia batch``: every audit in the YAML on the job's Ray cluster, side by side (up to
the YAML's ``max_in_flight``; by default as many as the cluster's GPUs, or CPUs, host with
every audit's actor pool at its ``max_actors``). Each audit's index row is written when it
finishes; the job fails (exit 1) when any audit failed, after the others have finished.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ezmia.cli import command  # noqa: E402

if __name__ == "__main__":
    sys.exit(command(["batch", *sys.argv[1:]]))
