"""torch's zip checkpoint format (torch >= 1.6), read with strict checks of our own.

:mod:`zipfile` is used only to parse the central directory. Everything a reader could be
fooled by is checked here first (threat model AR1-AR11, PK21, PK26, PK28): one top-level prefix, one
``data.pkl``, safe names, no duplicates, local headers that agree with the central directory,
no encryption or odd flag bits, stored (uncompressed) members only, no overlaps, no symlinks,
CRCs, a bounded entry count. Storage records become tensors that share memory with the input
buffer; nothing is extracted to disk.
"""

from __future__ import annotations

import io
import itertools
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from mettaformat.errors import LegacyFormatError, LegacyLimitError, LegacyUnsupportedError
from mettaformat.legacy.describe import describe
from mettaformat.legacy.limits import DEFAULT_LIMITS, LegacyLimits
from mettaformat.legacy.tensors import StorageRef, check_storage_type, tensor_from_buffer
from mettaformat.legacy.unpickler import PickleVM

__all__ = ["ZIP_MAGIC", "TorchZip", "load_torch_zip", "open_torch_zip"]

ZIP_MAGIC: Final = b"PK\x03\x04"
_REGION: Final = "zip"
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_EOCD_MAGIC: Final = b"PK\x05\x06"
_EOCD = struct.Struct("<4sHHHHIIH")
_ZIP64_LOCATOR_MAGIC: Final = b"PK\x06\x07"
_ZIP64_LOCATOR = struct.Struct("<4sIQI")
_ZIP64_EOCD_MAGIC: Final = b"PK\x06\x06"
_ZIP64_EOCD = struct.Struct("<4sQHHIIQQQQ")
#: Data descriptor (bit 3, torch sets it) and UTF-8 names (bit 11); any other bit is refused.
_ALLOWED_FLAGS: Final = 0x0808
_S_IFMT: Final = 0o170000
_S_IFLNK: Final = 0o120000
_KNOWN_MEMBERS: Final = frozenset({"data.pkl", "version", "byteorder", ".format_version", ".storage_alignment"})
_DATA_RECORD = re.compile(r"data/\d{1,20}")
_DRIVE = re.compile(r"[A-Za-z]:")
_MAX_FILE_VERSION: Final = 64


@dataclass(frozen=True)
class TorchZip:
    """A validated torch zip archive held in memory.

    Attributes:
        buffer: the whole file (storages are views into it).
        prefix: the single top-level folder (``model_0050.pt``, ``archive``...).
        records: member name below the prefix -> ``(data offset, size)`` in ``buffer``.
        big_endian: the ``byteorder`` record says ``big`` (storages are byteswapped).
    """

    buffer: bytearray
    prefix: str
    records: Mapping[str, tuple[int, int]]
    big_endian: bool

    def read(self, name: str) -> bytes:
        """Return a copy of the member ``name`` (relative to the prefix)."""
        start, size = self.records[name]
        return bytes(self.buffer[start : start + size])


class _BufferFile(io.RawIOBase):
    """A seekable read-only file over a buffer, so zipfile reads without copying it."""

    def __init__(self, buf: bytearray) -> None:
        self._view = memoryview(buf)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b: Any) -> int:
        chunk = self._view[self._pos : self._pos + len(b)]
        n = len(chunk)
        b[:n] = chunk
        self._pos += n
        return n


def _check_name(name: str) -> None:
    # AR2: never trust a member name as a path, even though nothing is extracted.
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or _DRIVE.match(name)
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise LegacyFormatError(f"unsafe member name {name!r}", region=_REGION)


