"""The commit index of a distributed checkpoint directory, and the names of its files.

A directory holds one container per rank and save (``__<rank>_<save id>.mfmt``) and one index,
``dcp_index.msgpack``, written last by the coordinator. The index is what makes a save
visible: it names the files of the committed save with their sizes and header checksums, the
global dtype and shape of every tensor, and the names of the non-tensor items. Files of a save
that never committed (a rank died) are not named by it, so readers never see them.

The index is a msgpack map ``{"format", "version", "body", "checksum"}``; ``body`` is itself
msgpack bytes, so the checksum covers exactly what is parsed.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack

from mettaformat._atomic import atomic_fd
from mettaformat.constants import MAX_INDEX_SIZE, MAX_NAME_BYTES, MAX_TREE_DEPTH
from mettaformat.container.layout import checksum
from mettaformat.container.tree import decode_tree, encode_tree
from mettaformat.dtypes import dtype_from_tag
from mettaformat.errors import FormatError, HeaderError, IntegrityError

__all__ = [
    "INDEX_NAME",
    "TORCH_METADATA_NAME",
    "DcpIndex",
    "FileRecord",
    "TensorRecord",
    "is_rank_file",
    "rank_file_name",
    "rank_of",
    "read_index",
    "write_index",
]

INDEX_NAME: Final = "dcp_index.msgpack"
#: torch's FileSystemWriter commits with this (pickled) file; we never unpickle it with pickle.
TORCH_METADATA_NAME: Final = ".metadata"
FORMAT_NAME: Final = "mettaformat-dcp"
FORMAT_VERSION: Final = 1
MAX_DIMS: Final = 64

_RANK_FILE: Final = re.compile(r"__(\d{1,6})_([0-9a-f]{8,32})\.mfmt")


def rank_file_name(rank: int, save_id: str) -> str:
    return f"__{rank}_{save_id}.mfmt"


def is_rank_file(name: str) -> bool:
    return _RANK_FILE.fullmatch(name) is not None


def rank_of(name: str) -> int | None:
    """The rank that wrote the rank file ``name``; None if ``name`` is not a rank file's."""
    match = _RANK_FILE.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class FileRecord:
    """One rank's container as the index names it."""

    name: str
    size: int
    header_checksum: int


