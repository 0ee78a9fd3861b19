"""The interface every scoring backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ezmia.scores import TokenStats


class ScoringBackend(Protocol):
    """Runs the target and reference passes and returns per-position statistics.

    ``name`` is recorded in the summary; ``provides_distribution`` is True when ``mu`` and
    ``sigma`` (Min-K%++) are filled; ``vocab_size`` bounds the token ids it accepts (None:
    unknown).
    """

    name: str
    provides_distribution: bool
    vocab_size: int | None

    def token_stats(self, sequences: Sequence[Sequence[int]]) -> list[TokenStats]:
        """Statistics for each token-id sequence, in input order; fewer than 2 tokens gives
        ``TokenStats.empty()``."""
        ...

    def close(self) -> None:
        """Release models and engines."""
        ...