def _central_directory(buf: bytearray, limits: LegacyLimits) -> int:
    """Locate the central directory as torch's reader (miniz) does, and return its offset.

    miniz takes the last end-of-central-directory signature with a whole record after it,
    within the last 64 KiB, and reads the directory at the offset that record states.
    :mod:`zipfile` instead shifts every offset by the bytes it finds before the directory
    (to allow prepended data). The two readers see the same archive only when the directory
    ends exactly where the end records begin and nothing follows the record's comment; any
    other file (a decoy archive appended, or hidden in the comment) is refused as ambiguous.
    """
    tail_start = max(0, len(buf) - (1 << 16) - _EOCD.size)
    last = len(buf) - _EOCD.size  # the last offset with a whole record after it
    # (a negative end would count from the end of the buffer and find a record cut short)
    at = buf.rfind(_EOCD_MAGIC, tail_start, last + 4) if last >= 0 else -1
    if at < 0:
        raise LegacyFormatError("no zip central directory (truncated file?)", region=_REGION)
    _sig, disk, cd_disk, _here, entries, cd_size, cd_offset, comment = _EOCD.unpack_from(buf, at)
    if at + _EOCD.size + comment != len(buf):
        raise LegacyFormatError(
            f"{len(buf) - at - _EOCD.size - comment} bytes after the end of the zip archive (an appended archive?)",
            region=_REGION,
            offset=at,
        )
    end_records = at
    locator = at - _ZIP64_LOCATOR.size
    # torch writes zip64 end records into every archive; miniz reads them when the locator is there.
    if locator >= 0 and buf[locator : locator + 4] == _ZIP64_LOCATOR_MAGIC:
        end_records = _ZIP64_LOCATOR.unpack_from(buf, locator)[2]
        if end_records + _ZIP64_EOCD.size > locator or buf[end_records : end_records + 4] != _ZIP64_EOCD_MAGIC:
            raise LegacyFormatError("zip64 end record is not where its locator says", region=_REGION, offset=locator)
        _sig, _size, _made, _need, disk, cd_disk, _here, entries, cd_size, cd_offset = _ZIP64_EOCD.unpack_from(
            buf, end_records
        )
    elif 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
        raise LegacyFormatError("zip64 sizes without a zip64 locator", region=_REGION, offset=at)
    if disk or cd_disk:
        raise LegacyFormatError("multi-disk zip archive", region=_REGION, offset=at)
    if cd_offset + cd_size != end_records:
        raise LegacyFormatError(
            f"the central directory [{cd_offset}, +{cd_size}) does not end where the end record begins "
            f"({end_records}): data before the archive or a decoy archive; torch and zip readers would disagree",
            region=_REGION,
            offset=at,
        )
    if entries > limits.max_zip_entries:
        raise LegacyLimitError("zip entries", entries, limits.max_zip_entries, region=_REGION)
    return int(cd_offset)


