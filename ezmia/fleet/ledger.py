"""The scan ledger: ``OUT/ledger/date=YYYY-MM-DD/scan-<scan_id>-<n>.parquet``.

Each scan appends small part files (one per finished audit, one for the rest at the end)
and never rewrites a file, so concurrent scans and analysts can read it at any time.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads

from ezmia.data import storage
from ezmia.data.schema import LEDGER_SCHEMA


class Ledger:
    """One scan's view of the ledger: what earlier scans audited, and its own new parts."""

    def __init__(self, out: str, scan_id: str, date: str, encryption: storage.Encryption):
        self.root = storage.join(out, "ledger")
        self.scan_id, self.date, self.encryption = scan_id, date, encryption
        self.parts = 0
        self.seen: set[str] = set()
        # the successful audit of each (checkpoint URI, fingerprint), by any scan
        self.audited: dict[tuple[str, str], dict] = {}

    def refresh(self) -> None:
        """Read the part files written since the last refresh (by any scan)."""
        files = [
            f
            for f in storage.list_files(self.root)
            if f.endswith(".parquet") and not f.rsplit("/", 1)[-1].startswith((".", "_"))
        ]
        new = [f for f in files if f not in self.seen]
        if not new:
            return
        fs, _ = storage.arrow_filesystem(self.root)
        paths = [f.removeprefix("s3://") for f in new]  # pyarrow's S3 paths: bucket/key
        dataset = pads.dataset(paths, schema=LEDGER_SCHEMA, format="parquet", filesystem=fs)
        for row in dataset.to_table().to_pylist():  # the parts read in parallel by pyarrow
            if row["status"] == "audited":
                self.audited[(row["checkpoint_uri"], row["fingerprint"])] = row
        self.seen.update(new)

    def append(self, rows: list[dict]) -> str | None:
        """Write ``rows`` as this scan's next part file; returns its URI."""
        if not rows:
            return None
        name = f"scan-{self.scan_id}-{self.parts:04d}.parquet"
        uri = storage.join(self.root, f"date={self.date}", name)
        table = pa.Table.from_pylist(rows, schema=LEDGER_SCHEMA)
        storage.write_parquet(uri, table, self.encryption)
        self.parts += 1
        self.seen.add(uri)
        return uri
