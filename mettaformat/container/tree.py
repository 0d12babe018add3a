"""Object trees: a tagged msgpack encoding for the non-tensor state of checkpoints.

msgpack lacks tuples, non-string keys, integers beyond 64 bits, sets, torch dtypes and
devices, and references to tensors. Each of those is written as a map with exactly one key
that starts with ``$`` (the tag). Plain dicts whose keys are strings not starting with ``$``
stay native msgpack maps, so ordinary metadata reads naturally in any msgpack tool.

Decoding never imports or calls anything named in the data: class paths of recorded objects
stay strings inside :class:`LegacyObject`, and dtype names are looked up in a fixed table.
The normative description is ``spec/FORMAT.md`` section "Object trees".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final

import msgpack

from mettaformat.constants import MAX_TREE_DEPTH
from mettaformat.container.tree_values import (
    DEVICE_TYPES,
    DTYPE_NAMES,
    MAX_DEVICE_INDEX,
    LegacyObject,
    TensorRef,
    check_keys,
    dtypes_by_name,
    parse_device,
)
from mettaformat.errors import HeaderError, TensorNotFoundError

if TYPE_CHECKING:  # decoding imports torch only for a $dtype, $device or $size it meets
    import torch

__all__ = ["DEVICE_TYPES", "DTYPE_NAMES", "LegacyObject", "TREE_TAGS", "TensorRef", "decode_tree", "encode_tree",
           "parse_device"]

_INT64_MIN: Final = -(1 << 63)
_UINT64_MAX: Final = (1 << 64) - 1
#: Decimal digits accepted in a ``$int`` tag (CPython's own int/str conversion limit).
_MAX_INT_DIGITS: Final = 4300

TREE_TAGS: Final = (
    "$tuple",
    "$list",
    "$map",
    "$int",
    "$set",
    "$frozenset",
    "$dtype",
    "$device",
    "$size",
    "$tensor",
    "$object",
    "$ref",
)

#: Called with a tensor and its dotted path in the tree; returns the (section, name) it is stored under.
TensorEncoder = Callable[["torch.Tensor", str], tuple[str, str]]
TensorResolver = Callable[[str, str], Any]


def encode_tree(value: Any, tensor_ref: TensorEncoder | None = None) -> Any:
    """Turn a Python value into plain msgpack-able data with ``$`` tags.

    Args:
        value: None, bool, int, float, str, bytes, list, tuple, dict, set, frozenset,
            torch.dtype, torch.device, torch.Size, torch.Tensor, TensorRef or LegacyObject,
            nested arbitrarily (up to ``MAX_TREE_DEPTH``).
        tensor_ref: called with each tensor and its dotted path in the tree (``state.0.exp_avg``);
            returns the ``(section, name)`` the tensor is stored under.

    Returns:
        A value made of None, bool, int, float, str, bytes, list and str-keyed dicts only.

    Raises:
        ValueError: for unsupported types, cyclic containers, too-deep trees, or tensors
            without a ``tensor_ref``.
    """
    try:
        return _Encoder(tensor_ref).encode(value, 0, "")
    except RecursionError:  # only reachable with a lowered interpreter recursion limit
        raise ValueError("object tree too deep for this interpreter") from None


class _Encoder:
    def __init__(self, tensor_ref: TensorEncoder | None) -> None:
        import torch  # the values being encoded come from torch anyway

        self.torch = torch
        self.tensor_ref = tensor_ref
        self.object_ids: dict[int, int] = {}
        self.active: set[int] = set()

    def encode(self, v: Any, depth: int, path: str) -> Any:
        if depth > MAX_TREE_DEPTH:
            raise ValueError(f"object tree deeper than {MAX_TREE_DEPTH}")
        if v is None or isinstance(v, (bool, float, str, bytes)):
            return v
        if isinstance(v, int):
            v = int(v)  # int subclasses (IntEnum...) become plain ints
            return v if _INT64_MIN <= v <= _UINT64_MAX else {"$int": str(v)}
        if isinstance(v, bytearray):
            return bytes(v)
        torch = self.torch
        if isinstance(v, torch.dtype):
            name = str(v).removeprefix("torch.")
            if name not in dtypes_by_name():
                raise ValueError(f"dtype {v} has no $dtype name")
            return {"$dtype": name}
        if isinstance(v, torch.device):
            if parse_device(str(v)) is None:
                raise ValueError(f"device {v} has no $device form")
            return {"$device": str(v)}
        if isinstance(v, torch.Tensor):
            if self.tensor_ref is None:
                raise ValueError("tensor found in an object tree, but no tensor_ref was given")
            section, name = self.tensor_ref(v, path)
            return {"$tensor": [section, name]}
        if isinstance(v, TensorRef):
            return {"$tensor": [v.section, v.name]}
        if isinstance(v, LegacyObject):
            return self._encode_object(v, depth, path)
        key = id(v)
        if key in self.active:
            raise ValueError(f"cyclic {type(v).__name__} in object tree")
        self.active.add(key)
        try:
            return self._encode_container(v, depth, path)
        finally:
            self.active.discard(key)

    def _encode_container(self, v: Any, depth: int, path: str) -> Any:
        d = depth + 1
        if isinstance(v, self.torch.Size):
            return {"$size": list(v)}
        if isinstance(v, tuple):
            return {"$tuple": [self.encode(x, d, _join(path, i)) for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [self.encode(x, d, _join(path, i)) for i, x in enumerate(v)]
        if isinstance(v, (set, frozenset)):
            check_keys(v)
            tag = "$frozenset" if isinstance(v, frozenset) else "$set"
            return {tag: [self.encode(x, d, _join(path, i)) for i, x in enumerate(_stable_order(v))]}
        if isinstance(v, Mapping):
            if all(isinstance(k, str) and not k.startswith("$") for k in v):
                return {k: self.encode(x, d, _join(path, k)) for k, x in v.items()}
            check_keys(v)
            return {
                "$map": [[self.encode(k, d, _join(path, k)), self.encode(x, d, _join(path, k))] for k, x in v.items()]
            }
        raise ValueError(f"cannot store a {type(v).__module__}.{type(v).__qualname__} in an object tree")

    def _encode_object(self, obj: LegacyObject, depth: int, path: str) -> Any:
        known = self.object_ids.get(id(obj))
        if known is not None:  # shared or cyclic: refer back to the first occurrence
            return {"$ref": known}
        oid = len(self.object_ids)
        self.object_ids[id(obj)] = oid
        d = depth + 1
        body: dict[str, Any] = {"id": oid, "class": [obj.module, obj.name], "kind": obj.kind}
        if obj.args:
            body["args"] = [self.encode(x, d, _join(path, f"args.{i}")) for i, x in enumerate(obj.args)]
        if obj.state is not None:
            body["state"] = self.encode(obj.state, d, path)
        if obj.items:
            body["items"] = [
                [self.encode(k, d, _join(path, k)), self.encode(x, d, _join(path, k))] for k, x in obj.items
            ]
        if obj.listitems:
            body["listitems"] = [self.encode(x, d, _join(path, i)) for i, x in enumerate(obj.listitems)]
        return {"$object": body}


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _stable_order(values: set[Any] | frozenset[Any]) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=repr)


def decode_tree(data: Any, resolve_tensor: TensorResolver | None = None, *, path: str = "tree") -> Any:
    """Inverse of :func:`encode_tree`.

    Args:
        data: a value as produced by msgpack (already limited by the header parser).
        resolve_tensor: maps ``(section, name)`` to a tensor (or lazy handle). Without it,
            tensor references come back as :class:`TensorRef`.
        path: field path used in error messages.

    Raises:
        HeaderError: for unknown tags, malformed tag payloads, dangling ``$ref`` ids, or
            unknown dtype names, naming the field path.
    """
    try:
        return _Decoder(resolve_tensor).decode(data, path, 0)
    except RecursionError:  # only reachable with a lowered interpreter recursion limit
        raise HeaderError("object tree too deep for this interpreter", path=path) from None


#: Values that decode to themselves (exact types: what msgpack makes); skipping the recursive call
#: and its field path for them halves the cost of decoding typical metadata.
_PLAIN: Final = frozenset({type(None), bool, int, float, str, bytes})


class _Decoder:
    def __init__(self, resolve_tensor: TensorResolver | None) -> None:
        self.resolve_tensor = resolve_tensor
        self.objects: dict[int, LegacyObject] = {}

    def decode(self, v: Any, path: str, depth: int) -> Any:
        if depth > MAX_TREE_DEPTH:
            raise HeaderError(f"object tree deeper than {MAX_TREE_DEPTH}", path=path)
        plain = depth < MAX_TREE_DEPTH  # children may be plain values, returned without a call
        if isinstance(v, list):
            return [x if plain and type(x) in _PLAIN else self.decode(x, f"{path}[{i}]", depth + 1)
                    for i, x in enumerate(v)]
        if not isinstance(v, dict):
            if v is None or isinstance(v, (bool, int, float, str, bytes)):
                return v
            if isinstance(v, msgpack.Timestamp):
                raise HeaderError("msgpack ext type -1 (timestamp) is not allowed", path=path)
            raise HeaderError(f"unexpected {type(v).__name__}", path=path)
        if bytes in map(type, v):
            raise HeaderError("map keys must be strings", path=path)
        tagged = [k for k in v if k.startswith("$")]
        if not tagged:
            return {k: x if plain and type(x) in _PLAIN else self.decode(x, f"{path}.{k}", depth + 1)
                    for k, x in v.items()}
        if len(v) != 1:
            raise HeaderError("a map with a '$' key must have exactly one key", path=path)
        tag, payload = next(iter(v.items()))
        # Same count as the encoder: a tag adds no level of its own, its payload's items do.
        return self._decode_tag(tag, payload, f"{path}.{tag}", depth)

    @staticmethod
    def _check_keys(keys: Iterable[Any], path: str) -> None:
        try:
            check_keys(keys)
        except ValueError as e:
            raise HeaderError(str(e), path=path) from None

    def _list(self, payload: Any, path: str, depth: int) -> list[Any]:
        if not isinstance(payload, list):
            raise HeaderError("expected an array", path=path)
        return [self.decode(x, f"{path}[{i}]", depth + 1) for i, x in enumerate(payload)]

    def _pairs(self, payload: Any, path: str, depth: int) -> list[tuple[Any, Any]]:
        if not isinstance(payload, list) or not all(isinstance(p, list) and len(p) == 2 for p in payload):
            raise HeaderError("expected an array of [key, value] pairs", path=path)
        return [
            (self.decode(k, f"{path}[{i}][0]", depth + 1), self.decode(x, f"{path}[{i}][1]", depth + 1))
            for i, (k, x) in enumerate(payload)
        ]

    def _decode_tag(self, tag: str, payload: Any, path: str, depth: int) -> Any:
        if tag == "$tuple":
            return tuple(self._list(payload, path, depth))
        if tag == "$list":
            return self._list(payload, path, depth)
        if tag in ("$set", "$frozenset"):
            items = self._list(payload, path, depth)
            self._check_keys(items, path)
            members = set(items) if tag == "$set" else frozenset(items)
            if len(members) != len(items):
                raise HeaderError("duplicate set member", path=path)
            return members
        if tag == "$map":
            pairs = self._pairs(payload, path, depth)
            self._check_keys((k for k, _ in pairs), path)
            out = dict(pairs)
            if len(out) != len(pairs):
                seen: set[Any] = set()
                duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
                raise HeaderError(f"duplicate key {duplicate!r}", path=path)
            return out
        if tag == "$int":
            if not isinstance(payload, str) or not 0 < len(payload) <= _MAX_INT_DIGITS:
                raise HeaderError(f"expected a decimal string of at most {_MAX_INT_DIGITS} digits", path=path)
            body = payload[1:] if payload[0] == "-" else payload
            if not body.isascii() or not body.isdigit():
                raise HeaderError("expected a decimal string", path=path)
            return int(payload)
        if tag == "$dtype":
            dtype = dtypes_by_name().get(payload) if type(payload) is str else None
            if dtype is None:
                known = " (not available in this torch build)" if payload in DTYPE_NAMES else ""
                raise HeaderError(f"unknown dtype {payload!r}{known}", path=path)
            return dtype
        if tag == "$device":
            device = parse_device(payload)
            if device is None:
                raise HeaderError(f"invalid device {payload!r}: expected TYPE or TYPE:INDEX (0 to "
                                  f"{MAX_DEVICE_INDEX})", path=path)
            return device
        if tag == "$size":
            dims = payload if isinstance(payload, list) else None
            if dims is None or not all(type(x) is int and 0 <= x < 1 << 63 for x in dims):
                raise HeaderError("expected an array of non-negative integers", path=path)
            import torch

            return torch.Size(dims)
        if tag == "$tensor":
            if not (isinstance(payload, list) and len(payload) == 2 and all(isinstance(x, str) for x in payload)):
                raise HeaderError("expected [section, name]", path=path)
            section, name = payload
            if self.resolve_tensor is None:
                return TensorRef(section, name)
            try:
                return self.resolve_tensor(section, name)
            except TensorNotFoundError:
                raise HeaderError(f"reference to a missing tensor {name!r} of section {section!r}",
                                  path=path) from None
        if tag == "$object":
            return self._decode_object(payload, path, depth)
        if tag == "$ref":
            if type(payload) is not int or payload not in self.objects:
                raise HeaderError(f"reference to unknown object {payload!r}", path=path)
            return self.objects[payload]
        raise HeaderError(f"unknown tag {tag!r}", path=path)

    def _decode_object(self, body: Any, path: str, depth: int) -> LegacyObject:
        if not isinstance(body, dict):
            raise HeaderError("expected a map", path=path)
        unknown = set(body) - {"id", "class", "kind", "args", "state", "items", "listitems"}
        if unknown:
            raise HeaderError(f"unknown keys {sorted(unknown)}", path=path)
        oid, cls, kind = body.get("id"), body.get("class"), body.get("kind", "newobj")
        if type(oid) is not int or oid in self.objects:
            raise HeaderError(f"missing or duplicate object id {oid!r}", path=path)
        if not (isinstance(cls, list) and len(cls) == 2 and all(isinstance(x, str) for x in cls)):
            raise HeaderError("class must be [module, name]", path=f"{path}.class")
        if kind not in ("newobj", "reduce", "global"):
            raise HeaderError(f"unknown object kind {kind!r}", path=f"{path}.kind")
        # Register before decoding children so that cycles resolve to this object.
        obj = LegacyObject(cls[0], cls[1], kind=kind)
        self.objects[oid] = obj
        obj.args = tuple(self._list(body.get("args", []), f"{path}.args", depth))
        obj.state = self.decode(body.get("state"), f"{path}.state", depth + 1)
        obj.items = self._pairs(body.get("items", []), f"{path}.items", depth)
        obj.listitems = self._list(body.get("listitems", []), f"{path}.listitems", depth)
        return obj
