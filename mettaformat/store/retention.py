"""Retention policies: which checkpoints ``PolicyStore.prune`` keeps.

Small frozen dataclasses in the style of orbax's preservation policies. Each answers one
question, "which of these records do I keep?", and policies compose by union: a checkpoint
survives when *any* policy keeps it (``LatestN(3) | BestN(5, "score")``). Framework-neutral
(no torch): they work on :class:`PolicyRecord` metadata alone.

Example:
    >>> policy = LatestN(3) | BestN(5, metric="score") | EveryNEpochs(100)
    >>> store.prune(policy, dry_run=True)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mettaformat.store.record import PolicyRecord
from mettaformat.store.selectors import MODES, Mode, latest_first, rank_by_metric

__all__ = ["AnyOf", "BestN", "EveryNEpochs", "LatestN", "RetentionPolicy"]


def _check_count(owner: str, n: object, *, minimum: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < minimum:
        raise ValueError(f"{owner}.n must be an integer >= {minimum}, got {n!r}")


class RetentionPolicy(ABC):
    """Base of every retention policy: ``keep(records)`` names the files to keep."""

    @abstractmethod
    def keep(self, records: Sequence[PolicyRecord]) -> frozenset[Path]:
        """The paths of the records this policy keeps (a subset of ``records``' paths)."""

    def leaves(self) -> tuple[RetentionPolicy, ...]:
        """The non-composite policies this one is made of (itself, for a leaf)."""
        return (self,)

    def __or__(self, other: RetentionPolicy) -> AnyOf:
        if not isinstance(other, RetentionPolicy):
            return NotImplemented
        return AnyOf(self, other)


@dataclass(frozen=True)
class LatestN(RetentionPolicy):
    """Keep the ``n`` newest checkpoints (by epoch, then agent_step, then mtime, then name).

    Args:
        n: how many to keep; 0 keeps none (useful inside a union built from options).

    Raises:
        ValueError: ``n`` is not an integer >= 0.
    """

    n: int

    def __post_init__(self) -> None:
        _check_count("LatestN", self.n, minimum=0)

    def keep(self, records: Sequence[PolicyRecord]) -> frozenset[Path]:
        return frozenset(r.path for r in latest_first(records)[: self.n])


@dataclass(frozen=True)
class BestN(RetentionPolicy):
    """Keep the ``n`` best checkpoints by a metadata metric.

    Ties are broken by recency (newer wins). The metric is looked up like the ``top``
    selector does (top level, then ``eval_scores``, ``*_score`` stems).

    Args:
        n: how many to keep; 0 keeps none.
        metric: the metadata key.
        mode: ``max`` keeps the highest values, ``min`` the lowest.
        keep_unscored: also keep checkpoints without a usable value (missing, NaN, not a
            number), as orbax's ``keep_checkpoints_without_metrics`` does: a checkpoint that
            has not been evaluated yet is not known to be bad.

    Raises:
        ValueError: ``n`` is not an integer >= 0, ``metric`` is empty, or ``mode`` is neither
            ``max`` nor ``min``.
    """

    n: int
    metric: str = "score"
    mode: Mode = "max"
    keep_unscored: bool = True

    def __post_init__(self) -> None:
        _check_count("BestN", self.n, minimum=0)
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"BestN.metric must be a non-empty string, got {self.metric!r}")
        if self.mode not in MODES:
            raise ValueError(f"BestN.mode must be 'max' or 'min', got {self.mode!r}")

    def keep(self, records: Sequence[PolicyRecord]) -> frozenset[Path]:
        ranked, unscored = rank_by_metric(records, self.metric, self.mode)
        kept = {r.path for r in ranked[: self.n]}
        if self.keep_unscored:
            kept.update(e.path for e in unscored)
        return frozenset(kept)


@dataclass(frozen=True)
class EveryNEpochs(RetentionPolicy):
    """Keep checkpoints whose epoch is a multiple of ``n`` (epoch 0 included).

    Args:
        n: the interval, >= 1.

    Raises:
        ValueError: ``n`` is not an integer >= 1.
    """

    n: int

    def __post_init__(self) -> None:
        _check_count("EveryNEpochs", self.n, minimum=1)

    def keep(self, records: Sequence[PolicyRecord]) -> frozenset[Path]:
        return frozenset(r.path for r in records if r.epoch % self.n == 0)


@dataclass(frozen=True, init=False)
class AnyOf(RetentionPolicy):
    """Keep what any of ``policies`` keeps (a union). ``a | b`` builds one too.

    Args:
        *policies: the policies; nested unions are flattened. None keeps nothing.

    Raises:
        TypeError: an argument is not a :class:`RetentionPolicy`.
    """

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, *policies: RetentionPolicy) -> None:
        flat: list[RetentionPolicy] = []
        for p in policies:
            if not isinstance(p, RetentionPolicy):
                raise TypeError(f"AnyOf takes retention policies, not {type(p).__name__}")
            flat.extend(p.policies if isinstance(p, AnyOf) else (p,))
        object.__setattr__(self, "policies", tuple(flat))

    def keep(self, records: Sequence[PolicyRecord]) -> frozenset[Path]:
        kept: set[Path] = set()
        for p in self.policies:
            kept |= p.keep(records)
        return frozenset(kept)

    def leaves(self) -> tuple[RetentionPolicy, ...]:
        return tuple(leaf for p in self.policies for leaf in p.leaves())

    def __repr__(self) -> str:
        return " | ".join(repr(p) for p in self.policies) if self.policies else "AnyOf()"
