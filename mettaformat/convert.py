"""``convert``: any checkpoint format to any other, through the hub.

``load_any(src, migrate=False)`` reads the source exactly as stored, one writer writes the
target; every write is atomic and the source is never opened for writing. What the target
cannot carry is reported (:class:`ConvertReport`), or refused with ``strict=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import torch

from mettaformat._files import refuse_overwriting_input
from mettaformat.anyformat import load_any, sniff_format
from mettaformat.checkpoint import Checkpoint
from mettaformat.checkpoint_io import write_checkpoint
from mettaformat.constants import CONVERT_TARGETS, Compression
from mettaformat.errors import WriteError
from mettaformat.legacy.export import (
    ExportReport,
    export_safetensors,
    export_state_dict,
    export_v1,
    export_v2,
    export_v2_full,
)
from mettaformat.legacy.graph import storable_checkpoint
from mettaformat.remote.uri import is_remote_uri, size_of

__all__ = ["CONVERT_TARGETS", "ConvertReport", "ConvertTarget", "convert", "target_for_path", "write_target"]

ConvertTarget = Literal["mfmt", "v1", "v2", "v2-full", "pt", "safetensors", "dcp"]
_BY_SUFFIX: Final[dict[str, ConvertTarget]] = {".mfmt": "mfmt", ".safetensors": "safetensors"}


@dataclass
class ConvertReport:
    """What :func:`convert` did.

    Attributes:
        src: the source path.
        dst: the file written.
        source_format: ``mettaformat``, ``torch-zip``, ``torch-legacy-stream`` or ``safetensors``.
        shape: what the importer recognised (``v1-policy-record``...), if a legacy file.
        target: the format written.
        tensors: state-dict entries written.
        bytes_in: size of the source.
        bytes_out: size of the result.
        not_carried: content of the source absent from the result.
        notes: how content was carried where that is not obvious.
    """

    src: str
    dst: str
    source_format: str
    shape: str | None
    target: ConvertTarget
    tensors: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    not_carried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def target_for_path(path: str | os.PathLike[str]) -> ConvertTarget | None:
    """The target a destination's suffix implies (``.mfmt``, ``.safetensors``), or None if ambiguous."""
    return _BY_SUFFIX.get(Path(path).suffix.lower())


