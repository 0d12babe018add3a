"""Choosing checkpoints from their metadata: ``top``, ``latest``, ``random``, ``all``.

Framework-neutral (no torch): everything here works on :class:`PolicyRecord` values, which hold
header metadata only. The result is a :class:`Selection` that says what was chosen *and* what
was left out and why, so a caller never has to guess why it got fewer policies than it asked for.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

from mettaformat.errors import StoreError
from mettaformat.store.record import PolicyRecord, latest_key

__all__ = [
    "EXCLUSION_REASONS",
    "FALLBACK_FRACTION",
    "MODES",
    "SELECTOR_NAMES",
    "Exclusion",
    "ExclusionReason",
    "Mode",
    "Selection",
    "SelectorName",
    "latest_first",
    "lookup_metric",
    "rank_by_metric",
    "select_records",
]

SelectorName = Literal["top", "latest", "random", "all"]
SELECTOR_NAMES: Final[tuple[SelectorName, ...]] = get_args(SelectorName)
Mode = Literal["max", "min"]
MODES: Final[tuple[Mode, ...]] = get_args(Mode)
ExclusionReason = Literal["missing_metric", "nan_metric", "non_numeric_metric", "unreadable"]
EXCLUSION_REASONS: Final[tuple[ExclusionReason, ...]] = get_args(ExclusionReason)

#: Metta's rule (#262): with ``fallback_to_latest``, ``top`` returns the latest policies when
#: fewer than this fraction of the candidates have the metric.
FALLBACK_FRACTION: Final = 0.8

_SCORE_SUFFIX: Final = "_score"
_MISSING: Final = object()


@dataclass(frozen=True, kw_only=True)
class Exclusion:
    """A checkpoint left out of a selection, and why.

    Attributes:
        path: the file.
        reason: ``missing_metric``, ``nan_metric``, ``non_numeric_metric`` or ``unreadable``.
        detail: a human-readable explanation (the error message for unreadable files).
        record: the record, when the file could be read.
    """

    path: Path
    reason: ExclusionReason
    detail: str
    record: PolicyRecord | None = None


@dataclass(frozen=True, kw_only=True)
class Selection:
    """The result of a selection.

    Attributes:
        records: the chosen records, best (``top``) or newest (``latest``, ``all``) first.
        selector: the selector used.
        requested: how many were asked for (None for ``all``).
        metric: the metric ranked by (``top`` only).
        mode: ``max`` or ``min`` (``top`` only).
        candidates: how many readable checkpoints were considered.
        excluded: checkpoints left out because they lack a usable metric or cannot be read.
        fell_back: ``top`` returned the latest policies instead (``fallback_to_latest``).
    """

    records: tuple[PolicyRecord, ...]
    selector: SelectorName
    requested: int | None
    metric: str | None = None
    mode: Mode = "max"
    candidates: int = 0
    excluded: tuple[Exclusion, ...] = ()
    fell_back: bool = False

    @property
    def shortfall(self) -> int:
        """How many fewer records than requested were found (0 when enough)."""
        return 0 if self.requested is None else max(0, self.requested - len(self.records))

    @property
    def paths(self) -> list[Path]:
        return [r.path for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[PolicyRecord]:
        return iter(self.records)

    def describe(self) -> str:
        """One line for logs and warnings: what was chosen and what was not."""
        what = f"{self.selector}" + (f" by {self.metric} ({self.mode})" if self.selector == "top" else "")
        text = f"{what}: {len(self.records)} of {self.candidates} checkpoints"
        if self.shortfall:
            text += f", {self.shortfall} fewer than the {self.requested} requested"
        if self.excluded:
            counts: dict[str, int] = {}
            for e in self.excluded:
                counts[e.reason] = counts.get(e.reason, 0) + 1
            text += "; excluded: " + ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
        if self.fell_back:
            text += f"; fewer than {FALLBACK_FRACTION:.0%} have {self.metric!r}, so the latest were returned"
        return text


def lookup_metric(metadata: Mapping[str, Any], metric: str) -> tuple[float | None, ExclusionReason | None, str]:
    """Find ``metric`` in checkpoint metadata.

    Looks at the top level first, then in ``metadata["eval_scores"]``; a name ending in
    ``_score`` also tries its stem in ``eval_scores`` (``navigation_score`` -> ``navigation``,
    as Metta's selector did from #1609). A None value counts as missing (Metta dropped them).

    Returns:
        ``(value, None, where)`` for a usable number, or ``(None, reason, detail)``.
    """
    found: Any = _MISSING
    where = metric
    if metric in metadata and metadata[metric] is not None:
        found = metadata[metric]
    else:
        evals = metadata.get("eval_scores")
        if isinstance(evals, Mapping):
            names = [metric]
            if metric.endswith(_SCORE_SUFFIX) and len(metric) > len(_SCORE_SUFFIX):
                names.append(metric[: -len(_SCORE_SUFFIX)])
            for name in names:
                if evals.get(name) is not None:
                    found, where = evals[name], f"eval_scores.{name}"
                    break
    if found is _MISSING:
        return None, "missing_metric", f"no {metric!r} in the metadata or its eval_scores"
    # bool is an int subclass; numbers.Real also admits numpy scalars from legacy files.
    if isinstance(found, bool) or not isinstance(found, numbers.Real):
        return None, "non_numeric_metric", f"{where} is {type(found).__name__}, not a number"
    try:
        value = float(found)
    except (OverflowError, ValueError):
        return None, "non_numeric_metric", f"{where} cannot be a float"
    if math.isnan(value):
        return None, "nan_metric", f"{where} is NaN"
    return value, None, where


def latest_first(records: Sequence[PolicyRecord]) -> list[PolicyRecord]:
    """Newest first: highest epoch, then agent_step, then mtime, then name (see :func:`latest_key`)."""
    return sorted(records, key=latest_key, reverse=True)


def rank_by_metric(
    records: Sequence[PolicyRecord], metric: str, mode: Mode
) -> tuple[list[PolicyRecord], list[Exclusion]]:
    """Records with a usable ``metric``, best first, and the ones without it.

    Ties keep the latest order (newer first), so the ranking is deterministic.
    """
    ranked: list[tuple[float, int, PolicyRecord]] = []
    excluded: list[Exclusion] = []
    for position, record in enumerate(latest_first(records)):
        value, reason, detail = lookup_metric(record.metadata, metric)
        if value is None:
            assert reason is not None
            excluded.append(Exclusion(path=record.path, reason=reason, detail=detail, record=record))
        else:
            ranked.append((-value if mode == "max" else value, position, record))
    ranked.sort(key=lambda item: (item[0], item[1]))
    return [r for _, _, r in ranked], excluded


def _check_args(selector: str, n: int, mode: str) -> None:
    if selector not in SELECTOR_NAMES:
        raise StoreError(f"Invalid selector type {selector!r}; expected one of {', '.join(SELECTOR_NAMES)}")
    if mode not in MODES:
        raise StoreError(f"Invalid mode {mode!r}; expected 'max' or 'min'")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise StoreError(f"n must be a positive integer, got {n!r}")


def select_records(
    records: Sequence[PolicyRecord],
    *,
    selector: SelectorName = "top",
    n: int = 1,
    metric: str = "score",
    mode: Mode = "max",
    seed: int | None = None,
    fallback_to_latest: bool = False,
    unreadable: Sequence[Exclusion] = (),
) -> Selection:
    """Choose records by metadata alone.

    Args:
        records: the candidates (any order).
        selector: ``top`` (best ``n`` by ``metric``), ``latest`` (newest ``n``), ``random``
            (``n`` distinct, seeded) or ``all`` (every record, newest first; ``n`` is ignored).
        n: how many to return.
        metric: for ``top``: the metadata key (see :func:`lookup_metric`).
        mode: for ``top``: ``max`` keeps the highest values, ``min`` the lowest.
        seed: for ``random``: the seed (None draws one from the OS).
        fallback_to_latest: for ``top``: Metta's old rule, return the latest ``n`` when fewer
            than 80% of the candidates have the metric.
        unreadable: files that could not be read, reported in ``excluded``.

    Returns:
        A :class:`Selection`; fewer records than ``n`` is not an error (see ``shortfall``).

    Raises:
        StoreError: an unknown selector or mode, or ``n`` below 1.
    """
    _check_args(selector, n, mode)
    ordered = latest_first(records)
    common: dict[str, Any] = {"selector": selector, "mode": mode, "candidates": len(ordered)}
    if selector == "all":
        return Selection(records=tuple(ordered), requested=None, excluded=tuple(unreadable), **common)
    if selector == "latest":
        return Selection(records=tuple(ordered[:n]), requested=n, excluded=tuple(unreadable), **common)
    if selector == "random":
        # Sampled from the deterministic latest order, so a seed reproduces the same choice.
        picked = random.Random(seed).sample(ordered, min(n, len(ordered)))
        return Selection(records=tuple(picked), requested=n, excluded=tuple(unreadable), **common)
    ranked, missing = rank_by_metric(ordered, metric, mode)
    excluded = (*unreadable, *missing)
    if fallback_to_latest and len(ranked) < FALLBACK_FRACTION * len(ordered):
        return Selection(
            records=tuple(ordered[:n]), requested=n, metric=metric, excluded=excluded, fell_back=True, **common
        )
    return Selection(records=tuple(ranked[:n]), requested=n, metric=metric, excluded=excluded, **common)