def open_torch_zip(buf: bytearray, *, limits: LegacyLimits = DEFAULT_LIMITS) -> TorchZip:
    """Validate a torch zip archive and index its members.

    Args:
        buf: the whole file.
        limits: resource caps.

    Returns:
        The validated archive.

    Raises:
        LegacyFormatError: a malformed or ambiguous archive (AR1-AR5, AR8-AR11).
        LegacyLimitError: too many entries (AR7).
        LegacyUnsupportedError: compressed members (AR6), TorchScript archives (PK28),
            torch.package archives, unknown format versions.
    """
    if bytes(buf[:4]) != ZIP_MAGIC:
        raise LegacyFormatError("not a zip archive", region=_REGION, offset=0)
    cd_start = _central_directory(buf, limits)
    try:
        with zipfile.ZipFile(_BufferFile(buf)) as zf:
            infos = zf.infolist()
            if getattr(zf, "start_dir", cd_start) != cd_start:
                raise LegacyFormatError("zip readers disagree on where the central directory is", region=_REGION)
    # zipfile raises NotImplementedError for archive versions and features it does not know.
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, struct.error, EOFError, KeyError,
            NotImplementedError) as e:
        raise LegacyFormatError(f"unreadable zip central directory: {e}", region=_REGION) from e
    if len(infos) > limits.max_zip_entries:
        raise LegacyLimitError("zip entries", len(infos), limits.max_zip_entries, region=_REGION)
    if not infos:
        raise LegacyFormatError("empty zip archive", region=_REGION)
    # Names first: a TorchScript or torch.package archive gets its own clear message even when
    # its members would also fail the checks below (TorchScript compresses its code/ files).
    _check_members({info.orig_filename.partition("/")[2] for info in infos})
    prefix = ""
    seen: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    records: dict[str, tuple[int, int]] = {}
    for info in infos:
        name = info.orig_filename
        _check_name(name)
        if name in seen:
            raise LegacyFormatError(f"duplicate member {name!r}", region=_REGION)
        seen.add(name)
        head, _, rel = name.partition("/")
        if not rel:
            raise LegacyFormatError(f"member {name!r} is not inside a top-level folder", region=_REGION)
        prefix = prefix or head
        if head != prefix:
            raise LegacyFormatError(f"members under two prefixes: {prefix!r} and {head!r}", region=_REGION)
        region = f"zip member {name!r}"
        if info.flag_bits & 0x1:
            raise LegacyFormatError("encrypted member", region=region)
        if info.flag_bits & ~_ALLOWED_FLAGS:
            raise LegacyFormatError(f"unexpected flag bits 0x{info.flag_bits:04x}", region=region)
        if info.compress_type != zipfile.ZIP_STORED:
            raise LegacyUnsupportedError(
                f"compressed member (method {info.compress_type}); torch stores members uncompressed", region=region
            )
        if (info.external_attr >> 16) & _S_IFMT == _S_IFLNK:
            raise LegacyFormatError("member is a symbolic link", region=region)
        if info.file_size != info.compress_size:
            raise LegacyFormatError("stored member whose sizes differ", region=region)
        start = _check_local_header(buf, info, region)
        end = start + info.compress_size
        if end > cd_start or end > len(buf):
            raise LegacyFormatError(f"member data [{start}, {end}) runs into the central directory", region=region)
        spans.append((info.header_offset, end, name))
        records[rel] = (start, info.file_size)
    spans.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        if start < end:
            raise LegacyFormatError(f"members {a!r} and {b!r} overlap", region=_REGION, offset=start)
    if "data.pkl" not in records:
        raise LegacyFormatError("archive has no data.pkl", region=_REGION)
    _check_crcs(buf, [(i.orig_filename, *records[i.orig_filename.partition("/")[2]], i.CRC) for i in infos])
    zip_ = TorchZip(buf, prefix, records, _byteorder_is_big(buf, records))
    if "version" in records:
        text = zip_.read("version").strip()
        if not text.isdigit() or not 1 <= int(text) <= _MAX_FILE_VERSION:
            raise LegacyUnsupportedError(f"torch zip file version {text[:16]!r}", region=f"{prefix}/version")
    return zip_


def _check_local_header(buf: bytearray, info: zipfile.ZipInfo, region: str) -> int:
    h = info.header_offset
    if h < 0 or h + _LOCAL.size > len(buf):
        raise LegacyFormatError("local header outside the file", region=region, offset=h)
    sig, _ver, flags, method, _t, _d, crc, csize, usize, nlen, elen = _LOCAL.unpack_from(buf, h)
    if sig != ZIP_MAGIC:
        raise LegacyFormatError("bad local header signature", region=region, offset=h)
    raw_name = bytes(buf[h + _LOCAL.size : h + _LOCAL.size + nlen])
    expected = info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    if raw_name != expected or flags != info.flag_bits or method != info.compress_type:
        # AR4: a reader that trusts the local header would see a different file.
        raise LegacyFormatError("local header disagrees with the central directory", region=region, offset=h)
    if not flags & 0x8 and (crc, csize, usize) != (info.CRC, info.compress_size, info.file_size):
        if 0xFFFFFFFF not in (csize, usize):
            raise LegacyFormatError(
                "local header sizes or CRC disagree with the central directory", region=region, offset=h
            )
    return int(h + _LOCAL.size + nlen + elen)


