"""Object-tree rules as classes: hash flooding of $map keys and set members, which values may be keys and
when two are equal, the fixed $dtype and $device grammars, depth counted the same way by writer and reader,
and tensor references that lead nowhere."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from mettaformat.constants import MAX_TREE_DEPTH
from mettaformat.container.tree import decode_tree, encode_tree
from mettaformat.container.tree_values import (
    DEVICE_TYPES,
    DTYPE_NAMES,
    MAX_KEYS_PER_HASH,
    LegacyObject,
    TensorRef,
    parse_device,
)
from mettaformat.errors import HeaderError, TensorNotFoundError

_M61 = (1 << 61) - 1  # CPython hashes integers modulo this prime


@pytest.mark.parametrize("tag", ["$map", "$set", "$frozenset"])
def test_hash_flooding_keys_are_refused_in_linear_time(tag: str) -> None:
    """Integers that all hash alike made dict building quadratic; the decoder counts hash values first."""
    keys: list[Any] = [{"$int": str(1 + k * _M61)} for k in range(20_000)]
    payload = [[k, None] for k in keys] if tag == "$map" else keys
    started = time.process_time()
    with pytest.raises(HeaderError, match="share one hash value"):
        decode_tree({tag: payload})
    # the check itself is linear: a quadratic dict build of 20,000 colliding keys takes minutes
    assert time.process_time() - started < 30


def test_colliding_keys_up_to_the_bound_are_fine() -> None:
    keys = [1 + k * _M61 for k in range(MAX_KEYS_PER_HASH)]
    assert decode_tree({"$set": keys}) == set(keys)
    with pytest.raises(HeaderError):
        decode_tree({"$set": [*keys, 1 + MAX_KEYS_PER_HASH * _M61]})


@pytest.mark.parametrize("pair", [(1, 1.0), (True, 1), (0, -0.0), (False, 0), ({"$tuple": [1, 2]}, {"$size": [1, 2]}),
                                  ({"$frozenset": [1, 2]}, {"$frozenset": [2, 1]}),
                                  ({"$device": "cuda:0"}, {"$device": "cuda:0"})])
def test_equal_keys_are_duplicates(pair: tuple[Any, Any]) -> None:
    with pytest.raises(HeaderError, match="duplicate"):
        decode_tree({"$map": [[pair[0], "a"], [pair[1], "b"]]})
    with pytest.raises(HeaderError, match="duplicate"):
        decode_tree({"$set": list(pair)})


@pytest.mark.parametrize("key", [[1], {"a": 1}, {"$map": []}, {"$set": []}, {"$list": []}, float("nan"),
                                 {"$tuple": [float("nan")]}, {"$tensor": ["model", "w"]}])
def test_keys_that_may_not_be_keys_are_refused_by_reader_and_writer(key: Any) -> None:
    with pytest.raises(HeaderError, match="cannot be a map key"):
        decode_tree({"$map": [[key, 1]]})
    with pytest.raises(HeaderError, match="cannot be a map key"):
        decode_tree({"$set": [key]})
    decoded = decode_tree(key) if not isinstance(key, float) else key
    if isinstance(decoded, (list, dict, set)):
        return  # unhashable in Python: a writer cannot even be given it
    with pytest.raises(ValueError, match="cannot be a map key"):
        encode_tree({decoded: 1})


def test_every_allowed_key_kind_round_trips() -> None:
    obj = LegacyObject("m", "K")
    value = {None: 0, True: 1, 2: 2, 2.5: 3, "s": 4, b"b": 5, 2**70: 6, (1, "a"): 7, frozenset({1, 2}): 8,
             torch.float32: 9, torch.device("cuda", 3): 10, obj: 11}
    back = decode_tree(encode_tree({"m": value, "o": obj}))
    assert {k: v for k, v in back["m"].items() if not isinstance(k, LegacyObject)} == {
        k: v for k, v in value.items() if k is not obj}
    assert [k for k in back["m"] if isinstance(k, LegacyObject)] == [back["o"]]


@pytest.mark.parametrize("text", ["cpu", "cuda", "cuda:0", "cuda:127", "meta", "privateuseone:9", "xla:10", "mps"])
def test_device_grammar_accepts(text: str) -> None:
    assert str(decode_tree({"$device": text})) == text
    assert parse_device(text) == torch.device(text)


@pytest.mark.parametrize("text", ["cuda:128", "cuda:01", "cuda:-1", "cuda: 1", "CUDA", "cuda:1:2", "cuda:", "gpu",
                                  "cuda:\u0661", "", "x" * 65, 3, None, ["cpu"]])
def test_device_grammar_refuses(text: Any) -> None:
    with pytest.raises(HeaderError, match="invalid device"):
        decode_tree({"$device": text})


def test_device_types_match_torch() -> None:
    """The fixed list is torch's own (the reader does not ask torch what a file may say)."""
    for kind in DEVICE_TYPES:
        assert torch.device(kind).type == kind


@pytest.mark.parametrize("name", ["float", "double", "half", "long", "int", "torch.float32", "Float32", "", 1])
def test_dtype_aliases_and_other_names_are_refused(name: Any) -> None:
    with pytest.raises(HeaderError, match="unknown dtype"):
        decode_tree({"$dtype": name})


def test_every_dtype_name_this_torch_has_round_trips() -> None:
    present = [n for n in DTYPE_NAMES if isinstance(getattr(torch, n, None), torch.dtype)]
    assert len(present) >= 27
    for name in present:
        assert decode_tree(encode_tree(getattr(torch, name))) is getattr(torch, name)
    everything = {str(d).removeprefix("torch.") for d in vars(torch).values() if isinstance(d, torch.dtype)}
    assert everything <= set(DTYPE_NAMES), "a torch dtype has no $dtype name yet: add it to the spec and the table"


def _nested(depth: int, make: Any) -> Any:
    value = make
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("leaf", [[], {}, (), torch.Size([1, 2]), frozenset(), {1: 2}],
                         ids=["list", "map", "tuple", "size", "frozenset", "$map"])
def test_depth_is_counted_alike_by_writer_and_reader(leaf: Any) -> None:
    """A value at depth 100 is allowed, at 101 refused, by both sides; leaves and empty containers alike
    (a $map's key and value sit one level below it, so a non-empty one stops a level earlier)."""
    at_limit = _nested(MAX_TREE_DEPTH - (1 if leaf == {1: 2} else 0), leaf)
    assert decode_tree(encode_tree(at_limit)) is not None
    too_deep = [at_limit]
    with pytest.raises(ValueError, match="deeper"):
        encode_tree(too_deep)
    encoded = encode_tree(at_limit)
    with pytest.raises(HeaderError, match="deeper"):
        decode_tree([encoded])


def test_tensor_reference_to_a_missing_tensor_is_a_header_error() -> None:
    def resolve(section: str, name: str) -> torch.Tensor:
        raise TensorNotFoundError(name, region=f"section {section!r}")

    with pytest.raises(HeaderError, match="missing tensor 'w'") as info:
        decode_tree({"x": {"$tensor": ["model", "w"]}}, resolve, path="header.trees.t")
    assert info.value.path == "header.trees.t.x.$tensor"
    assert decode_tree({"$tensor": ["model", "w"]}) == TensorRef("model", "w")  # metadata: left unresolved
