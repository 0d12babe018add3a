"""The pickle VM agrees with CPython on plain data for protocols 0-5, and decodes numpy as data."""

from __future__ import annotations

import io
import pickle
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mettaformat.container.tree import LegacyObject
from mettaformat.legacy import import_legacy_bytes, ndarray_to_tensor, numpy_scalar_value, sniff
from mettaformat.legacy.allowlist import RecordedDefaultDict
from mettaformat.legacy.unpickler import unpickle

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=20)
)
_hashable = st.recursive(_scalars, lambda kids: st.tuples(kids, kids) | st.frozensets(kids, max_size=3), max_leaves=6)
_data = st.recursive(
    _scalars | _hashable,
    lambda kids: (
        st.lists(kids, max_size=4)
        | st.dictionaries(_hashable, kids, max_size=4)
        | st.sets(_hashable, max_size=3)
        | st.tuples(kids, kids)
        | st.builds(bytearray, st.binary(max_size=8))
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(value=_data, protocol=st.integers(0, 5))
def test_plain_data_matches_cpython(value: Any, protocol: int) -> None:
    data = pickle.dumps(value, protocol=protocol)
    assert unpickle(data)[0] == pickle.loads(data)


def test_shared_references_and_builtin_spellings() -> None:
    shared = [1, 2]
    value = {"a": shared, "b": shared, "s": {1, 2}, "f": frozenset({3}), "t": (shared,), "big": 1 << 200, "c": 1 + 2j}
    for protocol in range(6):
        got = unpickle(pickle.dumps(value, protocol=protocol))[0]
        assert got == value and got["a"] is got["b"] and got["t"][0] is got["a"]


def test_ordered_and_default_dicts() -> None:
    from collections import OrderedDict, defaultdict

    dd: defaultdict[str, list[int]] = defaultdict(list, {"x": [1]})
    got = unpickle(pickle.dumps({"o": OrderedDict(b=1, a=2), "d": dd}, protocol=2))[0]
    assert list(got["o"]) == ["b", "a"] and type(got["o"]) is dict
    assert isinstance(got["d"], RecordedDefaultDict) and got["d"] == {"x": [1]}
    assert got["d"].default_factory.class_path == "__builtin__.list"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_torch_save_protocols_and_dtypes(protocol: int) -> None:
    sd = {
        "f": torch.randn(3, 2),
        "bf": torch.randn(4).to(torch.bfloat16),
        "i": torch.arange(5),
        "b": torch.tensor([True, False]),
        "u16": torch.tensor([1, 2, 3], dtype=torch.uint16),  # _rebuild_tensor_v3 + UntypedStorage
        "c": torch.randn(2, dtype=torch.complex64),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5),
        "p": torch.nn.Parameter(torch.ones(2)),
    }
    buf = io.BytesIO()
    torch.save(sd, buf, pickle_protocol=protocol)
    got = import_legacy_bytes(buf.getvalue()).tensors
    for k, v in sd.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v.detach()), k


def test_sniff_strict() -> None:
    assert sniff(b"PK\x03\x04rest") == "torch-zip"
    assert sniff(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)) == "torch-legacy-stream"
    assert sniff(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=4)) == "torch-legacy-stream"
    assert sniff(b"PK\x05\x06") is None and sniff(b"\x80\x02}q\x00.") is None and sniff(b"") is None


def test_numpy_arrays_and_scalars_without_importing_numpy() -> None:
    np = pytest.importorskip("numpy")
    arrays = {
        "c": np.arange(6, dtype=np.float32).reshape(2, 3),
        "f": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
        "be": np.arange(4, dtype=">f8"),
        "bool": np.array([True, False]),
        "empty": np.zeros((0, 2), dtype=np.int16),
    }
    got = unpickle(pickle.dumps({**arrays, "s": np.float64(2.5), "i": np.int64(-3)}, protocol=2))[0]
    for k, a in arrays.items():
        rec = got[k]
        assert isinstance(rec, LegacyObject) and (rec.module, rec.name) == ("numpy", "ndarray")
        t = ndarray_to_tensor(rec)
        assert list(t.shape) == list(a.shape) and t.tolist() == a.tolist(), k
    assert numpy_scalar_value(got["s"]) == 2.5 and numpy_scalar_value(got["i"]) == -3
    with pytest.raises(Exception):  # object arrays are refused by the helper, not executed
        ndarray_to_tensor(unpickle(pickle.dumps(np.array([{"a": 1}], dtype=object), protocol=2))[0])


def test_build_drops_instance_state_only_on_an_ordered_dict() -> None:
    import collections

    from mettaformat.errors import LegacyFormatError
    from mettaformat.legacy.unpickler import unpickle

    # A state dict's per-module versions ride on the OrderedDict instance; the plain dict drops them.
    ordered = collections.OrderedDict(w=1)
    ordered._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    value, _ = unpickle(pickle.dumps(ordered, protocol=2))
    assert value == {"w": 1} and type(value) is dict
    # A dict that never was an OrderedDict has no instance state: CPython refuses BUILD on it, and so do we.
    stream = b"\x80\x02}q\x02}q\x00b."
    with pytest.raises(AttributeError):
        pickle.loads(stream)
    with pytest.raises(LegacyFormatError, match="BUILD on a dict"):
        unpickle(stream)
