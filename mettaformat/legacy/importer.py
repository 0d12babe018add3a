"""Entry points: sniff a legacy torch file, and import it into a :class:`Checkpoint`.

Nothing here calls ``torch.load``: the container is parsed by :mod:`.torchzip` or
:mod:`.legacy_stream`, the pickle by our own VM (:mod:`.unpickler`), and the result is
recognised by :mod:`.metta`.
"""

from __future__ import annotations

import gc
import os
from typing import Any, Final, Literal, NoReturn

from mettaformat._files import read_regular
from mettaformat.checkpoint import Checkpoint
from mettaformat.errors import LegacyFormatError, LegacyUnsupportedError, naming_file
from mettaformat.legacy.legacy_stream import load_legacy_stream
from mettaformat.legacy.limits import DEFAULT_LIMITS, LegacyLimits
from mettaformat.legacy.metta import LoadedPickle, to_checkpoint
from mettaformat.legacy.torchzip import ZIP_MAGIC, load_torch_zip, open_torch_zip

__all__ = ["LEGACY_STREAM_SIGNATURES", "LegacySourceFormat", "import_legacy", "import_legacy_bytes", "sniff"]

LegacySourceFormat = Literal["torch-zip", "torch-legacy-stream"]

#: The magic-number pickle that opens every legacy stream, as written with protocols 2 to 5
#: (``pickle.dumps(0x1950a86a20f9469cfc6c, protocol=p)``; torch's default is 2).
LEGACY_STREAM_SIGNATURES: Final = (
    b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
    b"\x80\x03\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
    b"\x80\x04\x95\r\x00\x00\x00\x00\x00\x00\x00\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
    b"\x80\x05\x95\r\x00\x00\x00\x00\x00\x00\x00\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
)
#: Wrappers recognised only to say why a file is refused: we never unwrap (threat model AR12).
_WRAPPERS: Final = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ\x00": "xz",
    b"BZh": "bzip2",
    b"7z\xbc\xaf\x27\x1c": "7z",
    b"\x04\x22\x4d\x18": "lz4",
    b"Rar!": "rar",
}
_SNIFF_BYTES: Final = 512


def sniff(head: bytes) -> LegacySourceFormat | None:
    """Identify a legacy torch file from its first bytes, by exact signatures only.

    Args:
        head: the first bytes of the file (at least 4 for zips, 26 for legacy streams).

    Returns:
        ``"torch-zip"``, ``"torch-legacy-stream"`` or None.
    """
    if head.startswith(ZIP_MAGIC):
        return "torch-zip"
    if any(head.startswith(sig) for sig in LEGACY_STREAM_SIGNATURES):
        return "torch-legacy-stream"
    return None


def import_legacy(path: str | os.PathLike[str], *, limits: LegacyLimits = DEFAULT_LIMITS) -> Checkpoint:
    """Import a legacy torch checkpoint file (any Metta era) without running its pickle.

    Args:
        path: the ``.pt`` file.
        limits: resource caps.

    Returns:
        The checkpoint, with ``provenance`` describing what was recognised.

    Raises:
        OSError: the file cannot be read.
        LegacyImportError: every import failure; the subclasses
            :class:`~mettaformat.errors.LegacyFormatError` (malformed),
            :class:`~mettaformat.errors.LegacyLimitError` (a cap was hit),
            :class:`~mettaformat.errors.LegacyUnsupportedError` (TorchScript, tar,
            wrapped files, sparse tensors...) and ``UnsafeContentError`` say why.
    """
    with naming_file(path):
        return _import(read_regular(path), limits)


def import_legacy_bytes(data: bytes | bytearray | memoryview, *, limits: LegacyLimits = DEFAULT_LIMITS) -> Checkpoint:
    """Import a legacy torch checkpoint held in memory.

    The bytes are copied once so that tensors can share a writable buffer.

    Args:
        data: the file content.
        limits: resource caps.

    Returns:
        The checkpoint.

    Raises:
        LegacyImportError: as :func:`import_legacy`.
    """
    return _import(bytearray(data), limits)


def _import(buf: bytearray, limits: LegacyLimits) -> Checkpoint:
    # The VM allocates thousands of small containers; letting the cyclic collector scan the
    # whole heap every few hundred allocations costs more than the interpretation itself.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _import_unguarded(buf, limits)
    finally:
        if was_enabled:
            gc.enable()


def _import_unguarded(buf: bytearray, limits: LegacyLimits) -> Checkpoint:
    kind = sniff(bytes(buf[:_SNIFF_BYTES]))
    if kind == "torch-zip":
        zip_ = open_torch_zip(buf, limits=limits)
        value, seen = load_torch_zip(zip_, limits=limits)
        extra: dict[str, Any] = {"zip_prefix": zip_.prefix, "byteorder": "big" if zip_.big_endian else "little"}
    elif kind == "torch-legacy-stream":
        value, seen, stream = load_legacy_stream(buf, limits=limits)
        extra = {"sys_info": stream.sys_info}
        if stream.container_sources:
            extra["container_sources"] = stream.container_sources
    else:
        _refuse(buf)
    return to_checkpoint(LoadedPickle(value, seen, kind, extra), limits=limits)


def _refuse(buf: bytearray) -> NoReturn:
    head = bytes(buf[:_SNIFF_BYTES])
    for magic, name in _WRAPPERS.items():
        if head.startswith(magic):
            raise LegacyUnsupportedError(
                f"{name}-wrapped file; unwrap it yourself, the importer never does", region="file", offset=0
            )
    if len(buf) >= 262 and bytes(buf[257:262]) == b"ustar":
        raise LegacyUnsupportedError(
            "tar-format torch file (torch < 0.1.10) is not supported", region="file", offset=257
        )
    raise LegacyFormatError("not a torch checkpoint (neither a zip nor a legacy stream)", region="file", offset=0)
