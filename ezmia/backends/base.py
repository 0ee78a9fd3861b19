"""The interface every scoring backend implements, and the per-position columns a model stage
emits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import numpy as np

from ezmia.stats.scores import TokenStats

Role = Literal["both", "target", "reference"]
"""Which passes a backend runs: a model stage runs the target's or the reference's; ``both``
runs the two on one copy of the weights where it can (an adapter on its base)."""

ROLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "target": ("lp_target", "target_top1", "mu", "sigma"),
    "reference": ("lp_reference",),
    "both": ("lp_target", "target_top1", "mu", "sigma", "lp_reference"),
}
"""The per-position columns each role emits (``mu``/``sigma`` only with the distribution)."""

PASS_DTYPES = {
    name: np.dtype(bool if name == "target_top1" else np.float64) for name in ROLE_COLUMNS["both"]
}
"""Each per-position column's element type: the top-1 hit is a flag, the others log-probs."""

PassColumns = dict[str, list[np.ndarray]]
"""Per-position arrays of each sequence, by column name (``ROLE_COLUMNS``)."""


def stats_from_columns(columns: Mapping[str, Sequence[np.ndarray | None]]) -> list[TokenStats]:
    """Every sequence's ``TokenStats`` from the two passes' columns (``mu``/``sigma`` may be
    missing: a backend without the distribution)."""
    mu, sigma = columns.get("mu"), columns.get("sigma")
    return [
        TokenStats(
            lp_target=np.asarray(lp_t, dtype=np.float64),
            lp_reference=np.asarray(lp_r, dtype=np.float64),
            target_top1=np.asarray(top1, dtype=bool),
            mu=None if mu is None or mu[i] is None else np.asarray(mu[i], dtype=np.float64),
            sigma=None
            if sigma is None or sigma[i] is None
            else np.asarray(sigma[i], dtype=np.float64),
        )
        for i, (lp_t, lp_r, top1) in enumerate(
            zip(columns["lp_target"], columns["lp_reference"], columns["target_top1"], strict=True)
        )
    ]


class ScoringBackend(Protocol):
    """Runs the target and/or reference pass (``role``) and returns per-position statistics.

    ``name`` is recorded in the summary; ``provides_distribution`` is True when ``mu`` and
    ``sigma`` (Min-K%++) are filled; ``vocab_size`` bounds the token ids it accepts (None:
    unknown). A backend that subclasses it inherits ``token_stats`` and ``empty_columns``.
    """

    name: str
    role: Role
    provides_distribution: bool
    vocab_size: int | None

    def pass_columns(self, sequences: Sequence[Sequence[int]]) -> PassColumns:
        """The ``role``'s per-position columns of each token-id sequence, in input order;
        fewer than 2 tokens gives empty arrays."""
        ...

    def token_stats(self, sequences: Sequence[Sequence[int]]) -> list[TokenStats]:
        """Statistics for each token-id sequence, in input order (role ``both`` only); fewer
        than 2 tokens gives ``TokenStats.empty()``."""
        return stats_from_columns(self.pass_columns(sequences))

    def empty_columns(self, count: int) -> PassColumns:
        """The ``role``'s columns, each with ``count`` empty arrays (no predicted position);
        ``mu``/``sigma`` only where the backend provides the distribution."""
        names = ROLE_COLUMNS[self.role]
        kept = [n for n in names if self.provides_distribution or n not in ("mu", "sigma")]
        return {n: [np.zeros(0, PASS_DTYPES[n])] * count for n in kept}

    def close(self) -> None:
        """Release the models (and accelerator memory)."""
        ...
