"""torch's pre-1.6 serialization stream (``_use_new_zipfile_serialization=False``).

Layout (``torch/serialization.py::_legacy_save``; threat model PK29): five pickles in a
row -- the magic number ``0x1950a86a20f9469cfc6c``, the protocol version ``1001``, a
``sys_info`` dict, the main object, the list of storage keys -- then, for each key in that
order, an int64 little-endian element count followed by the storage's raw little-endian bytes.

The main pickle refers to storages before their bytes appear, so storages are allocated
empty (after checking that the declared sizes fit in what is left of the file) and filled
once the key list has been read; tensor views created meanwhile see the data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from mettaformat.errors import LegacyFormatError, LegacyUnsupportedError
from mettaformat.legacy.describe import describe
from mettaformat.legacy.limits import DEFAULT_LIMITS, LegacyLimits
from mettaformat.legacy.tensors import StorageRef, check_storage_type, tensor_from_buffer
from mettaformat.legacy.unpickler import PickleVM

__all__ = ["LEGACY_MAGIC_NUMBER", "LEGACY_PROTOCOL_VERSION", "LegacyStream", "load_legacy_stream"]

LEGACY_MAGIC_NUMBER: Final = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION: Final = 1001
_REGION: Final = "legacy stream"
_I8 = struct.Struct("<q")


@dataclass
class LegacyStream:
    """What a legacy stream held besides its main object.

    Attributes:
        sys_info: the writer's ``sys_info`` dict (endianness, type sizes).
        container_sources: ``("module", type, file, source)`` ids: class path -> (file, source
            text). Kept as inert text, never compiled (PK30).
    """

    sys_info: Any = None
    container_sources: dict[str, tuple[Any, Any]] = field(default_factory=dict)


@dataclass
class _Root:
    ref: StorageRef
    filled: bool = False


def load_legacy_stream(
    buf: bytearray, *, limits: LegacyLimits = DEFAULT_LIMITS
) -> tuple[Any, set[tuple[str, str]], LegacyStream]:
    """Interpret a whole legacy stream.

    Args:
        buf: the whole file.
        limits: resource caps.

    Returns:
        ``(value, globals_seen, stream_info)``.

    Raises:
        LegacyFormatError: wrong magic or protocol, bad storage ids, key lists naming unknown
            storages, size prefixes that disagree with the pickle, out-of-range views, trailing
            bytes (PK29).
        LegacyUnsupportedError, LegacyLimitError, UnsafeContentError: see :class:`PickleVM`.
    """
    pos = 0
    header: list[Any] = []
    for what in ("magic number", "protocol version", "sys_info"):
        vm = PickleVM(buf, start=pos, region=f"{_REGION} {what}", limits=limits)
        header.append(vm.run(allow_trailing=True))
        pos = vm.pos
    magic, protocol, sys_info = header
    if type(magic) is not int or magic != LEGACY_MAGIC_NUMBER:
        raise LegacyFormatError("not a torch legacy stream (wrong magic number)", region=_REGION, offset=0)
    if type(protocol) is not int or protocol != LEGACY_PROTOCOL_VERSION:
        raise LegacyUnsupportedError(f"legacy stream protocol {describe(protocol)}", region=_REGION)
    info = LegacyStream(sys_info=sys_info)
    roots: dict[str, _Root] = {}
    views: dict[str, StorageRef] = {}
    main = PickleVM(buf, start=pos, region=f"{_REGION} main pickle", limits=limits)
    declared = [0]

    def persistent_load(pid: tuple[Any, ...]) -> Any:
        if len(pid) == 4 and pid[0] == "module":
            _, container, source_file, source = pid
            name = getattr(container, "class_path", None)
            info.container_sources[name if type(name) is str else describe(container)] = (source_file, source)
            return container
        if len(pid) != 6 or pid[0] != "storage":
            main.fail(f"persistent id must be ('storage', type, key, location, numel, view), got {len(pid)} fields")
        _, stype, key, location, numel, view = pid
        stype = check_storage_type(stype, region=main.region, offset=main.offset)
        _check_key(main, key)
        if type(location) is not str or type(numel) is not int or numel < 0:
            main.fail("storage location must be a str and numel a non-negative int")
        root = roots.get(key)
        if root is None:
            # Allocate only what the rest of the file could fill.
            declared[0] += numel * stype.dtype.itemsize
            if declared[0] > len(buf) - main.pos:
                main.fail(f"storages declare {declared[0]} bytes, more than the file holds")
            root = _Root(StorageRef(key, stype.dtype, torch.empty(numel, dtype=stype.dtype), stype.untyped))
            roots[key] = root
        elif root.ref.dtype != stype.dtype or root.ref.numel != numel:
            main.fail(f"storage {key} is named with two different types or sizes")
        if view is None:
            return root.ref
        if not isinstance(view, tuple) or len(view) != 3:
            main.fail("storage view metadata must be (key, offset, size)")
        view_key, offset, size = view
        _check_key(main, view_key)
        if type(offset) is not int or type(size) is not int or offset < 0 or size < 0 or offset + size > numel:
            main.fail(f"storage view [{describe(offset)}, +{describe(size)}) is outside storage {key} of {numel}")
        known = views.get(view_key)
        if known is None:
            known = StorageRef(view_key, stype.dtype, root.ref.tensor[offset : offset + size], stype.untyped)
            views[view_key] = known
        return known

    main.persistent_load = persistent_load
    try:
        value = main.run(allow_trailing=True)
    finally:
        main.persistent_load = None  # it closes over the VM: no cycle outlives the run
    keys_vm = PickleVM(buf, start=main.pos, region=f"{_REGION} storage keys", limits=limits)
    keys = keys_vm.run(allow_trailing=True)
    _fill_storages(buf, keys_vm.pos, keys, roots)
    return value, main.globals_seen | keys_vm.globals_seen, info


def _check_key(vm: PickleVM, key: Any) -> None:
    if type(key) is not str or not key.isascii() or not key.isdigit() or len(key) > 24:
        vm.fail(f"storage key {describe(key)} is not a decimal string")


def _fill_storages(buf: bytearray, pos: int, keys: Any, roots: dict[str, _Root]) -> None:
    if not isinstance(keys, list) or not all(type(k) is str for k in keys):
        raise LegacyFormatError("storage key list is not a list of str", region=_REGION, offset=pos)
    if len(set(keys)) != len(keys) or set(keys) != set(roots):
        raise LegacyFormatError(
            "storage key list does not match the storages the pickle uses", region=_REGION, offset=pos
        )
    for key in keys:
        root = roots[key]
        if pos + 8 > len(buf):
            raise LegacyFormatError(f"storage {key}: size prefix missing", region=_REGION, offset=pos)
        count = _I8.unpack_from(buf, pos)[0]
        if count != root.ref.numel:
            raise LegacyFormatError(
                f"storage {key} has wrong byte size: expected {root.ref.numel} elements, got {count}",
                region=_REGION,
                offset=pos,
            )
        pos += 8
        data = tensor_from_buffer(buf, pos, count, root.ref.dtype, swap=False, region=f"{_REGION} storage {key}")
        root.ref.tensor.copy_(data)
        pos += count * root.ref.dtype.itemsize
    if pos != len(buf):
        raise LegacyFormatError(f"{len(buf) - pos} bytes after the last storage", region=_REGION, offset=pos)
