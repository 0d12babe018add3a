"""Byte-level builders for hostile inputs: a tiny pickle assembler, zip and legacy-stream writers.

Everything here writes bytes; nothing loads them.
"""

from __future__ import annotations

import pickle
import struct
import zlib
from dataclasses import dataclass, field

# -- pickle assembler (protocol-2 opcodes unless noted) -----------------------------------------
PROTO2 = b"\x80\x02"
MARK = b"("
STOP = b"."
NONE = b"N"
TRUE = b"\x88"
FALSE = b"\x89"
EMPTY_DICT = b"}"
EMPTY_TUPLE = b")"
EMPTY_LIST = b"]"
REDUCE = b"R"
NEWOBJ = b"\x81"
BUILD = b"b"
BINPERSID = b"Q"
TUPLE = b"t"


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def uni(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def int_(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def tup(*parts: bytes) -> bytes:
    return MARK + b"".join(parts) + TUPLE


def ordered_dict() -> bytes:
    return glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + REDUCE


def storage_pid(
    key: str = "0", numel: int = 4, cls: str = "FloatStorage", location: str = "cpu", tag: str = "storage"
) -> bytes:
    return tup(uni(tag), glob("torch", cls), uni(key), uni(location), int_(numel)) + BINPERSID


def tensor(
    pid: bytes,
    offset: int = 0,
    size: tuple[int, ...] = (4,),
    stride: tuple[int, ...] = (1,),
    fn: str = "_rebuild_tensor_v2",
) -> bytes:
    return call(
        glob("torch._utils", fn),
        pid,
        int_(offset),
        tup(*map(int_, size)),
        tup(*map(int_, stride)),
        FALSE,
        ordered_dict(),
    )


def state_dict_pickle(**tensors: bytes) -> bytes:
    body = b"".join(uni(k) + v for k, v in tensors.items())
    return PROTO2 + EMPTY_DICT + MARK + body + b"u" + STOP


# -- zip writer with full control over every header field ---------------------------------------
@dataclass
class Entry:
    name: str
    data: bytes
    local_name: str | None = None
    flags: int = 0
    method: int = 0
    crc: int | None = None
    external_attr: int = 0
    header_offset: int | None = None
    size: int | None = None


@dataclass
class ZipSpec:
    entries: list[Entry] = field(default_factory=list)
    prefix_junk: bytes = b""


def build_zip(spec: ZipSpec) -> bytes:
    out = bytearray(spec.prefix_junk)
    central = bytearray()
    for e in spec.entries:
        offset = len(out)
        crc = zlib.crc32(e.data) if e.crc is None else e.crc
        size = len(e.data) if e.size is None else e.size
        lname = (e.local_name if e.local_name is not None else e.name).encode("utf-8", "surrogatepass")
        out += struct.pack(
            "<4sHHHHHIIIHH", b"PK\x03\x04", 20, e.flags, e.method, 0, 0x21, crc, size, size, len(lname), 0
        )
        out += lname + e.data
        cname = e.name.encode("utf-8", "surrogatepass")
        hoff = offset if e.header_offset is None else e.header_offset
        central += struct.pack(
            "<4sHHHHHHIIIHHHHHII",
            b"PK\x01\x02",
            0x031E,
            20,
            e.flags,
            e.method,
            0,
            0x21,
            crc,
            size,
            size,
            len(cname),
            0,
            0,
            0,
            0,
            e.external_attr,
            hoff,
        )
        central += cname
    cd_offset = len(out)
    out += central
    n = len(spec.entries)
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(central), cd_offset, 0)
    return bytes(out)


def torch_zip(
    pkl: bytes,
    records: dict[str, bytes] | None = None,
    *,
    prefix: str = "archive",
    byteorder: bytes | None = b"little",
    extra: list[Entry] | None = None,
) -> bytes:
    entries = [Entry(f"{prefix}/data.pkl", pkl)]
    if byteorder is not None:
        entries.append(Entry(f"{prefix}/byteorder", byteorder))
    for key, data in (records or {}).items():
        entries.append(Entry(f"{prefix}/data/{key}", data))
    entries.append(Entry(f"{prefix}/version", b"3\n"))
    entries += extra or []
    return build_zip(ZipSpec(entries))


# -- legacy stream writer -----------------------------------------------------------------------
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def legacy_pid(key: str, numel: int, cls: str = "FloatStorage", view: bytes = NONE) -> bytes:
    return tup(uni("storage"), glob("torch", cls), uni(key), uni("cpu"), int_(numel), view) + BINPERSID


def legacy_stream(
    main: bytes, keys: list[str], storages: list[tuple[int, bytes]], *, magic: int = LEGACY_MAGIC, protocol: int = 1001
) -> bytes:
    out = pickle.dumps(magic, protocol=2) + pickle.dumps(protocol, protocol=2)
    out += pickle.dumps(
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2
    )
    out += main + pickle.dumps(keys, protocol=2)
    for count, raw in storages:
        out += struct.pack("<q", count) + raw
    return out
