"""Distributed checkpoints on two CPU ranks (gloo): resharded loads, FSDP2, a rank killed mid-save."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

import mettaformat
from mettaformat.dcp import INDEX_NAME, MettaStorageReader
from tests.workers import dcp_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

PICKLE_SIGNATURES = (b"PK\x03\x04", b"data.pkl", b"\x80\x02c", b"\x80\x04\x95", b"\x80\x05\x95", b"torch._utils")


def pickle_findings(directory: Path) -> list[str]:
    """Every file under ``directory`` with a pickle or torch.save signature in it."""
    found = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path.name}: {sig!r}" for sig in PICKLE_SIGNATURES if sig in data]
        if data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            found.append(f"{path.name}: starts like a pickle")
    return found


def single_process_load(directory: Path, state: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: assuming a single process"
        dcp.load(state, storage_reader=MettaStorageReader(directory))
    return state


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@pytest.fixture(scope="module")
def resharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("dcp2")
    mp.spawn(dcp_ranks.reshard_job, args=(str(tmp),), nprocs=2, join=True)
    return tmp


@pytest.mark.parametrize("saved", ["dim0", "dim1"])
def test_two_rank_save_loads_bit_identical_on_two_ranks_resharded(resharded: Path, saved: str) -> None:
    full = dcp_ranks.full_tensors()
    with mettaformat.open(resharded / f"loaded-{saved}-on-2.mfmt") as ckpt:
        loaded = ckpt.load_section("model")
        assert ckpt.metadata["objects"] == dcp_ranks.objects()
    assert loaded.keys() == full.keys()
    for k, v in full.items():
        assert loaded[k].dtype == v.dtype and torch.equal(bits(loaded[k]), bits(v)), k


@pytest.mark.parametrize("saved", ["dim0", "dim1"])
def test_two_rank_save_loads_bit_identical_on_one_rank(resharded: Path, saved: str) -> None:
    full = dcp_ranks.full_tensors()
    state = {**{k: torch.zeros_like(v) for k, v in full.items()}, **dcp_ranks.empty_objects()}
    single_process_load(resharded / saved, state)
    for k, v in full.items():
        assert torch.equal(bits(state[k]), bits(v)), k
    assert {k: state[k] for k in dcp_ranks.objects()} == dcp_ranks.objects()


def test_checkpoint_directories_hold_no_pickle(resharded: Path, tmp_path: Path) -> None:
    for saved in ("dim0", "dim1", "fsdp", "agent"):
        names = os.listdir(resharded / saved)
        assert INDEX_NAME in names and len(names) == 3, names  # the index and one container per rank
        assert pickle_findings(resharded / saved) == []
    # the scan does find torch's own format, so an empty result above means something
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3), "step": 1}, checkpoint_id=tmp_path / "torch")
    assert pickle_findings(tmp_path / "torch")


def test_fsdp2_checkpoint_loads_into_a_plain_model_on_one_rank(resharded: Path) -> None:
    model = dcp_ranks.build_model(99)
    state = {"model": model.state_dict(), "step": 0}
    single_process_load(resharded / "fsdp", state)
    model.load_state_dict(state["model"])
    expected = mettaformat.load_file(resharded / "fsdp-expected.mfmt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert state["step"] == 5


def test_sharded_agent_checkpoint_resumes_on_one_rank(resharded: Path) -> None:
    model = dcp_ranks.build_model(5)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        agent = mettaformat.MettaAgent.load_for_training(resharded / "agent", model=model, optimizer=optim,
                                                         distributed=True)
    expected = mettaformat.load_file(resharded / "fsdp-expected.mfmt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert agent.trainer_state == dcp_ranks.COUNTERS
    assert agent.provenance["rng_not_restored"] == ["saved on 2 ranks, resumed on 1"]
    assert set(optim.state_dict()["state"]) == {0, 1, 2, 3}


def test_rank_killed_mid_save_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    with pytest.raises(mp.ProcessExitedException):
        mp.spawn(dcp_ranks.killed_job, args=(str(tmp_path),), nprocs=2, join=True)
    root = tmp_path / "ckpt"
    committed = mettaformat.dcp.index.read_index(root)
    rank_files = sorted(n for n in os.listdir(root) if n.endswith(".mfmt"))
    # rank 0's file of the second save is on disk, but the index still names the first save only
    assert len(rank_files) == 3 and set(committed.files) < set(rank_files)
    full = dcp_ranks.full_tensors()
    state = {**{k: torch.zeros_like(v) for k, v in full.items()}, "step": 0}
    single_process_load(root, state)
    assert state["step"] == 1
    for k, v in full.items():
        assert torch.equal(state[k], v), k
    # the next committed save clears what the dead one left, keeping the save it replaces at rest
    (root / ".__1_0123456789abcdef.mfmt.0123456789ab.mfmt-tmp").write_bytes(b"partial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2)}, storage_writer=mettaformat.dcp.MettaStorageWriter(root), no_dist=True)
    newest = mettaformat.dcp.index.read_index(root)
    assert set(os.listdir(root)) == {mettaformat.dcp.INDEX_NAME, *newest.files, *committed.files}
