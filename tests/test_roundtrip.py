"""Writer and reader agree: every dtype, any shape, ties, views, metadata trees, both codecs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mettaformat
from mettaformat.dtypes import DTYPE_TAGS, dtype_from_tag

CODECS = ["raw", "zstd"]


def sample(tag: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    dtype = dtype_from_tag(tag)
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    raw = torch.randint(0, 256, (n * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    return raw.view(dtype).reshape(shape)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    # compare bytes: NaN payloads and -0.0 must survive too
    assert torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("compression", CODECS)
@pytest.mark.parametrize("tag", DTYPE_TAGS)
def test_every_dtype_round_trips(tmp_path: Path, tag: str, compression: str) -> None:
    tensors = {"big": sample(tag, (64, 130)), "scalar": sample(tag, ()), "empty": sample(tag, (0, 3))}
    path = tmp_path / "x.mfmt"
    mettaformat.save_file(tensors, path, compression=compression)  # type: ignore[arg-type]
    loaded = mettaformat.load_file(path)
    assert list(loaded) == list(tensors)
    for name, t in tensors.items():
        assert_same(loaded[name], t)
    with mettaformat.open(path) as ckpt:
        for name, t in tensors.items():
            assert_same(ckpt.get_tensor(name), t)


@pytest.mark.parametrize("compression", CODECS)
def test_tied_tensors_are_stored_once_and_come_back_tied(tmp_path: Path, compression: str,
                                                         shared_tensor_state_dict: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "tied.mfmt"
    mettaformat.save_file(shared_tensor_state_dict, path, compression=compression)  # type: ignore[arg-type]
    with mettaformat.open(path) as ckpt:
        section = ckpt.header.section("model")
        assert section is not None and section.aliases == {"head.weight": "embed.weight"}
        assert len(section.tensors) == 2
    loaded = mettaformat.load_file(path)
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert torch.equal(loaded["head.weight"], shared_tensor_state_dict["embed.weight"])


@pytest.mark.parametrize("compression", CODECS)
def test_views_and_non_contiguous_tensors(tmp_path: Path, compression: str) -> None:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    tensors = {"t": base.t(), "row": base[2], "col": base[:, 3], "expanded": torch.ones(3, 1).expand(3, 5),
               "base": base, "neg": torch.randn(4).neg()}
    path = tmp_path / "views.mfmt"
    mettaformat.save_file(tensors, path, compression=compression)  # type: ignore[arg-type]
    loaded = mettaformat.load_file(path)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name


def test_save_bytes_and_load_bytes(tiny_state_dict: dict[str, torch.Tensor]) -> None:
    data = mettaformat.save(tiny_state_dict, metadata={"epoch": 1})
    assert data.startswith(mettaformat.MFMT_MAGIC)
    loaded = mettaformat.load(data)
    for name, t in tiny_state_dict.items():
        assert torch.equal(loaded[name], t)


def test_metadata_object_tree_round_trips(tmp_path: Path) -> None:
    metadata = {
        "epoch": 7, "tuple": (1, (2, 3)), "list": [1, [2]], "non_str_keys": {1: "a", (2, 3): "b", None: 0},
        "big": 2**100, "neg_big": -(2**80), "nan": float("nan"), "inf": float("-inf"), "dtype": torch.bfloat16,
        "device": torch.device("cuda", 1), "size": torch.Size([3, 4]), "set": {1, 2}, "frozen": frozenset({"a"}),
        "bytes": b"\x00\xff", "dollar": {"$tuple": 1}, "nested": {"a": {"b": {"c": [None, True, 1.5]}}},
    }
    path = tmp_path / "meta.mfmt"
    mettaformat.save_file({}, path, metadata=metadata)
    with mettaformat.open(path) as ckpt:
        got = ckpt.metadata
    assert math.isnan(got.pop("nan")) and math.isnan(metadata.pop("nan"))
    assert got == metadata
    assert type(got["tuple"]) is tuple and type(got["list"]) is list and type(got["size"]) is torch.Size


def test_trees_hold_tensors_by_reference(tmp_path: Path) -> None:
    shared = torch.randn(3)
    state = {"state": {0: {"step": torch.tensor(4.0), "exp_avg": shared, "again": shared}},
             "param_groups": [{"lr": 1e-3, "params": [0]}]}
    path = tmp_path / "tree.mfmt"
    mettaformat.container.writer.write_container(path, {"model": {"w": torch.ones(2)}}, trees={"optimizer": state})
    with mettaformat.open(path) as ckpt:
        assert ckpt.sections == ("model", "optimizer")
        got = ckpt.tree("optimizer")
    assert torch.equal(got["state"][0]["exp_avg"], shared)
    assert got["state"][0]["again"] is got["state"][0]["exp_avg"]
    assert got["param_groups"] == [{"lr": 1e-3, "params": [0]}]


_TAGS = st.sampled_from(DTYPE_TAGS)
_SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
_NAMES = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), min_size=1, max_size=12)
_LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8) | st.binary(
    max_size=8)
_TREES = st.recursive(_LEAVES, lambda c: st.lists(c, max_size=3) | st.tuples(c, c)
                      | st.dictionaries(st.text(max_size=5) | st.integers(), c, max_size=3), max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.dictionaries(_NAMES.filter(lambda n: n != "__metadata__"), st.tuples(_TAGS, _SHAPES), max_size=6),
       metadata=st.dictionaries(st.text(max_size=6), _TREES, max_size=4),
       compression=st.sampled_from(CODECS), seed=st.integers(0, 2**16))
def test_property_round_trip(tmp_path: Path, spec: dict[str, tuple[str, tuple[int, ...]]],
                             metadata: dict[str, object], compression: str, seed: int) -> None:
    tensors = {name: sample(tag, shape, seed) for name, (tag, shape) in spec.items()}
    path = tmp_path / "prop.mfmt"
    mettaformat.save_file(tensors, path, metadata=metadata, compression=compression)  # type: ignore[arg-type]
    loaded = mettaformat.load_file(path)
    assert list(loaded) == list(tensors)
    for name, t in tensors.items():
        assert_same(loaded[name], t)
    with mettaformat.open(path) as ckpt:
        assert ckpt.metadata == metadata


def test_deep_trees_within_the_limit_round_trip(tmp_path: Path) -> None:
    from mettaformat.constants import MAX_TREE_DEPTH

    value: object = 1
    for _ in range(MAX_TREE_DEPTH - 1):
        value = (value,)
    mettaformat.save_file({}, tmp_path / "deep.mfmt", metadata={"x": value})
    with mettaformat.open(tmp_path / "deep.mfmt") as ckpt:
        assert ckpt.metadata["x"] == value
    with pytest.raises(mettaformat.errors.WriteError, match="deeper"):
        mettaformat.save_file({}, tmp_path / "deeper.mfmt", metadata={"x": ((value,),)})
