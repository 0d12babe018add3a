"""The JSON header of an embedded safetensors stream, parsed as strictly as safetensors parses it.

``json.loads`` alone is more lenient than the Rust parser safetensors uses: given bytes it
guesses UTF-16/32, it reads ``NaN`` and ``Infinity``, and Python's ``4.0 == 4`` and
``True == 1`` hide wrong types in a comparison. A header this module accepts is one that
safetensors 0.8 also accepts (it is stricter in places: duplicate keys and unknown fields of a
tensor entry are refused here); ``spec/FORMAT.md`` §5.5 is the normative list.
"""

from __future__ import annotations

import json
from typing import Any, Final, NamedTuple

from mettaformat.errors import HeaderError

__all__ = ["StreamTensor", "parse_alias_metadata", "parse_stream_json"]

_TENSOR_FIELDS: Final = frozenset({"dtype", "shape", "data_offsets"})
_INT63: Final = 1 << 63


class StreamTensor(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _Reject(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Reject(f"duplicate key {duplicate!r}")
    return out


def _no_float(text: str) -> Any:
    raise _Reject(f"number {text} is not an integer")


def _no_constant(text: str) -> Any:
    raise _Reject(f"{text} is not JSON")


def _unsigned(text: str) -> int:
    if text.startswith("-"):  # "-0" is a float to serde_json: safetensors refuses it
        raise _Reject(f"number {text} is negative")
    value = int(text)
    # serde_json reads 2^64 and above as a float, which safetensors refuses; torch cannot hold a
    # dimension of 2^63 or more, and neither can the index this header must match.
    if value >= _INT63:
        raise _Reject(f"number {text} is not below 2^63")
    return value


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_float=_no_float,
                                   parse_constant=_no_constant, parse_int=_unsigned, strict=True)


def _ints(value: Any, what: str, name: str) -> tuple[int, ...]:
    if type(value) is not list or not all(type(x) is int for x in value):
        raise _Reject(f"{what} of {name!r} is not an array of non-negative integers")
    return tuple(value)


def parse_stream_json(body: bytes, *, region: str) -> tuple[dict[str, str], dict[str, StreamTensor]]:
    """Parse the ``N`` JSON bytes of a safetensors header: (``__metadata__``, tensors by name).

    Raises:
        HeaderError: anything safetensors would refuse, and duplicate keys or unknown tensor fields.
    """
    try:
        text = body.decode("utf-8")  # strict: no BOM sniffing, no UTF-16/32 guessing
        if not text.startswith("{"):
            raise _Reject("the header does not start with '{'")
        doc = _DECODER.decode(text)
    except (_Reject, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HeaderError(f"invalid safetensors JSON header: {e}", region=region) from None
    try:
        return _split(doc)
    except _Reject as e:
        raise HeaderError(f"invalid safetensors JSON header: {e}", region=region) from None


def _split(doc: Any) -> tuple[dict[str, str], dict[str, StreamTensor]]:
    if type(doc) is not dict:
        raise _Reject("the header is not a JSON object")
    metadata = doc.pop("__metadata__", {})
    if type(metadata) is not dict or not all(type(v) is str for v in metadata.values()):
        raise _Reject("__metadata__ is not an object of strings")
    try:  # json turns "\\ud800" escapes into lone surrogates; serde_json refuses them
        "".join([*metadata, *metadata.values(), *doc]).encode("utf-8")
    except UnicodeEncodeError:
        raise _Reject("a string holds a lone surrogate") from None
    tensors: dict[str, StreamTensor] = {}
    for name, info in doc.items():
        if type(info) is not dict or info.keys() != _TENSOR_FIELDS:
            raise _Reject(f"tensor {name!r} is not {{dtype, shape, data_offsets}}")
        if type(info["dtype"]) is not str:
            raise _Reject(f"dtype of {name!r} is not a string")
        shape = _ints(info["shape"], "shape", name)
        offsets = _ints(info["data_offsets"], "data_offsets", name)
        if len(offsets) != 2:
            raise _Reject(f"data_offsets of {name!r} is not [begin, end]")
        tensors[name] = StreamTensor(info["dtype"], shape, offsets[0], offsets[1])
    return metadata, tensors


def parse_alias_metadata(text: str, stored: set[str] | dict[str, Any], *, region: str) -> dict[str, str]:
    """The ties a ``__metadata__["mettaformat.aliases"]`` value records (§5.2), checked: a JSON object of
    str to str, no duplicate key, each alias a name no stored tensor has (an alias never replaces a real
    tensor) and each target a stored tensor (not another alias).

    Raises:
        HeaderError: anything else.
    """
    try:
        aliases = _DECODER.decode(text)
    except (_Reject, ValueError, RecursionError) as e:
        raise HeaderError(f"mettaformat.aliases is not valid JSON: {e}", region=region) from None
    if type(aliases) is not dict or not all(type(t) is str for t in aliases.values()):
        raise HeaderError("mettaformat.aliases is not an object of strings", region=region)
    for alias, target in aliases.items():
        if alias in stored:
            raise HeaderError(f"alias {alias!r} would replace the stored tensor of that name", region=region)
        if target not in stored:
            raise HeaderError(f"alias {alias!r} points to {target!r}, which is not a stored tensor", region=region)
    return aliases
