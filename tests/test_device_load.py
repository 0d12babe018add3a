"""The pipelined device loader, run on the CPU: the "device" is the CPU and the copy is injected,
so chunking, ordering, ring reuse, verification and tied tensors are tested without a GPU."""

from __future__ import annotations

import itertools
import os
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import mettaformat
from mettaformat.container import device_load, verify
from mettaformat.container.device_load import HostTransport, load_to_device, packed_units, raw_units
from mettaformat.container.reader import LazyCheckpoint
from mettaformat.errors import IntegrityError
from tests import craft


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    verify.forget_verified()


def _state() -> dict[str, torch.Tensor]:
    """Every dtype, odd offsets (an int8 tensor of odd length first), ties, an empty tensor and
    tensors larger than the small chunks used below."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 70, generator=g)
    out: dict[str, torch.Tensor] = {"odd": torch.arange(7, dtype=torch.int8), "w": w, "tied": w,
                                    "empty": torch.empty(0, 5)}
    for dtype in (torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                  torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2):
        x = torch.randn(513, generator=g) * 4
        out[f"t_{str(dtype).split('.')[-1]}"] = (x > 0) if dtype == torch.bool else x.to(dtype)
    out["big"] = torch.randn(40_000, generator=g)
    return out


class DeferredCopies:
    """A transport whose copies land only when waited for: a slot refilled before its copy was
    waited for would corrupt the result."""

    def __init__(self) -> None:
        self.queued: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.staged: list[int] = []
        self.copies: list[int] = []
        self.transport = HostTransport(copy=self.copy, wait=self.wait, finish=self.finish)
        real_staging = self.transport.staging
        self.transport.staging = lambda n: self.staged.append(n) or real_staging(n)  # type: ignore[method-assign]

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> int:
        token = len(self.copies)
        self.copies.append(src.numel())
        self.queued[token] = (dst, src)
        return token

    def wait(self, token: int) -> None:
        dst, src = self.queued.pop(token)
        dst.copy_(src)

    def finish(self) -> None:
        for token in list(self.queued):
            self.wait(token)


def _save(tmp_path: Path, compression: str, state: dict[str, torch.Tensor] | None = None) -> Path:
    path = tmp_path / f"m-{compression}.mfmt"
    mettaformat.save_file(state or _state(), path, compression=compression)  # type: ignore[arg-type]
    return path


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        if v.numel():  # compared as bytes: float8 has no equality
            assert torch.equal(got[k].view(torch.uint8), v.view(torch.uint8)), k


def test_raw_units_are_aligned_and_cover_the_range() -> None:
    units = raw_units(data_offset=4096 + 100, start=10, end=100_000, chunk=16384)
    assert units[0].target == 0 and sum(u.length for u in units) == 100_000 - 10
    for a, b in itertools.pairwise(units):
        assert a.target + a.length == b.target and a.source + a.length == b.source
        assert b.source % 16384 == 0
    assert raw_units(0, 5, 5, 4096) == []


def test_packed_units_group_whole_tensors_up_to_a_chunk() -> None:
    with LazyCheckpoint(_save(Path(os.environ.get("TMPDIR", "/tmp")), "raw")) as f:
        entries = sorted(f.header.section("model").tensors, key=lambda e: e.begin)  # type: ignore[union-attr]
    units = packed_units(entries, entries[0].begin, 4096)
    assert [e for u in units for e in u.entries] == entries
    for u in units:
        assert u.length <= 4096 or len(u.entries) == 1
        assert u.length == u.entries[-1].end - u.entries[0].begin


@pytest.mark.parametrize("compression", ["raw", "zstd"])
@pytest.mark.parametrize("verify_", [True, False])
def test_pipelined_load_equals_the_cpu_load(tmp_path: Path, compression: str, verify_: bool) -> None:
    path = _save(tmp_path, compression)
    want = mettaformat.load_file(path)
    deferred = DeferredCopies()
    with LazyCheckpoint(path, verify=verify_) as f:
        s = f.header.section("model")
        assert s is not None
        out = load_to_device(f, s, s.tensors, deferred.transport, chunk=4096, slots=3)
    assert not deferred.queued
    got = {name: out[s.aliases.get(name, name)] for name in s.order}
    _assert_same(got, want)
    # host memory: the ring, plus (zstd only) a buffer per tensor larger than a slot
    big = [e.nbytes for e in s.tensors if e.nbytes > 4096]
    assert deferred.staged[:3] == [4096] * 3
    assert sorted(deferred.staged[3:]) == (sorted(big) if compression == "zstd" else [])
    assert len(deferred.copies) > 5
    # tensors view one allocation, except those whose offset does not suit their dtype
    storages = {t.untyped_storage().data_ptr() for t in out.values() if t.numel()}
    assert len(storages) <= 1 + sum(1 for e in s.tensors if e.nbytes and e.begin % out[e.name].element_size())


@pytest.mark.parametrize("compression", ["raw", "zstd"])
def test_a_wrong_checksum_stops_the_load_before_that_tensor_is_copied(tmp_path: Path, compression: str) -> None:
    path = _save(tmp_path, compression)
    parts = craft.parse(path.read_bytes())
    parts.tensor("big")["checksum"] = craft.xxh(b"no").to_bytes(8, "little")
    path.write_bytes(craft.build(parts))
    deferred = DeferredCopies()
    with LazyCheckpoint(path) as f, pytest.raises(IntegrityError, match="'big'"):
        s = f.header.section("model")
        assert s is not None
        load_to_device(f, s, s.tensors, deferred.transport, chunk=4096, slots=2)
    with LazyCheckpoint(path, verify=False) as f:  # without verification it loads
        s = f.header.section("model")
        assert s is not None
        assert load_to_device(f, s, s.tensors, HostTransport(), chunk=4096)["big"].shape == (40_000,)


@pytest.fixture
def through_pipeline(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Route CPU loads through the pipelined path, with small chunks, and record each transport."""
    made: list[Any] = []
    monkeypatch.setattr("mettaformat.container.reader.off_host", lambda device: True)
    monkeypatch.setattr("mettaformat.container.section_load.off_host", lambda device: True)
    monkeypatch.setattr("mettaformat.checkpoint_io.off_host", lambda device: True)
    monkeypatch.setattr(device_load, "CHUNK_BYTES", 8192)

    def transport(device: Any) -> Any:
        deferred = DeferredCopies()
        made.append(deferred)
        return deferred.transport

    monkeypatch.setattr("mettaformat.container.reader.transport_for", transport)
    monkeypatch.setattr("mettaformat.container.section_load.transport_for", transport)
    return made


