"""The local engine: scores an audit's fragments in this process (laptops, tests, one GPU),
running the same stages as the Ray engine (``ezmia.engines.scoring``) one after another."""

from __future__ import annotations

import logging
import os

import pyarrow as pa
from tqdm.auto import tqdm

from ezmia.backends import check_device
from ezmia.config import AuditConfig
from ezmia.data import outputs
from ezmia.data.datasets import Fragment, normalize, read_fragment
from ezmia.data.text import load_tokenizer
from ezmia.engines.scoring import (
    ModelStage,
    add_flagged,
    calibrate,
    combined_choice,
    model_stages,
    score_rows,
    tokenize_rows,
)
from ezmia.plan.planner import AuditPlan, job_server_address

ROWS_PER_CHUNK = 512

log = logging.getLogger(__name__)


def check_local(config: AuditConfig) -> None:
    """Refuse a ``--device`` this machine lacks, and say why an http ``RAY_ADDRESS`` (a job
    server's, as ``infra/local/env.sh`` sets it) does not send ``--engine auto`` to Ray."""
    address = os.environ.get("RAY_ADDRESS", "")
    if config.engine == "auto" and job_server_address(address):
        log.warning(
            "RAY_ADDRESS=%s is a Ray job server (for `ray job submit`), not a cluster to join: "
            "scoring in this process. To score on the cluster, submit jobs/audit.py with `ray "
            "job submit`, or pass --engine ray --ray-address HOST:6379 (the GCS address)",
            address,
        )
    check_device(config.device)


class LocalEngine:
    """Every model stage in this process; writes one scores part per fragment."""

    def __init__(self, plan: AuditPlan) -> None:
        self.plan = plan
        self.tokenizer = load_tokenizer(plan.models.tokenizer)
        self.stages: list[ModelStage] = []
        try:
            for role in model_stages(plan.models.target_is_adapter):
                self.stages.append(ModelStage(plan.config, role, plan.models))
        except BaseException:
            self.close()
            raise
        self.backend_choice = combined_choice({s.role: s.choice for s in self.stages})

    def score(self, output: outputs.Output) -> tuple[pa.Table, dict | None]:
        """The calibration rows first (detection), then the candidates, written to ``output``."""
        detection = None
        if self.plan.calibration:
            detection = calibrate(self._score_all(self.plan.calibration), self.plan.config.fpr)
        threshold = detection["threshold"] if detection else None
        return self._score_all(self.plan.fragments, output, threshold), detection

    def _score_all(
        self,
        fragments: list[Fragment],
        output: outputs.Output | None = None,
        threshold: float | None = None,
    ) -> pa.Table:
        parts: list[pa.Table] = []
        if output is not None:
            output.claim(*(outputs.part_name(i) for i in range(len(fragments))))
        with tqdm(total=sum(f.num_rows for f in fragments), desc="scoring", unit="seq") as bar:
            for index, fragment in enumerate(fragments):
                table = add_flagged(self._score_fragment(fragment, bar), threshold)
                if output is not None:
                    output.write_part(index, table)
                parts.append(table.select([c for c in table.column_names if c != "text"]))
        return pa.concat_tables(parts)

    def _score_fragment(self, fragment: Fragment, bar: tqdm) -> pa.Table:
        config = self.plan.config
        rows = normalize(
            read_fragment(fragment, self.plan.columns), self.plan.columns, fragment.uri
        )
        chunks = []
        for start in range(0, rows.num_rows, ROWS_PER_CHUNK):
            tokenized = tokenize_rows(
                rows.slice(start, ROWS_PER_CHUNK), self.tokenizer, config.max_length
            )
            for stage in self.stages:
                tokenized = stage(tokenized)
            chunks.append(score_rows(tokenized, config.include_text))
            bar.update(tokenized.num_rows)
        return pa.concat_tables(chunks)

    def close(self) -> None:
        for stage in self.stages:
            stage.close()
