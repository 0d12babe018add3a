"""``migrate``: legacy ``.pt`` checkpoints to ``.mfmt`` containers, one file or a whole directory.

Modelled on Metta's ``migrate_checkpoints`` (docs/legacy-formats.md 5), with its faults fixed:

* the input is never modified: the output goes beside it (``model_0050.pt`` ->
  ``model_0050.mfmt``) or under ``dst`` (a directory, or an object-storage prefix such as
  ``s3://bucket/run/``); only when ``dst`` is the input itself is it replaced, after a
  ``<file>.backup`` copy (``backup=True``);
* every era is migrated (the old tool converted era-A records only), with the registered
  schema migrations applied and the source recorded in ``provenance["migrated_from"]``;
* writes are atomic and verified before they replace anything, so a crash or a bad write
  leaves the previous state (an upload is verified locally first, then published whole);
  containers and up-to-date outputs are skipped; every failure is counted with its reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import torch

from mettaformat._atomic import TEMP_SUFFIX, fsync_dir, is_temp_file
from mettaformat._files import open_regular, refuse_overwriting_input
from mettaformat.anyformat import load_any, sniff_format
from mettaformat.checkpoint_io import read_checkpoint, write_checkpoint
from mettaformat.constants import Compression
from mettaformat.errors import MettaFormatError, WriteError
from mettaformat.legacy.graph import graph_equal, storable_checkpoint
from mettaformat.migrations import apply_migrations
from mettaformat.remote.uri import is_remote_uri, join_uri

__all__ = ["LEGACY_SUFFIXES", "MigrationResult", "MigrationSummary", "migrate", "plan_migration"]

#: File suffixes a directory migration picks up.
LEGACY_SUFFIXES: Final = (".pt", ".pth")
MFMT_SUFFIX: Final = ".mfmt"
BACKUP_SUFFIX: Final = ".backup"
Status = Literal["migrated", "skipped", "failed"]
Progress = Callable[["MigrationResult", int, int], None]
#: An output: a local path, or the URI of an object (``s3://bucket/run/model_0050.mfmt``).
Output = Path | str


@dataclass
class MigrationResult:
    """The outcome for one input file.

    Attributes:
        src: the input.
        dst: the output (planned, for skips, failures and dry runs).
        status: ``migrated`` (or would be, in a dry run), ``skipped`` or ``failed``.
        reason: why it was skipped or failed.
        shape: what the importer recognised.
        migrations: ids of the schema migrations applied.
        backup: the backup written, if any.
    """

    src: str
    dst: str
    status: Status
    reason: str = ""
    shape: str | None = None
    migrations: list[str] = field(default_factory=list)
    backup: str | None = None

    def describe(self, *, dry_run: bool = False) -> str:
        """One line: what happened (``would migrate`` in a dry run), the paths, and why."""
        status = "would migrate" if dry_run and self.status == "migrated" else self.status
        text = f"{status:8} {self.src}"
        if self.status == "migrated":
            text += f" -> {self.dst}"
            if self.migrations:
                text += f" ({', '.join(self.migrations)})"
        if self.reason:
            text += f": {self.reason}"
        return text

    def __str__(self) -> str:
        return self.describe()


@dataclass
class MigrationSummary:
    """Every result of one :func:`migrate` call, and the counts the old tool printed."""

    results: list[MigrationResult] = field(default_factory=list)
    dry_run: bool = False

    def _count(self, status: Status) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def processed(self) -> int:
        return len(self.results)

    @property
    def migrated(self) -> int:
        return self._count("migrated")

    @property
    def skipped(self) -> int:
        return self._count("skipped")

    @property
    def failed(self) -> int:
        return self._count("failed")

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def __str__(self) -> str:
        head = (
            f"{'Dry run: ' if self.dry_run else ''}{self.processed} processed, "
            f"{self.migrated} {'to migrate' if self.dry_run else 'migrated'}, "
            f"{self.skipped} skipped, {self.failed} failed"
        )
        return "\n".join([head, *(f"  {r.describe(dry_run=self.dry_run)}" for r in self.results)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "processed": self.processed,
            "migrated": self.migrated,
            "skipped": self.skipped,
            "failed": self.failed,
            "dry_run": self.dry_run,
            "results": [dict(r.__dict__) for r in self.results],
        }


def plan_migration(
    src: str | os.PathLike[str], dst: str | os.PathLike[str] | None = None, *, recursive: bool = False
) -> list[tuple[Path, Output]]:
    """The ``(input, output)`` pairs :func:`migrate` would process, in order.

    Args:
        src: a file, or a directory whose ``*.pt``/``*.pth`` files are taken (sorted; hidden
            temp files and backups are not).
        dst: for a file, the output file or an existing directory; for a directory, the
            output root (mirroring sub-directories). Default: beside each input. A URI
            (``s3://bucket/run/``) is an object-storage prefix, or for a file an object
            name ending in ``.mfmt``.
        recursive: descend into sub-directories (symlinked directories are not followed).

    Returns:
        The pairs.

    Raises:
        FileNotFoundError: ``src`` is neither a file nor a directory.
    """
    root = Path(src)
    remote = dst is not None and is_remote_uri(os.fspath(dst))
    if root.is_file() and remote:
        text = os.fspath(dst)  # type: ignore[arg-type]
        return [(root, text if text.endswith(MFMT_SUFFIX) else join_uri(text, root.with_suffix(MFMT_SUFFIX).name))]
    if root.is_file():
        out = Path(dst) if dst is not None else root.with_suffix(MFMT_SUFFIX)
        if dst is not None and out.is_dir():
            out = out / root.with_suffix(MFMT_SUFFIX).name
        return [(root, out)]
    if not root.is_dir():
        raise FileNotFoundError(f"{src} is neither a file nor a directory")
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(dirs) if recursive else []
        found += [
            Path(folder) / f
            for f in sorted(files)
            if Path(f).suffix.lower() in LEGACY_SUFFIXES and not f.startswith(".") and not is_temp_file(f)
        ]
    if remote:
        prefix = os.fspath(dst)  # type: ignore[arg-type]
        return [(p, join_uri(prefix, p.relative_to(root).with_suffix(MFMT_SUFFIX).as_posix())) for p in found]
    out_root = Path(dst) if dst is not None else root
    return [(p, (out_root / p.relative_to(root)).with_suffix(MFMT_SUFFIX)) for p in found]


def migrate(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None = None,
    *,
    backup: bool = True,
    recursive: bool = False,
    dry_run: bool = False,
    compression: Compression = "raw",
    progress: Progress | None = None,
) -> MigrationSummary:
    """Migrate legacy checkpoints to ``.mfmt`` containers.

    Args:
        src: a file or a directory (see :func:`plan_migration`).
        dst: where outputs go (see :func:`plan_migration`). ``dst`` equal to a single input
            file replaces it in place, after a backup.
        backup: copy an input to ``<input>.backup`` before replacing it (in-place mode only;
            an existing backup is never overwritten).
        recursive: descend into sub-directories.
        dry_run: import and check every input, write nothing.
        compression: ``"zstd"`` to compress the outputs.
        progress: called after each file with ``(result, index, total)``.

    Returns:
        The summary; a failure of one file does not stop the others.

    Raises:
        FileNotFoundError: ``src`` is neither a file nor a directory.
    """
    pairs = plan_migration(src, dst, recursive=recursive)
    summary = MigrationSummary(dry_run=dry_run)
    claimed: dict[Output, Path] = {}
    for i, (inp, out) in enumerate(pairs):
        other = claimed.setdefault(out if isinstance(out, str) else out.resolve(), inp)
        if other != inp:
            result = MigrationResult(os.fspath(inp), os.fspath(out), "failed", f"output collides with {other}'s")
        else:
            result = _migrate_file(inp, out, backup=backup, dry_run=dry_run, compression=compression)
        summary.results.append(result)
        if progress is not None:
            progress(result, i, len(pairs))
    return summary


def _migrate_file(
    inp: Path, out: Output, *, backup: bool, dry_run: bool, compression: Compression
) -> MigrationResult:
    result = MigrationResult(os.fspath(inp), os.fspath(out), "failed")
    in_place = isinstance(out, Path) and out.exists() and os.path.samefile(inp, out)
    try:
        if isinstance(out, Path) and not backup:  # in place is only ever done after a backup
            refuse_overwriting_input(out, inp, command="migrate --no-backup")
        if sniff_format(inp) == "mettaformat":
            return _skip(result, "already a mettaformat container")
        if not in_place and _up_to_date(inp, out):
            return _skip(result, f"{_name(out)} is up to date")
        ckpt = load_any(inp, migrate=False)
        result.shape = ckpt.provenance.get("shape")
        result.migrations = apply_migrations(ckpt, warn=False)
        ckpt.provenance["migrated_from"] = {
            "path": os.fspath(inp),
            "source_format": ckpt.provenance.get("source_format"),
            "sha256": _sha256(inp),
            "tool": "mettaformat migrate",
        }
        if dry_run:
            result.status = "migrated"
            return result
        if isinstance(out, Path):
            out.parent.mkdir(parents=True, exist_ok=True)
        if in_place and backup:
            result.backup = os.fspath(_backup(inp))
        _write_verified(storable_checkpoint(ckpt), dict(ckpt.tensors), out, compression)
        result.status = "migrated"
    except (MettaFormatError, OSError, RecursionError) as e:
        result.reason = f"{type(e).__name__}: {e}"
    except Exception as e:  # one file must never stop the others: reported, not hidden
        result.reason = f"unexpected {type(e).__name__}: {e}"
    return result


def _skip(result: MigrationResult, reason: str) -> MigrationResult:
    result.status, result.reason = "skipped", reason
    return result


def _name(out: Output) -> str:
    return out.rsplit("/", 1)[-1] if isinstance(out, str) else out.name


def _up_to_date(inp: Path, out: Output) -> bool:
    try:
        if isinstance(out, str):
            from mettaformat.remote.store import modified_ns

            written = modified_ns(out)
            if written is None:
                return False
            newer = written // 10**9 >= inp.stat().st_mtime_ns // 10**9  # object stores keep whole seconds
        elif out.is_file():
            newer = out.stat().st_mtime_ns >= inp.stat().st_mtime_ns
        else:
            return False
        return newer and sniff_format(out) == "mettaformat"
    except MettaFormatError:
        return False  # a damaged or foreign file at the output path is replaced


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    fd, _ = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _staging(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


def _backup(inp: Path) -> Path:
    target = inp.with_name(inp.name + BACKUP_SUFFIX)
    if target.exists():
        raise WriteError(f"backup {target} already exists; move it away or pass backup=False")
    staged = _staging(target)
    try:
        shutil.copy2(inp, staged)
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)
    fsync_dir(target.parent)
    return target


def _write_verified(ckpt: Any, tensors: dict[str, torch.Tensor], out: Output, compression: Compression) -> None:
    """Write beside ``out`` (or locally, for a URI), read it back and compare, then rename over
    ``out`` (or upload it, visible only once complete)."""
    if isinstance(out, str):
        with tempfile.TemporaryDirectory(prefix="mettaformat-migrate-") as tmp:
            staged = Path(tmp) / _name(out)
            _write_and_compare(ckpt, tensors, staged, out, compression)
            from mettaformat.remote.upload import upload_file

            upload_file(staged, out)
        return
    staged = _staging(out)
    try:
        _write_and_compare(ckpt, tensors, staged, out, compression)
        os.replace(staged, out)
    finally:
        staged.unlink(missing_ok=True)
    fsync_dir(out.parent)


def _write_and_compare(
    ckpt: Any, tensors: dict[str, torch.Tensor], staged: Path, out: Output, compression: Compression
) -> None:
    write_checkpoint(ckpt, staged, compression=compression, durable=True)
    back = read_checkpoint(staged, lazy=False)
    # Byte equality: a NaN weight must not fail the check, a flipped bit must.
    if list(back.tensors) != list(tensors) or not all(graph_equal(back.tensors[k], t) for k, t in tensors.items()):
        raise WriteError(f"{out}: the written state dict does not read back equal")
