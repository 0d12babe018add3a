"""``PolicyStore``: save, list, select, load and prune policy checkpoints.

Listing and selecting read headers only (containers) or the directory index (legacy ``.pt``
files, whose metadata needs a full import once per file version); weights are loaded only for
the policies actually returned, through a thread-safe LRU cache keyed by path and file
signature.

Example:
    >>> store = PolicyStore("runs/a/checkpoints")
    >>> store.save(agent=agent, metadata={"epoch": 50, "score": 0.7})   # model_0050.mfmt
    >>> best = store.policies(n=3, metric="score")                        # top 3 MettaAgents
    >>> store.prune(LatestN(5) | BestN(5, "score"))
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mettaformat.agent import MettaAgent
from mettaformat.anyformat import load_any
from mettaformat.constants import ZSTD_DEFAULT_LEVEL, Compression
from mettaformat.errors import StoreError
from mettaformat.remote.index import DEFAULT_MAX_AGE_S
from mettaformat.remote.uri import is_remote_uri
from mettaformat.store.cache import DEFAULT_CACHE_SIZE, PolicyCache
from mettaformat.store.catalog import RecordCatalog, ScanResult
from mettaformat.store.deltas import DeltaMode, check_delta_options, choose_base
from mettaformat.store.maintenance import DEFAULT_TEMP_GRACE_S, PruneReport, clean_temp_files
from mettaformat.store.pruning import run_prune
from mettaformat.store.record import PolicyRecord, stat_signature
from mettaformat.store.remote_store import is_object_storage, save_remote, scan_object_storage, stale_selection
from mettaformat.store.retention import RetentionPolicy
from mettaformat.store.saving import as_agent, checkpoint_for, local_target, read_back, write_local
from mettaformat.store.selectors import Mode, Selection, SelectorName, latest_first, select_records
from mettaformat.store.uri import local_path, resolve_uri

__all__ = ["PolicyStore", "PolicyStoreWarning"]

CacheKey = tuple[str, int, int, int]


class PolicyStoreWarning(UserWarning):
    """A selection returned fewer policies than asked for, or fell back to the latest ones."""


class PolicyStore:
    """Policies in a directory (or any URI), selected by metadata and loaded on demand.

    Args:
        root: the default location: a directory path, a ``file://`` URI or an object-storage
            prefix (``s3://bucket/run/``, ``gs://...``); where ``save`` writes
            and what ``policies()`` / ``records()`` / ``prune()`` use when no URI is given.
        cache_size: how many loaded policies to keep (LRU).
        device: where loaded policies are placed.
        use_index: read and maintain ``<dir>/.mettaformat-index`` (see
            :mod:`mettaformat.store.index`).
        index_max_age_s: on S3, how long a full listing vouches for a prefix's index: a
            younger index is used without listing, so objects written or deleted by other
            tools than a PolicyStore show up within this time, or at once with
            ``scan(refresh=True)`` (see :mod:`mettaformat.remote.index`). 0 lists every time.

    Raises:
        ValueError: ``Cache size must be positive`` when ``cache_size`` <= 0.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        device: str | torch.device = "cpu",
        use_index: bool = True,
        index_max_age_s: float = DEFAULT_MAX_AGE_S,
    ) -> None:
        self.root: Path | str | None = None
        if root is not None:
            self.root = os.fspath(root) if is_remote_uri(root) else local_path(root)
        self.device = torch.device(device)
        self.cache: PolicyCache[CacheKey, MettaAgent] = PolicyCache(cache_size)
        self._catalog = RecordCatalog(use_index=use_index)
        self.index_max_age_s = index_max_age_s

    def __repr__(self) -> str:
        return f"PolicyStore(root={str(self.root) if self.root else None!r}, device={str(self.device)!r})"

    # -- listing and selecting (metadata only) --------------------------------------------------
    def _uri(self, uri: str | os.PathLike[str] | None) -> str:
        if uri is not None:
            return os.fspath(uri)
        if self.root is None:
            raise StoreError("no URI given and the PolicyStore has no root")
        return os.fspath(self.root)

    def scan(self, uri: str | os.PathLike[str] | None = None, *, refresh: bool = False) -> ScanResult:
        """Records of every checkpoint ``uri`` names (default: the root), and the unreadable files.

        ``refresh`` lists an object-storage prefix even when its index is recent.

        Raises:
            StoreError: an unknown scheme, or a path that does not exist.
        """
        return self._scan(self._uri(uri), refresh)[0]

    def _scan(self, target: str, refresh: bool) -> tuple[ScanResult, bool]:
        """The scan, and whether it came from an object-storage index without a listing."""
        if is_object_storage(target):
            return scan_object_storage(
                target, use_index=self._catalog.use_index, max_age_s=self.index_max_age_s, refresh=refresh
            )
        return self._catalog.scan(resolve_uri(target)), False

    def records(self, uri: str | os.PathLike[str] | None = None) -> list[PolicyRecord]:
        """Records of the readable checkpoints at ``uri``, newest first. Never loads weights.

        Raises:
            StoreError: an unknown scheme, or a path that does not exist.
        """
        return latest_first(self.scan(uri).records)

    def select(
        self,
        uri: str | os.PathLike[str] | None = None,
        *,
        n: int = 1,
        metric: str = "score",
        selector: SelectorName = "top",
        mode: Mode = "max",
        seed: int | None = None,
        fallback_to_latest: bool = False,
    ) -> Selection:
        """Choose checkpoints by metadata, without loading weights.

        See :func:`mettaformat.store.selectors.select_records` for the selectors.

        Returns:
            A :class:`Selection`: the records, what was excluded and why, the shortfall, and
            whether ``top`` fell back to the latest.

        Raises:
            StoreError: an unknown scheme or selector, a missing path, ``n`` below 1.
        """
        target = self._uri(uri)
        scan, from_index = self._scan(target, refresh=False)

        def choose(scan: ScanResult) -> Selection:
            return select_records(
                scan.records,
                selector=selector,
                n=n,
                metric=metric,
                mode=mode,
                seed=seed,
                fallback_to_latest=fallback_to_latest,
                unreadable=scan.unreadable,
            )

        selection = choose(scan)
        if from_index and stale_selection(selection.records):  # an index not checked against a listing
            selection = choose(self._scan(target, refresh=True)[0])
        return selection

    # -- loading --------------------------------------------------------------------------------
    def policy(self, uri: str | os.PathLike[str] | None = None) -> MettaAgent:
        """Load one policy: the file ``uri`` names, or the latest one in a directory or glob.

        Raises:
            StoreError: nothing loadable at ``uri`` (the message says why).
            ModelReconstructionError: no builder is registered for the model type.
            FormatError, LegacyImportError, IntegrityError: the file is damaged.
        """
        selection = self.select(uri, selector="latest", n=1)
        if not selection.records:
            raise StoreError(_nothing_found(self._uri(uri), selection))
        return self.load(selection.records[0])

    def policies(
        self,
        uri: str | os.PathLike[str] | None = None,
        n: int = 1,
        metric: str = "score",
        selector: SelectorName = "top",
        mode: Mode = "max",
        seed: int | None = None,
        fallback_to_latest: bool = False,
    ) -> list[MettaAgent]:
        """Load the policies :meth:`select` chooses.

        Warns (:class:`PolicyStoreWarning`) when fewer than ``n`` qualify or ``top`` fell
        back to the latest policies.

        Raises:
            StoreError: no policy qualifies, or as for :meth:`select`.
            ModelReconstructionError, FormatError, LegacyImportError, IntegrityError: as for
                :meth:`policy`.
        """
        selection = self.select(
            uri, n=n, metric=metric, selector=selector, mode=mode, seed=seed, fallback_to_latest=fallback_to_latest
        )
        if not selection.records:
            raise StoreError(_nothing_found(self._uri(uri), selection))
        if selection.shortfall or selection.fell_back:
            warnings.warn(f"{self._uri(uri)}: {selection.describe()}", PolicyStoreWarning, stacklevel=2)
        return [self.load(r) for r in selection.records]

    def load(self, record: PolicyRecord) -> MettaAgent:
        """Load the policy of ``record`` (cached).

        Raises:
            StoreError: the file was replaced or deleted since ``record`` was read (threat model FS4:
                its metadata no longer describes the file).
            ModelReconstructionError, FormatError, LegacyImportError, IntegrityError: as for
                :meth:`policy`.
        """
        key: CacheKey = (str(record.path), record.mtime_ns, record.size, record.ino)
        agent = self.cache.get(key)
        if agent is not None:
            return agent
        if is_remote_uri(record.uri):  # pinned to the listed ETag: a replaced object is an error
            from mettaformat.remote.store import load_remote_record

            agent = MettaAgent.from_checkpoint(load_remote_record(record, self.device), device=self.device)
            self.cache.put(key, agent)
            return agent
        self._check_unchanged(record, "since it was listed")
        ckpt = load_any(record.path, device=self.device)
        agent = MettaAgent.from_checkpoint(ckpt, device=self.device)
        # The signature must hold across the load too, or the weights may be another version's.
        self._check_unchanged(record, "while it was being loaded")
        self.cache.put(key, agent)
        return agent

    @staticmethod
    def _check_unchanged(record: PolicyRecord, when: str) -> None:
        try:
            signature = stat_signature(os.lstat(record.path))
        except OSError as e:
            raise StoreError(f"{record.path} cannot be loaded: {e.strerror}", region=str(record.path)) from e
        if signature != record.signature:
            raise StoreError(f"{record.path} changed {when}; list it again", region=str(record.path))

    # -- saving ---------------------------------------------------------------------------------
    def save(
        self,
        name: str | None = None,
        path: str | os.PathLike[str] | None = None,
        agent: MettaAgent | nn.Module | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        model_type: str = "pytorch",
        compression: Compression = "raw",
        level: int | str = ZSTD_DEFAULT_LEVEL,
        durable: bool = False,
        overwrite: bool = False,
        delta: DeltaMode = False,
        full_every: int = 10,
    ) -> PolicyRecord:
        """Save a policy atomically and return its record.

        An existing file at the target is never replaced silently: the save is refused unless
        ``overwrite=True``.

        Args:
            name: file name inside the root (must end in ``.mfmt``); default
                ``model_{epoch:04d}.mfmt`` from the merged metadata's ``epoch``.
            path: an explicit target path or ``file://`` URI instead of ``root/name``.
            agent: a :class:`MettaAgent`, or a bare ``nn.Module`` (saved with ``model_type``).
            metadata: merged over the agent's metadata (``PolicyMetadata`` or a dict).
            model_type: the registry name for a bare module.
            compression: ``"raw"`` or ``"zstd"`` (see :func:`mettaformat.save_file`).
            level: zstd level.
            durable: fsync before the rename.
            overwrite: replace an existing checkpoint of the same name.
            delta: ``True``: store the tensors that changed little as differences from the latest full
                checkpoint of the same run in the target's folder (zstd; a full checkpoint when there is
                none). ``"auto"``: the same, unless fewer than half of the tensor bytes match that
                checkpoint's by name, dtype and shape. Retention never deletes a base a kept file needs.
                A base that is missing, changed or damaged gives a full save and a ``PolicyStoreWarning``.
            full_every: with ``delta``, every ``full_every``-th save of a run is a full checkpoint,
                which starts a new base (``1``: always full).

        Returns:
            The record of the file written (read back from its header).

        Raises:
            TypeError: ``agent`` is missing or not a module.
            StoreError: no name can be derived (no root, no integer epoch), an invalid name,
                a name not ending in ``.mfmt``, or the target exists and ``overwrite`` is False.
            WriteError: the metadata cannot be stored, or an I/O error (the old file is kept).
        """
        check_delta_options(delta, full_every)
        base = as_agent(agent, model_type)
        merged = {**base.metadata, **dict(metadata or {})}
        if self._remote(path):
            return save_remote(
                self.root, base, merged, name, path,
                compression=compression, level=level, overwrite=overwrite, use_index=self._catalog.use_index,
            )
        target = local_target(self.root, name, path, merged, overwrite=overwrite)
        ckpt = checkpoint_for(base, merged, target.name, target.resolve().as_uri())
        records = self.scan(target.parent).records if delta else []
        delta_base = choose_base(records, target, merged, ckpt.tensors, delta, full_every)
        unusable = write_local(ckpt, target, compression=compression, level=level, durable=durable, base=delta_base)
        if unusable is not None:
            warnings.warn(f"{target}: saved as a full checkpoint, its delta base cannot be used: {unusable}",
                          PolicyStoreWarning, stacklevel=2)
        # Crash leftovers are cleaned by the next save (threat model WR5); young ones may be live writes.
        clean_temp_files(target.parent, grace_s=DEFAULT_TEMP_GRACE_S)
        return read_back(self._catalog, target)

    def _remote(self, path: str | os.PathLike[str] | None) -> bool:
        return is_remote_uri(path) if path is not None else isinstance(self.root, str)

    # -- retention ------------------------------------------------------------------------------
    def prune(
        self,
        policy: RetentionPolicy,
        uri: str | os.PathLike[str] | None = None,
        *,
        dry_run: bool = False,
        temp_grace_s: float = DEFAULT_TEMP_GRACE_S,
        allow_delete_all: bool = False,
        confirm: Callable[[PruneReport], bool] | None = None,
        materialize_dependants: bool = False,
    ) -> PruneReport:
        """Delete the checkpoints ``policy`` does not keep, and crash-leftover temp files.

        The policy applies to each run separately, and copies of one checkpoint in several
        formats count as one (see :mod:`mettaformat.store.runs`). Unreadable files are never
        deleted (reported as skipped), nor a checkpoint re-saved since it was listed. Temp files
        younger than ``temp_grace_s`` may be saves in progress and are kept.

        Args:
            policy: what to keep (``LatestN(3) | BestN(5, "score")``...).
            uri: a directory or glob (default: the root).
            dry_run: report only; delete nothing.
            temp_grace_s: minimum age of a temp file before it is removed.
            allow_delete_all: permit a prune that keeps no checkpoint at all.
            confirm: called with the plan (a dry-run report) before anything is deleted;
                nothing is deleted unless it returns True. The CLI asks on a terminal.
            materialize_dependants: a kept delta checkpoint whose base the policy does not keep is
                rewritten as a standalone file first, and the base deleted (default: the base is
                kept). One that cannot be rewritten keeps its bases and is reported as skipped.

        Returns:
            A :class:`PruneReport` (the plan itself, marked ``dry_run``, when ``confirm``
            declined).

        Raises:
            StoreError: the policy keeps nothing while checkpoints exist (unless
                ``allow_delete_all``), or as for :meth:`scan`.
        """
        if not isinstance(policy, RetentionPolicy):
            raise TypeError(f"prune needs a RetentionPolicy, got {type(policy).__name__}")
        # Checked before anything is deleted: a bad grace period must not fail halfway.
        if not temp_grace_s >= 0:  # also rejects NaN
            raise StoreError(f"temp file grace period must be a non-negative number of seconds, not {temp_grace_s}")
        target = self._uri(uri)
        return run_prune(
            self.scan(target, refresh=True),  # deletions are planned from a full listing
            target,
            policy,
            dry_run=dry_run,
            temp_grace_s=temp_grace_s,
            allow_delete_all=allow_delete_all,
            confirm=confirm,
            materialize_dependants=materialize_dependants,
            use_index=self._catalog.use_index,
            forget=self._forget,
        )

    def clean_temp_files(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        grace_s: float = DEFAULT_TEMP_GRACE_S,
        dry_run: bool = False,
    ) -> list[Path]:
        """Remove temp files older than ``grace_s`` from ``directory`` (default: the root).

        Raises:
            StoreError: no directory given and no root.
            ValueError: a negative ``grace_s``.
        """
        return clean_temp_files(local_path(self._uri(directory)), grace_s=grace_s, dry_run=dry_run)

    def _forget(self, deleted: list[PolicyRecord]) -> None:
        self._catalog.forget(r.path for r in deleted)
        gone = {str(r.path) for r in deleted}
        for key in self.cache.keys():
            if key[0] in gone:
                self.cache.pop(key)


def _nothing_found(uri: str, selection: Selection) -> str:
    if not selection.candidates:
        first = selection.excluded[0] if selection.excluded else None
        why = f"; unreadable: {first.path.name}: {first.detail}" if first is not None else ""
        return f"No policy records found at {uri}{why}"
    return f"No policy at {uri} qualifies: {selection.describe()}"
