"""``load_any``: one entry point for every checkpoint format, routed by strict signatures.

:func:`sniff_format` (:mod:`mettaformat.signatures`) names the format from the first bytes, and
only that format's parser ever sees the file: a container, a legacy torch checkpoint (imported by
the safe importer, nothing in it executed), a ``.safetensors`` file or a distributed checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mettaformat._torch import storage_key
from mettaformat.checkpoint import Checkpoint
from mettaformat.checkpoint_io import read_checkpoint
from mettaformat.errors import FormatError, naming_file
from mettaformat.fields import check_checkpoint
from mettaformat.migrations import apply_migrations
from mettaformat.remote.uri import is_remote_uri
from mettaformat.signatures import FormatName, format_of, sniff_format

__all__ = ["FormatName", "format_of", "load_any", "sniff_format"]


def _to_device(tensors: Any, device: str | torch.device) -> dict[str, torch.Tensor]:
    """Move tensors, keeping tied ones (the same view of the same storage) one tensor."""
    moved: dict[Any, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        key = storage_key(t) or id(t)
        if key not in moved:
            moved[key] = t.to(device)
        out[name] = moved[key]
    return out


def load_any(
    path: str | os.PathLike[str],
    *,
    migrate: bool = True,
    device: str | torch.device = "cpu",
    lazy: bool = True,
) -> Checkpoint:
    """Load any supported checkpoint into a :class:`Checkpoint`.

    Args:
        path: a ``.mfmt`` container, a legacy Metta ``.pt`` file (v1 PolicyRecord, v2 dict,
            raw state dict, bare module, trainer state), a ``.safetensors`` file, or a
            distributed checkpoint directory (consolidated; see :mod:`mettaformat.dcp`); a local
            path or a URI (``s3://``, ``gs://``, ``https://``...).
        migrate: apply registered schema migrations (with a warning each); False shows the
            checkpoint exactly as stored.
        device: where to place tensors.
        lazy: keep container weights as zero-copy views, read on access.

    Raises:
        FormatError: unknown format, or a malformed file (the error names where).
        LegacyImportError: a legacy file that cannot be imported safely.
        IntegrityError: a damaged container.

    Example:
        >>> ckpt = mettaformat.load_any("model_0050.pt")
        >>> ckpt.metadata["epoch"], len(ckpt.tensors)
    """
    with naming_file(path):
        if is_remote_uri(path):
            from mettaformat.remote.formats import read_remote

            ckpt, kind = read_remote(os.fspath(path), device=device, lazy=lazy)
            ckpt.uri = ckpt.uri or os.fspath(path)
        else:
            ckpt, kind = _read_local(path, device=device, lazy=lazy)
        check_checkpoint(ckpt)  # a legacy or safetensors file's fields too, before anything uses them
        if torch.device(device).type != "cpu" and kind != "mettaformat":
            ckpt.tensors = _to_device(ckpt.tensors, device)
        if migrate:
            apply_migrations(ckpt, source=os.fspath(path))
    return ckpt


def _read_local(
    path: str | os.PathLike[str], *, device: str | torch.device, lazy: bool
) -> tuple[Checkpoint, FormatName]:
    kind = sniff_format(path)
    if kind == "mettaformat":
        ckpt = read_checkpoint(path, device=device, lazy=lazy)
    elif kind == "safetensors":
        ckpt = _read_safetensors(path)
    elif kind in ("dcp", "torch-dcp"):
        from mettaformat.dcp.consolidate import read_dcp

        ckpt = read_dcp(path)
    else:
        from mettaformat.legacy import import_legacy

        ckpt = import_legacy(path)
    ckpt.uri = ckpt.uri or Path(path).resolve().as_uri()
    return ckpt, kind


def _read_safetensors(path: str | os.PathLike[str]) -> Checkpoint:
    import safetensors
    import safetensors.torch

    try:
        with safetensors.safe_open(os.fspath(path), "pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = safetensors.torch.load_file(os.fspath(path))
    except Exception as e:  # safetensors raises its own SafetensorError / OSError variants
        raise FormatError(f"{path}: invalid safetensors file: {e}", region="safetensors") from e
    return safetensors_checkpoint(tensors, metadata, where=str(path))


def safetensors_checkpoint(tensors: dict[str, torch.Tensor], metadata: dict[str, str], *, where: str) -> Checkpoint:
    """The :class:`Checkpoint` of a plain safetensors file's tensors and string metadata."""
    from mettaformat.container.stream_json import parse_alias_metadata

    aliases = parse_alias_metadata(metadata.pop("mettaformat.aliases", "{}"), tensors, region=f"{where} __metadata__")
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    metadata.pop("format", None)
    return Checkpoint(
        tensors=tensors,
        metadata=dict(metadata),
        versions={"checkpoint_format": None},
        provenance={"source_format": "safetensors", "shape": "state_dict"},
    )
