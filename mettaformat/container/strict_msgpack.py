"""Strict msgpack decoding for untrusted bytes: one decoder, every rule of ``spec/FORMAT.md`` §4.1.

Following msgpack-python's advice for untrusted input: one ``unpackb`` call per parse (never a
reused ``Unpacker``), size limits derived from the input (its default), and hooks on every map
and array, so a rule holds at every depth, in parts the schema never reads too (unknown keys,
codec configurations, metadata): map keys are strs and unique, and no ext type appears, the
timestamp (-1) included, which msgpack decodes itself without calling ``ext_hook``.

The hooks run once per map or array; a 3.1 header keeps its tensor index in a few ``bin``
columns, so their cost does not grow with the number of tensors.
"""

from __future__ import annotations

from typing import Any, Final

import msgpack

from mettaformat.errors import HeaderError

__all__ = ["MAX_NESTING", "decode_msgpack", "encode_msgpack"]

#: msgpack-python's own stack: values nest at most this many arrays/maps deep (an empty
#: innermost container counts as a level).
MAX_NESTING: Final = 1024
_TIMESTAMP: Final = msgpack.Timestamp


def _no_timestamp(values: Any) -> None:
    if _TIMESTAMP in map(type, values):  # ``in map(type, ...)`` keeps the scan in C
        raise HeaderError("msgpack ext type -1 (timestamp) is not allowed")


def _pairs_hook(pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[Any] = set()
        for key, _ in pairs:
            if key in seen:
                raise HeaderError(f"duplicate map key {key!r}")
            seen.add(key)
    if bytes in map(type, out):  # strict_map_key lets str and bytes through; only str is allowed
        raise HeaderError(f"map key {next(k for k in out if type(k) is bytes)!r} is not a string")
    _no_timestamp(out.values())
    return out


def _list_hook(items: list[Any]) -> list[Any]:
    _no_timestamp(items)
    return items


def _ext_hook(code: int, data: bytes) -> Any:
    raise HeaderError(f"msgpack ext type {code} is not allowed")


def decode_msgpack(data: bytes | memoryview, *, region: str) -> Any:
    """Decode one msgpack value that must fill ``data`` exactly.

    Raises:
        HeaderError: malformed, truncated or trailing data, nesting deeper than ``MAX_NESTING``,
            non-string or duplicate keys, ext types (timestamps included), or invalid UTF-8.
    """
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, object_pairs_hook=_pairs_hook,
                                list_hook=_list_hook, ext_hook=_ext_hook)
        _no_timestamp((value,))
        return value
    except HeaderError as e:
        raise HeaderError(e.message, path=e.path, region=region) from None
    except msgpack.StackError:
        raise HeaderError(f"invalid msgpack: nested deeper than {MAX_NESTING} arrays and maps", region=region) from None
    except msgpack.ExtraData as e:
        raise HeaderError(f"{len(e.extra)} trailing bytes after the msgpack value", region=region) from None
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as e:
        reason = str(e) or type(e).__name__  # StackError carries no message
        raise HeaderError(f"invalid msgpack: {reason}", region=region) from None


def encode_msgpack(value: Any) -> bytes:
    """The smallest encoding of every value, strs as str and bytes as bin (§4.1)."""
    return msgpack.packb(value, use_bin_type=True, strict_types=False)  # type: ignore[no-any-return]