@dataclass(frozen=True)
class TensorRecord:
    """A tensor of the global state dict: its dtype tag (``"F32"``) and global shape."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class DcpIndex:
    """The parsed commit index.

    Attributes:
        save_id: hex id shared by the files of this save.
        files: the rank containers, by name.
        tensors: fully qualified name to global dtype and shape.
        objects: fully qualified names of the non-tensor items.
        planner_data: DCP's flattening map (name to the key path in the nested state dict).
    """

    save_id: str
    files: dict[str, FileRecord]
    tensors: dict[str, TensorRecord]
    objects: tuple[str, ...]
    planner_data: Any = None

    def to_msgpack(self) -> dict[str, Any]:
        return {
            "save_id": self.save_id,
            "files": [
                {"name": f.name, "size": f.size, "header_checksum": f.header_checksum} for f in self.files.values()
            ],
            "tensors": {k: {"dtype": t.dtype, "shape": list(t.shape)} for k, t in self.tensors.items()},
            "objects": list(self.objects),
            "planner_data": encode_tree(self.planner_data),
        }


def write_index(directory: Path, index: DcpIndex, *, durable: bool = False) -> None:
    """Commit ``index`` atomically: readers see the previous index or this one, never a mix."""
    body = msgpack.packb(index.to_msgpack(), use_bin_type=True)
    data = msgpack.packb(
        {"format": FORMAT_NAME, "version": FORMAT_VERSION, "body": body, "checksum": checksum(body)},
        use_bin_type=True,
    )
    with atomic_fd(directory / INDEX_NAME, durable=durable) as fd:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def _unpack(data: bytes, where: str) -> Any:
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise HeaderError(f"malformed msgpack: {e}", path=where, region="index") from None


def read_index(directory: Path) -> DcpIndex:
    """Read and check the commit index of ``directory``.

    Raises:
        FormatError: no index (nothing committed, or not our layout), or a malformed one.
        IntegrityError: the index body does not match its checksum.
    """
    path = directory / INDEX_NAME
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        hint = ""
        if (directory / TORCH_METADATA_NAME).exists():
            hint = (
                "; it looks like torch's FileSystemWriter layout (a pickled .metadata), which is never "
                "unpickled here: convert it with `mettaformat convert DIR out.mfmt`"
            )
        elif not directory.is_dir():
            hint = "; it is not a directory"
        raise FormatError(f"{directory} holds no committed distributed checkpoint ({INDEX_NAME} missing){hint}",
                          region="index") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{where} is not a regular file", region="index")
        if st.st_size > MAX_INDEX_SIZE:
            raise FormatError(f"{where} has {st.st_size} bytes, more than the {MAX_INDEX_SIZE} allowed",
                              region="index")
        os.set_blocking(fd, True)
        data = os.pread(fd, st.st_size, 0)
    finally:
        os.close(fd)
    outer = _unpack(data, where)
    if not isinstance(outer, dict) or outer.get("format") != FORMAT_NAME:
        raise HeaderError(f"not a {FORMAT_NAME} index", path=where, region="index")
    if outer.get("version") != FORMAT_VERSION:
        raise FormatError(f"{where}: index version {outer.get('version')!r} is not {FORMAT_VERSION}", region="index")
    body = outer.get("body")
    if not isinstance(body, bytes) or outer.get("checksum") != checksum(body):
        raise IntegrityError(f"{where}: index body does not match its checksum", region="index")
    return _parse_body(_unpack(body, where), where)


def _fail(where: str, message: str) -> FormatError:
    return HeaderError(message, path=where, region="index")


def _name(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str) or not value or len(value.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise _fail(where, f"{what} must be a non-empty string of at most {MAX_NAME_BYTES} bytes")
    return value


def _uint(value: Any, where: str, what: str) -> int:
    if type(value) is not int or value < 0:
        raise _fail(where, f"{what} must be a non-negative integer, got {value!r:.40}")
    return value


def parse_shape(value: Any, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise _fail(where, f"{what} must be a list of at most {MAX_DIMS} integers")
    return tuple(_uint(v, where, what) for v in value)


def _parse_body(body: Any, where: str) -> DcpIndex:
    if not isinstance(body, dict):
        raise _fail(where, "index body must be a map")
    save_id = body.get("save_id")
    if not isinstance(save_id, str) or not re.fullmatch(r"[0-9a-f]{8,32}", save_id):
        raise _fail(where, "save_id must be 8 to 32 hex digits")
    files: dict[str, FileRecord] = {}
    raw_files = body.get("files")
    if not isinstance(raw_files, list):
        raise _fail(where, "files must be a list")
    for raw in raw_files:
        if not isinstance(raw, dict):
            raise _fail(where, "each file record must be a map")
        name = _name(raw.get("name"), where, "file name")
        # The name is joined to the directory: only our own pattern, never a path.
        if not is_rank_file(name) or not name.endswith(f"_{save_id}.mfmt") or name in files:
            raise _fail(where, f"file name {name!r:.80} is not a rank file of save {save_id}, or is repeated")
        files[name] = FileRecord(name, _uint(raw.get("size"), where, "size"),
                                 _uint(raw.get("header_checksum"), where, "header_checksum"))
    raw_tensors = body.get("tensors")
    if not isinstance(raw_tensors, dict):
        raise _fail(where, "tensors must be a map")
    tensors: dict[str, TensorRecord] = {}
    for fqn, raw in raw_tensors.items():
        _name(fqn, where, "tensor name")
        if not isinstance(raw, dict) or not isinstance(raw.get("dtype"), str):
            raise _fail(where, f"tensor {fqn!r:.80} needs a dtype and a shape")
        dtype_from_tag(raw["dtype"], path=where)
        tensors[fqn] = TensorRecord(raw["dtype"], parse_shape(raw.get("shape"), where, f"shape of {fqn!r:.80}"))
    raw_objects = body.get("objects")
    if not isinstance(raw_objects, list):
        raise _fail(where, "objects must be a list")
    objects = tuple(_name(o, where, "object name") for o in raw_objects)
    if len(set(objects)) != len(objects) or set(objects) & tensors.keys():
        raise _fail(where, "an object name is repeated or is also a tensor name")
    planner_data = decode_tree(body.get("planner_data"), path=f"{where}: planner_data")
    _check_planner_data(planner_data, where)
    return DcpIndex(save_id, files, tensors, objects, planner_data)


def _check_planner_data(value: Any, where: str) -> None:
    """DCP's flattening map: name to a tuple of str/int keys (or nothing)."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise _fail(where, "planner_data must be a map")
    for key, path in value.items():
        if (
            not isinstance(key, str)
            or not isinstance(path, tuple)
            or len(path) > MAX_TREE_DEPTH
            or not all(type(p) in (str, int) for p in path)
        ):
            raise _fail(where, f"planner_data entry {key!r:.80} must map to a tuple of names and indices")