def write_target(
    ckpt: Checkpoint,
    dst: str | os.PathLike[str],
    to: ConvertTarget,
    *,
    compression: Compression = "raw",
    model: torch.nn.Module | None = None,
    strict: bool = False,
    allow_objects: bool = False,
) -> ExportReport:
    """Write ``ckpt`` to ``dst`` in format ``to``.

    Args:
        ckpt: the checkpoint (not modified).
        dst: the file to write (replaced atomically).
        to: the target format.
        compression: ``"zstd"`` for ``mfmt`` only.
        model: a live module for ``v1``/``v2-full`` when the checkpoint has no module graph.
        strict: refuse instead of reporting content the target cannot carry.
        allow_objects: ``v2`` only: pickle recorded objects in metadata instead of leaving them out.

    Returns:
        The exporter's report (empty for ``mfmt``, which carries everything).

    Raises:
        WriteError: an unknown target, an option the target does not take, content the
            target refuses, or an I/O error.
    """
    if to not in CONVERT_TARGETS:
        raise WriteError(f"unknown target {to!r}; use one of {', '.join(CONVERT_TARGETS)}")
    if compression not in ("raw", "none") and to not in ("mfmt", "dcp"):
        raise WriteError(f"compression applies to mfmt containers only, not {to}")
    if model is not None and to not in ("v1", "v2-full"):
        raise WriteError(f"model= applies to v1 and v2-full only, not {to}")
    if to == "mfmt":
        try:
            write_checkpoint(storable_checkpoint(ckpt), dst, compression=compression)
        except RecursionError as e:
            raise WriteError(f"{dst}: object graph too deep for this interpreter") from e
        return ExportReport(os.fspath(dst), "mfmt")
    if to == "dcp":  # a distributed checkpoint directory, loadable on any number of ranks
        from mettaformat.dcp.consolidate import write_dcp

        not_carried, notes = write_dcp(ckpt, dst, compression=compression, strict=strict)
        return ExportReport(os.fspath(dst), "dcp", not_carried=not_carried, notes=notes)
    if to == "v1":
        return export_v1(ckpt, dst, model=model, strict=strict)
    if to == "v2":
        return export_v2(ckpt, dst, allow_objects=allow_objects, strict=strict)
    if to == "v2-full":
        return export_v2_full(ckpt, dst, model=model, strict=strict)
    if to == "pt":
        return export_state_dict(ckpt, dst, strict=strict)
    return export_safetensors(ckpt, dst, strict=strict)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: ConvertTarget | None = None,
    compression: Compression = "raw",
    model: torch.nn.Module | None = None,
    strict: bool = False,
    allow_objects: bool = False,
) -> ConvertReport:
    """Convert the checkpoint at ``src`` into ``dst``.

    The source is read as stored (no schema migrations: use :func:`mettaformat.migrate.migrate`
    to bring legacy files to the current form).

    Args:
        src: any format :func:`mettaformat.load_any` reads.
        dst: the file to write; must not be ``src``.
        to: ``mfmt``, ``v1``, ``v2``, ``v2-full``, ``pt`` (state dict) or ``safetensors``;
            default: from ``dst``'s suffix (``.mfmt``, ``.safetensors``).
        compression: ``"zstd"`` for ``mfmt`` only.
        model: live module for ``v1``/``v2-full`` when the source has no module graph.
        strict: refuse instead of reporting content the target cannot carry.
        allow_objects: ``v2`` only, see :func:`mettaformat.legacy.export.export_v2`.

    Returns:
        The report.

    Raises:
        WriteError: ``dst`` is ``src``, no ``to`` and an ambiguous suffix, or as :func:`write_target`.
        FormatError, LegacyImportError, IntegrityError: the source cannot be read.
        OSError: the source cannot be opened.
    """
    # URIs (s3://, https://...) stay strings: a Path would fold their "//".
    src_path = src if is_remote_uri(src) else Path(src)
    dst_path = dst if is_remote_uri(dst) else Path(dst)
    to = to or target_for_path(dst_path)
    if to is None:
        raise WriteError(f"cannot tell the target format from {os.fspath(dst)!r}; pass to= one of {CONVERT_TARGETS}")
    if not isinstance(dst_path, Path) and to != "mfmt":
        raise WriteError(f"{dst}: only mfmt containers are written to a URI; convert to a local file first")
    if isinstance(src_path, Path) and isinstance(dst_path, Path):
        refuse_overwriting_input(dst_path, src_path, command="convert")
    elif os.fspath(src) == os.fspath(dst):
        raise WriteError(f"{dst}: refusing to overwrite the source; write elsewhere (or use migrate)")
    source_format = sniff_format(src_path)
    ckpt = load_any(src_path, migrate=False)
    report = write_target(
        ckpt, dst_path, to, compression=compression, model=model, strict=strict, allow_objects=allow_objects
    )
    return ConvertReport(
        src=os.fspath(src),
        dst=os.fspath(dst),
        source_format=source_format,
        shape=ckpt.provenance.get("shape"),
        target=to,
        tensors=len(ckpt.tensors),
        bytes_in=_size(src_path),
        bytes_out=_size(dst_path),
        not_carried=report.not_carried,
        notes=report.notes,
    )


def _size(path: str | os.PathLike[str]) -> int:
    """A file's or remote object's size, or the total of a distributed checkpoint directory's files."""
    if is_remote_uri(path):
        return size_of(path)
    path = Path(path)
    if path.is_dir():
        from mettaformat.dcp.consolidate import directory_bytes

        return directory_bytes(path)
    return path.stat().st_size
