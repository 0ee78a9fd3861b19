"""The local engine: scores an audit's fragments in this process (laptops, tests, one GPU)."""

from __future__ import annotations

import pyarrow as pa
from tqdm.auto import tqdm

from ezmia import outputs
from ezmia.audit import AuditPlan, open_backend
from ezmia.io import Fragment, normalize, read_fragment
from ezmia.scoring import score_rows
from ezmia.text import load_tokenizer

ROWS_PER_CHUNK = 512


class LocalEngine:
    """One backend in this process; writes one scores part per fragment."""

    def __init__(self, plan: AuditPlan) -> None:
        self.plan = plan
        self.tokenizer = load_tokenizer(plan.models.tokenizer)
        self.backend, self.backend_choice = open_backend(plan)

    def score(
        self, fragments: list[Fragment], out: str | None, threshold: float | None
    ) -> pa.Table:
        config = self.plan.config
        parts: list[pa.Table] = []
        total = sum(f.num_rows for f in fragments)
        with tqdm(total=total, desc="scoring", unit="seq", disable=None) as bar:
            for index, fragment in enumerate(fragments):
                rows = normalize(
                    read_fragment(fragment, self.plan.columns), self.plan.columns, fragment.uri
                )
                chunks = []
                for start in range(0, rows.num_rows, ROWS_PER_CHUNK):
                    chunk = rows.slice(start, ROWS_PER_CHUNK)
                    chunks.append(
                        score_rows(
                            chunk,
                            self.backend,
                            self.tokenizer,
                            config.max_length,
                            config.include_text,
                            threshold,
                        )
                    )
                    bar.update(chunk.num_rows)
                table = pa.concat_tables(chunks)
                if out is not None:
                    outputs.write_scores(out, table, self.plan.encryption, part=index)
                parts.append(
                    table.drop_columns(["text"]) if "text" in table.column_names else table
                )
        return pa.concat_tables(parts)

    def close(self) -> None:
        self.backend.close()
