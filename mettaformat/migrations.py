"""Schema migrations applied when a checkpoint is loaded.

Old checkpoints spell things the way their era did (``initial_uri``, a missing ``run_name``,
PolicyMetadata without its required counters). A migration rewrites one such thing in the
in-memory :class:`Checkpoint`; loading applies every registered migration that matches,
warns once per migration, and records it in ``provenance["migrations"]``. The file on disk
is never changed (``mettaformat migrate`` writes a new one). ``load_any(path, migrate=False)``
shows the raw form.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from mettaformat.checkpoint import Checkpoint

__all__ = ["Migration", "MigrationWarning", "apply_migrations", "register_migration", "registered_migrations"]


class MigrationWarning(UserWarning):
    """A checkpoint was migrated in memory while loading."""


@dataclass(frozen=True)
class Migration:
    """One schema change. ``applies`` must be cheap and side-effect free; ``apply`` edits in place."""

    id: str
    description: str
    applies: Callable[[Checkpoint], bool]
    apply: Callable[[Checkpoint], None]


_registry: list[Migration] = []


def register_migration(migration: Migration) -> None:
    """Add a migration; they run in registration order.

    Raises:
        ValueError: a migration with the same id exists.
    """
    if any(m.id == migration.id for m in _registry):
        raise ValueError(f"migration {migration.id!r} is already registered")
    _registry.append(migration)


def registered_migrations() -> list[Migration]:
    return list(_registry)


def apply_migrations(ckpt: Checkpoint, *, warn: bool = True, source: str | os.PathLike[str] | None = None) -> list[str]:
    """Apply every matching migration to ``ckpt``; return the ids applied.

    ``source`` is the file the checkpoint was read from; warnings name it (a legacy file's own
    ``uri`` says where it was written, not where it is).
    """
    applied: list[str] = []
    where = os.fspath(source) if source is not None else ckpt.uri or ckpt.name or "checkpoint"
    for m in _registry:
        if m.applies(ckpt):
            m.apply(ckpt)
            applied.append(m.id)
            ckpt.provenance.setdefault("migrations", []).append({"id": m.id, "description": m.description})
            if warn:
                warnings.warn(f"{where}: {m.description}", MigrationWarning, stacklevel=3)
    return applied


# -- built-in migrations -------------------------------------------------------------------------
def _rename_initial_uri(ckpt: Checkpoint) -> None:
    ckpt.metadata["initial_pr"] = ckpt.metadata.pop("initial_uri")


def _add_run_name(ckpt: Checkpoint) -> None:
    ckpt.metadata["run_name"] = ckpt.name


def _add_required_counters(ckpt: Checkpoint) -> None:
    for key, default in _REQUIRED_COUNTERS.items():
        ckpt.metadata.setdefault(key, default)


#: PolicyMetadata's required fields and their defaults (Metta, July 2025 onwards).
_REQUIRED_COUNTERS = {"agent_step": 0, "epoch": 0, "generation": 0, "train_time": 0.0}


def _is_legacy(ckpt: Checkpoint) -> bool:
    return ckpt.versions.get("checkpoint_format") in (1, 2)


register_migration(
    Migration(
        "initial_uri->initial_pr",
        "metadata key 'initial_uri' renamed to 'initial_pr' (Metta, Aug 2025)",
        lambda c: "initial_uri" in c.metadata and "initial_pr" not in c.metadata,
        _rename_initial_uri,
    )
)
register_migration(
    Migration(
        "name->run_name",
        "policy name recorded as metadata 'run_name' (PolicyRecord.name became run_name, July 2025)",
        lambda c: _is_legacy(c) and c.name is not None and "run_name" not in c.metadata,
        _add_run_name,
    )
)
register_migration(
    Migration(
        "policy_metadata.required",
        "missing PolicyMetadata counters (agent_step, epoch, generation, train_time) filled with their defaults",
        lambda c: _is_legacy(c) and not all(k in c.metadata for k in _REQUIRED_COUNTERS),
        _add_required_counters,
    )
)