def _check_members(names: set[str]) -> None:
    for rel in names - {""}:  # members outside any folder are reported by the caller
        if rel.startswith("code/") or rel in ("constants.pkl", "bytecode.pkl") or rel.endswith((".debug_pkl", ".py")):
            raise LegacyUnsupportedError(
                "TorchScript archive (code/, constants.pkl); export its state_dict instead", region=_REGION
            )
        if rel == ".data/extern_modules":
            raise LegacyUnsupportedError("torch.package archive", region=_REGION)
        if rel not in _KNOWN_MEMBERS and not rel.startswith(".data/") and not _DATA_RECORD.fullmatch(rel):
            raise LegacyFormatError(f"unexpected member {rel!r} in a torch archive", region=_REGION)


def _check_crcs(buf: bytearray, crcs: Iterable[tuple[str, int, int, int]]) -> None:
    # torch writes CRC-32 unless told not to (then the field is 0); verify when present.
    view = memoryview(buf)
    for name, start, size, crc in crcs:
        if crc == 0 and size:
            continue
        if zlib.crc32(view[start : start + size]) != crc:
            raise LegacyFormatError("CRC-32 mismatch", region=f"zip member {name!r}", offset=start)


def _byteorder_is_big(buf: bytearray, records: Mapping[str, tuple[int, int]]) -> bool:
    if "byteorder" not in records:
        return False  # torch < 2.1 wrote no byteorder record and only little-endian data (PK26)
    start, size = records["byteorder"]
    text = bytes(buf[start : start + size])
    if text not in (b"little", b"big"):
        raise LegacyFormatError(f"byteorder record {text[:16]!r}", region="byteorder")
    return text == b"big"


def load_torch_zip(zip_: TorchZip, *, limits: LegacyLimits = DEFAULT_LIMITS) -> tuple[Any, set[tuple[str, str]]]:
    """Interpret ``data.pkl`` of a validated archive, resolving storages to shared tensors.

    Args:
        zip_: the archive from :func:`open_torch_zip`.
        limits: resource caps.

    Returns:
        ``(value, globals_seen)``.

    Raises:
        LegacyFormatError: malformed pickle, bad storage ids (PK9), storage sizes that do not
            match their records (PK21), out-of-bounds views (PK22).
        LegacyUnsupportedError: unknown storage classes (PK24), unsupported tensor kinds (PK25).
        LegacyLimitError, UnsafeContentError: see :class:`PickleVM`.
    """
    start, size = zip_.records["data.pkl"]
    region = f"{zip_.prefix}/data.pkl"
    vm = PickleVM(zip_.buffer, start=start, end=start + size, region=region, limits=limits)
    storages: dict[str, StorageRef] = {}

    def persistent_load(pid: tuple[Any, ...]) -> StorageRef:
        if len(pid) != 5 or pid[0] != "storage":
            vm.fail(f"persistent id must be ('storage', type, key, location, numel), got {len(pid)} fields")
        _, stype, key, location, numel = pid
        stype = check_storage_type(stype, region=region, offset=vm.offset)
        if type(key) is not str or not key.isascii() or not key.isdigit() or len(key) > 20:
            vm.fail(f"storage key {describe(key)} is not a decimal string")
        if type(location) is not str or type(numel) is not int or numel < 0:
            vm.fail("storage location must be a str and numel a non-negative int")
        known = storages.get(key)
        if known is not None:
            if known.dtype != stype.dtype or known.numel != numel:
                vm.fail(f"storage {key} is named with two different types or sizes")
            return known
        span = zip_.records.get(f"data/{key}")
        if span is None:
            vm.fail(f"storage record data/{key} is missing")
        if numel * stype.dtype.itemsize != span[1]:
            vm.fail(f"storage {key}: {numel} x {stype.dtype} is not the record's {span[1]} bytes")
        tensor = tensor_from_buffer(
            zip_.buffer, span[0], numel, stype.dtype, swap=zip_.big_endian, region=f"data/{key}"
        )
        ref = StorageRef(key, stype.dtype, tensor, stype.untyped)
        storages[key] = ref
        return ref

    vm.persistent_load = persistent_load
    try:
        return vm.run(), vm.globals_seen
    finally:
        vm.persistent_load = None  # it closes over the VM: no cycle outlives the run