@pytest.mark.parametrize("compression", ["raw", "zstd"])
def test_load_file_and_lazy_reads_go_through_the_pipeline(
    tmp_path: Path, compression: str, through_pipeline: list[Any]
) -> None:
    path = _save(tmp_path, compression)
    state = _state()
    loaded = mettaformat.load_file(path, device="cpu")
    assert len(through_pipeline) == 1
    _assert_same(loaded, state)
    assert loaded["tied"] is loaded["w"]
    with mettaformat.open(path) as f:
        f.to("cpu")
        _assert_same({"big": f.get_tensor("big")}, {"big": state["big"]})
        assert f.get_tensor("tied") is f.get_tensor("w")
    assert len(through_pipeline) == 3  # one transfer per tensor read lazily


def test_gds_reads_straight_into_device_memory_when_nothing_needs_verifying(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(tmp_path, "raw")
    reads: list[tuple[int, int]] = []

    class FakeCuFile:
        """kvikio's CuFile, reading with pread into the (CPU) destination."""

        def __init__(self, name: str, mode: str) -> None:
            self.fd = os.open(name, os.O_RDONLY)

        def __enter__(self) -> FakeCuFile:
            return self

        def __exit__(self, *exc: object) -> None:
            os.close(self.fd)

        def pread(self, buf: torch.Tensor, size: int, offset: int) -> Any:
            reads.append((offset, size))
            data = os.pread(self.fd, size, offset)
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            return types.SimpleNamespace(get=lambda: len(data))

    monkeypatch.setitem(sys.modules, "kvikio", types.SimpleNamespace(CuFile=FakeCuFile))
    staged: list[int] = []
    transport = HostTransport()
    transport.staging = lambda n: staged.append(n) or torch.empty(n, dtype=torch.uint8)  # type: ignore[method-assign]
    with LazyCheckpoint(path, verify=False) as f:
        s = f.header.section("model")
        assert s is not None
        out = load_to_device(f, s, s.tensors, transport, chunk=8192, gds=True)
        _assert_same({k: out[k] for k in ("w", "big", "odd")}, {k: _state()[k] for k in ("w", "big", "odd")})
    assert reads and not staged  # no host staging at all
    with LazyCheckpoint(path, verify=True) as f:  # verification needs the bytes on the host
        s = f.header.section("model")
        assert s is not None
        reads.clear()
        load_to_device(f, s, s.tensors, transport, chunk=8192, gds=True)
    assert not reads and staged


def test_agents_load_through_the_pipeline(tmp_path: Path, through_pipeline: list[Any]) -> None:
    from torch import nn

    from mettaformat import MettaAgent

    def build(attrs: dict[str, Any], metadata: dict[str, Any], config: dict[str, Any]) -> nn.Module:
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    mettaformat.register_model_type("pipeline-mlp", build, replace=True)
    model = build({}, {}, {})
    optimizer = torch.optim.Adam(model.parameters())
    MettaAgent(model, model_type="pipeline-mlp").save_for_training(tmp_path / "a.mfmt", optimizer=optimizer)
    x = torch.randn(3, 16)
    assert torch.equal(MettaAgent.load(tmp_path / "a.mfmt", device="cpu")(x), model(x))
    loads = len(through_pipeline)
    assert loads >= 1
    target = build({}, {}, {})
    fresh = torch.optim.Adam(target.parameters())
    agent = MettaAgent.load_for_training(tmp_path / "a.mfmt", device="cpu", model=target, optimizer=fresh)
    assert torch.equal(agent(x), model(x)) and len(through_pipeline) > loads
    # the optimizer still drives the model's own parameters
    assert [id(p) for p in target.parameters()] == [id(p) for p in fresh.param_groups[0]["params"]]


@pytest.mark.parametrize("compression", ["raw", "zstd"])
def test_only_empty_tensors(tmp_path: Path, compression: str, through_pipeline: list[Any]) -> None:
    path = _save(tmp_path, compression, {"a": torch.empty(0), "b": torch.empty(3, 0, dtype=torch.int64)})
    loaded = mettaformat.load_file(path, device="cpu")
    assert loaded["a"].shape == (0,) and loaded["b"].shape == (3, 0) and loaded["b"].dtype == torch.int64
