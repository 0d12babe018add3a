"""threat model PK21-PK31: storages, views, tensor kinds, legacy streams, module state."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
import torch

from mettaformat.container.tree import LegacyObject
from mettaformat.errors import MettaFormatError
from mettaformat.legacy import LegacyFormatError, LegacyUnsupportedError, import_legacy_bytes
from mettaformat.legacy.modules import recover_module
from tests.legacy_helpers import craft as C

FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def _saved(obj: object, **kw: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def test_PK21_storage_numel_must_match_record() -> None:
    pkl = C.state_dict_pickle(w=C.tensor(C.storage_pid(numel=8), size=(8,)))
    with pytest.raises(LegacyFormatError, match="not the record"):
        import_legacy_bytes(C.torch_zip(pkl, {"0": FLOATS}))
    with pytest.raises(LegacyFormatError, match="missing"):
        import_legacy_bytes(C.torch_zip(pkl, {}))


@pytest.mark.parametrize(
    ("offset", "size", "stride"),
    [(1, (4,), (1,)), (0, (2, 2), (3, 1)), (0, (5,), (1,)), (4, (1,), (1,)), (-1, (1,), (1,)), (0, (2,), (-1,))],
)
def test_PK22_views_out_of_bounds(offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
    pkl = C.state_dict_pickle(w=C.tensor(C.storage_pid(), offset=offset, size=size, stride=stride))
    with pytest.raises(LegacyFormatError):
        import_legacy_bytes(C.torch_zip(pkl, {"0": FLOATS}))


def test_PK23_zero_strides_fortran_overlap_and_sharing() -> None:
    base = torch.arange(12, dtype=torch.float32)
    sd = {
        "expanded": torch.tensor([7.0]).expand(3, 4),
        "fortran": base.view(3, 4).t(),
        "overlap": base.as_strided((4, 3), (2, 1)),
        "a": base[2:6],
        "b": base,
    }
    ckpt = import_legacy_bytes(_saved(sd))
    for k, v in sd.items():
        assert torch.equal(ckpt.tensors[k], v), k
        assert ckpt.tensors[k].stride() == v.stride()
    ptrs = {ckpt.tensors[k].untyped_storage().data_ptr() for k in ("fortran", "overlap", "a", "b")}
    assert len(ptrs) == 1  # one storage, shared views
    # A crafted expanded view far larger than its storage is capped.
    pkl = C.state_dict_pickle(w=C.tensor(C.storage_pid(), size=(1 << 20, 1 << 20), stride=(0, 0)))
    with pytest.raises(MettaFormatError):
        import_legacy_bytes(C.torch_zip(pkl, {"0": FLOATS}))


def test_PK24_unknown_storage_class() -> None:
    pkl = C.state_dict_pickle(w=C.tensor(C.storage_pid(cls="FakeStorage")))
    with pytest.raises(LegacyUnsupportedError, match="unknown storage class"):
        import_legacy_bytes(C.torch_zip(pkl, {"0": FLOATS}))


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.eye(3).to_sparse(),
        lambda: torch.eye(3).to_sparse_csr(),
        lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
        lambda: torch.empty(3, device="meta"),
        lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
    ],
    ids=["sparse_coo", "sparse_csr", "quantized", "meta", "nested"],
)
def test_PK25_unsupported_tensor_kinds(make: object) -> None:
    data = _saved({"w": make()})  # type: ignore[operator]
    with pytest.raises(LegacyUnsupportedError, match="unsupported tensor kind"):
        import_legacy_bytes(data)


def test_PK26_big_endian_and_missing_byteorder() -> None:
    pkl = C.state_dict_pickle(w=C.tensor(C.storage_pid()))
    big = import_legacy_bytes(C.torch_zip(pkl, {"0": struct.pack(">4f", 1, 2, 3, 4)}, byteorder=b"big"))
    assert big.tensors["w"].tolist() == [1, 2, 3, 4]
    assert big.provenance["byteorder"] == "big"
    missing = import_legacy_bytes(C.torch_zip(pkl, {"0": FLOATS}, byteorder=None))
    assert missing.tensors["w"].tolist() == [1, 2, 3, 4]
    with pytest.raises(LegacyFormatError):
        import_legacy_bytes(C.torch_zip(pkl, {"0": FLOATS}, byteorder=b"middle"))


@pytest.mark.parametrize("location", ["cuda:99", "xla:0", "mps", "anything at all"])
def test_PK27_odd_locations_load_to_cpu(location: str) -> None:
    pkl = C.state_dict_pickle(w=C.tensor(C.storage_pid(location=location)))
    t = import_legacy_bytes(C.torch_zip(pkl, {"0": FLOATS})).tensors["w"]
    assert t.device.type == "cpu" and t.tolist() == [1, 2, 3, 4]


def test_PK28_torchscript_rejected(tmp_path: Path) -> None:
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "ts.pt"
    scripted.save(str(path))
    with pytest.raises(LegacyUnsupportedError, match="TorchScript"):
        import_legacy_bytes(path.read_bytes())


def _stream(main_value: bytes, keys: list[str], storages: list[tuple[int, bytes]], **kw: int) -> bytes:
    return C.legacy_stream(C.PROTO2 + main_value + C.STOP, keys, storages, **kw)


def test_PK29_legacy_stream_checks() -> None:
    main = C.EMPTY_DICT + C.uni("w") + C.tensor(C.legacy_pid("7", 4)) + b"s"
    good = _stream(main, ["7"], [(4, FLOATS)])
    assert import_legacy_bytes(good).tensors["w"].tolist() == [1, 2, 3, 4]
    with pytest.raises(MettaFormatError):
        import_legacy_bytes(_stream(main, ["7"], [(4, FLOATS)], magic=12345))
    with pytest.raises(MettaFormatError):
        import_legacy_bytes(_stream(main, ["7"], [(4, FLOATS)], protocol=1000))
    with pytest.raises(LegacyFormatError, match="key list"):
        import_legacy_bytes(_stream(main, ["7", "8"], [(4, FLOATS)]))
    with pytest.raises(LegacyFormatError, match="wrong byte size"):
        import_legacy_bytes(_stream(main, ["7"], [(5, FLOATS + bytes(4))]))
    with pytest.raises(LegacyFormatError):  # truncated storage bytes
        import_legacy_bytes(_stream(main, ["7"], [(4, FLOATS[:8])]))
    view = C.tup(C.uni("9"), C.int_(2), C.int_(3))
    bad_view = C.EMPTY_DICT + C.uni("w") + C.tensor(C.legacy_pid("7", 4, view=view), size=(3,)) + b"s"
    with pytest.raises(LegacyFormatError, match="outside storage"):
        import_legacy_bytes(_stream(bad_view, ["7"], [(4, FLOATS)]))
    huge = C.EMPTY_DICT + C.uni("w") + C.tensor(C.legacy_pid("7", 1 << 40)) + b"s"
    with pytest.raises(LegacyFormatError, match="more than the file holds"):
        import_legacy_bytes(_stream(huge, ["7"], [(4, FLOATS)]))


def test_PK30_module_source_kept_as_text() -> None:
    data = _saved(torch.nn.Linear(2, 3), _use_new_zipfile_serialization=False)
    ckpt = import_legacy_bytes(data)
    assert ckpt.provenance["shape"] == "module"
    sources = ckpt.provenance["container_sources"]
    ((_file, text),) = sources.values()
    assert isinstance(text, str) and "class Linear" in text
    assert set(ckpt.tensors) == {"weight", "bias"}


def test_PK31_old_module_state_missing_attributes() -> None:
    w = torch.ones(2)
    child = LegacyObject("old.torch", "Mod", state={"_parameters": {"w": w, "none": None}, "extra": 1})
    buf = torch.zeros(1)
    root = LegacyObject("old.torch", "Root", state={"_buffers": {"b": buf}, "_modules": {"c": child, "gone": None}})
    child.state["_modules"] = {"back": root}  # and a cycle (PK12)
    state = recover_module(root)
    assert list(state.state_dict) == ["b", "c.w"]
    assert any("cycle" in n for n in state.notes)
