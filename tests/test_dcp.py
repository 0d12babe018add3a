"""Distributed checkpoints in one process: round trips, refusals, conversion, hostile directories."""

from __future__ import annotations

import os
import pickle
import random
import warnings
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import mettaformat
from mettaformat import _atomic
from mettaformat.cli.main import main as cli
from mettaformat.container.layout import checksum
from mettaformat.container.writer import write_container
from mettaformat.dcp import INDEX_NAME, MettaLoadPlanner, MettaSavePlanner, MettaStorageReader, MettaStorageWriter
from mettaformat.dcp import writer as dcp_writer
from mettaformat.dcp.index import DcpIndex, FileRecord, TensorRecord, read_index, write_index
from mettaformat.errors import FormatError, IntegrityError, LayoutError, LegacyImportError, MettaFormatError
from tests.test_dcp_distributed import pickle_findings


def state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"fc.weight": torch.randn(8, 4, generator=g), "fc.bias": torch.randn(8, generator=g).half()},
        "optim": {"state": {"fc.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(8, 4, generator=g)}},
                  "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": ["fc.weight"]}]},
        "step": 42,
        "rng": random.Random(1).getstate(),
        "torch_rng": torch.get_rng_state(),
    }


def blank() -> dict[str, Any]:
    s = state()
    s["model"] = {k: torch.zeros_like(v) for k, v in s["model"].items()}
    s["optim"]["state"]["fc.weight"] = {k: torch.zeros_like(v) for k, v in s["optim"]["state"]["fc.weight"].items()}
    s["optim"]["param_groups"] = [{"lr": 0.0, "betas": None, "params": None}]
    s.update(step=0, rng=None, torch_rng=torch.zeros_like(s["torch_rng"]))
    return s


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    return bool(a == b)


def save(s: dict[str, Any], path: Path, **kw: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: one process
        dcp.save(s, storage_writer=MettaStorageWriter(path, **kw), no_dist=True)


def load(path: Path, planner: Any = None) -> dict[str, Any]:
    s = blank()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(s, storage_reader=MettaStorageReader(path), planner=planner, no_dist=True)
    return s


@pytest.mark.parametrize("compression", ["raw", "zstd"])
@pytest.mark.parametrize("planner", [None, MettaLoadPlanner()])
def test_round_trip_is_exact_and_pickle_free(tmp_path: Path, compression: str, planner: Any) -> None:
    save(state(), tmp_path / "ck", compression=compression)
    assert equal(load(tmp_path / "ck", planner), state())
    assert pickle_findings(tmp_path / "ck") == []


def test_a_new_save_replaces_the_previous_one_and_removes_its_files(tmp_path: Path) -> None:
    save(state(), tmp_path / "ck", keep_previous=False)
    first = set(os.listdir(tmp_path / "ck"))
    s = state()
    s["step"] = 43
    save(s, tmp_path / "ck", keep_previous=False)
    assert load(tmp_path / "ck")["step"] == 43
    assert len(os.listdir(tmp_path / "ck")) == 2 and not first & set(os.listdir(tmp_path / "ck")) - {INDEX_NAME}


def test_a_durable_save_syncs_the_directory_once_before_and_once_after_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_replace, real_sync = os.replace, _atomic.fsync_dir

    def sync(directory: Path) -> None:
        events.append("sync directory")
        real_sync(directory)

    monkeypatch.setattr(os, "replace", lambda a, b: events.append(os.path.basename(b)) or real_replace(a, b))
    monkeypatch.setattr(_atomic, "fsync_dir", sync)
    monkeypatch.setattr(dcp_writer, "fsync_dir", sync)
    save(state(), tmp_path / "ck", durable=True)
    assert [e if e in ("sync directory", INDEX_NAME) else "rank file" for e in events] == [
        "rank file", "sync directory", INDEX_NAME, "sync directory"]
    assert equal(load(tmp_path / "ck"), state())


def test_large_files_of_the_previous_save_are_deleted_after_the_commit_in_the_background(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(state(), tmp_path / "ck")
    first = set(os.listdir(tmp_path / "ck")) - {INDEX_NAME}
    deferred: list[Any] = []

    class Later:
        def submit(self, fn: Any, *args: Any, **kwargs: Any) -> None:
            deferred.append(lambda: fn(*args, **kwargs))

    monkeypatch.setattr(_atomic, "_RELEASE_IN_BACKGROUND", 1)  # every file counts as large
    monkeypatch.setattr(_atomic, "shared_pool", Later)
    s = state()
    s["step"] = 43
    save(s, tmp_path / "ck", keep_previous=False)
    assert first <= set(os.listdir(tmp_path / "ck")) and deferred
    assert load(tmp_path / "ck")["step"] == 43  # the new save is committed while old files remain
    for delete in deferred:
        delete()
    assert len(os.listdir(tmp_path / "ck")) == 2 and not first & set(os.listdir(tmp_path / "ck"))
    assert load(tmp_path / "ck")["step"] == 43


def test_state_that_needs_pickle_is_refused_and_nothing_commits(tmp_path: Path) -> None:
    s = state()
    s["callback"] = lambda: None
    with pytest.raises(CheckpointException, match="cannot be stored without pickle"):
        save(s, tmp_path / "ck")
    assert not (tmp_path / "ck" / INDEX_NAME).exists()


def test_metta_planners_refuse_torchs_pickle_paths(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointException, match="would be pickled"):
            dcp.save({"step": 1}, checkpoint_id=tmp_path / "a", planner=MettaSavePlanner(), no_dist=True)
        dcp.save({"w": torch.ones(2), "step": 1}, checkpoint_id=tmp_path / "t", no_dist=True)
        with pytest.raises(CheckpointException, match="not unpickled"):
            dcp.load({"w": torch.zeros(2), "step": 0}, checkpoint_id=tmp_path / "t", planner=MettaLoadPlanner(),
                     no_dist=True)


# -- conversion ---------------------------------------------------------------------------------
def test_convert_ours_to_one_container_and_back(tmp_path: Path) -> None:
    save(state(), tmp_path / "ck")
    assert cli(["-q", "convert", str(tmp_path / "ck"), str(tmp_path / "one.mfmt")]) == 0
    ckpt = mettaformat.load_any(tmp_path / "one.mfmt")
    assert equal(dict(ckpt.tensors)["model.fc.weight"], state()["model"]["fc.weight"])
    assert ckpt.training is not None and ckpt.training.trainer_state["step"] == 42
    assert cli(["-q", "convert", str(tmp_path / "one.mfmt"), str(tmp_path / "back"), "--to", "dcp"]) == 0
    assert equal(load(tmp_path / "back"), state())


def test_convert_torchs_default_layout_without_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state(), checkpoint_id=tmp_path / "torch", no_dist=True)

    def forbidden(*a: Any, **k: Any) -> None:
        raise AssertionError("unpickled with pickle/torch.load")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    assert cli(["-q", "validate", str(tmp_path / "torch")]) == 0
    assert cli(["-q", "convert", str(tmp_path / "torch"), str(tmp_path / "ours"), "--to", "dcp"]) == 0
    monkeypatch.undo()
    assert equal(load(tmp_path / "ours"), state())


def test_inspect_and_validate_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save(state(), tmp_path / "ck")
    assert cli(["inspect", str(tmp_path / "ck")]) == 0
    out = capsys.readouterr().out
    assert "distributed checkpoint" in out and "optim.state.fc.weight.exp_avg" in out
    assert cli(["validate", str(tmp_path / "ck")]) == 0
    flip_tensor_byte(tmp_path / "ck")  # inside the data, not the header: only checksums can tell
    assert cli(["validate", str(tmp_path / "ck")]) == 1


# -- hostile directories ------------------------------------------------------------------------
def flip_tensor_byte(directory: Path) -> None:
    """Flip one byte inside the stored data of a rank file's first shard (headers stay intact)."""
    path = next(p for p in directory.iterdir() if p.suffix == ".mfmt")
    with mettaformat.open(path) as c:
        s = c.header.section("shards")
        assert s is not None
        offset = s.offset + s.stream_header_length + s.tensors[0].begin
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def resign(directory: Path, edit: Any) -> None:
    """Rewrite the index body with ``edit`` applied and a matching checksum (a deliberate forgery)."""
    path = directory / INDEX_NAME
    outer = msgpack.unpackb(path.read_bytes())
    body = msgpack.unpackb(outer["body"])
    edit(body)
    outer["body"] = msgpack.packb(body)
    outer["checksum"] = checksum(outer["body"])
    path.write_bytes(msgpack.packb(outer))


def read_metadata(directory: Path) -> Any:
    return MettaStorageReader(directory).read_metadata()


def test_tampered_index_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ck"
    save(state(), d)
    raw = bytearray((d / INDEX_NAME).read_bytes())
    raw[len(raw) // 2] ^= 1
    (d / INDEX_NAME).write_bytes(bytes(raw))
    with pytest.raises(MettaFormatError):
        read_metadata(d)

    cases = {
        "path traversal": lambda b: b["files"][0].update(name="../../etc/passwd"),
        "wrong shape": lambda b: b["tensors"]["model.fc.weight"].update(shape=[8, 5]),
        "wrong size": lambda b: b["files"][0].update(size=b["files"][0]["size"] + 1),
        "unknown object": lambda b: b["objects"].append("ghost"),
        "huge dims": lambda b: b["tensors"]["model.fc.weight"].update(shape=[1] * 100),
    }
    for name, edit in cases.items():
        save(state(), d)
        resign(d, edit)
        with pytest.raises(MettaFormatError):
            read_metadata(d)
        assert cli(["-q", "validate", str(d)]) == 1, name


def test_tampered_or_swapped_container_is_refused(tmp_path: Path) -> None:
    save(state(), tmp_path / "a")
    other = state()
    other["step"] = 7
    save(other, tmp_path / "b")
    file_a = next(p for p in (tmp_path / "a").iterdir() if p.suffix == ".mfmt")
    file_b = next(p for p in (tmp_path / "b").iterdir() if p.suffix == ".mfmt")
    os.replace(file_b, file_a)  # another save's file under the committed name
    with pytest.raises(IntegrityError, match="not the file the index committed"):
        read_metadata(tmp_path / "a")
    os.unlink(file_a)
    with pytest.raises(FormatError, match="missing"):
        read_metadata(tmp_path / "a")
    save(state(), tmp_path / "c")
    flip_tensor_byte(tmp_path / "c")
    with pytest.raises(CheckpointException, match="checksum mismatch"):
        load(tmp_path / "c")


def forged_directory(directory: Path, shards: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """A hand-made directory whose 4x4 tensor ``w`` has the given (offsets, sizes) shards."""
    directory.mkdir()
    tensors = {f"w@{i}": torch.ones(sizes) for i, (_, sizes) in enumerate(shards)}
    records = [{"fqn": "w", "name": f"w@{i}", "offsets": list(o), "global_shape": [4, 4]}
               for i, (o, _) in enumerate(shards)]
    name = "__0_00000000aaaaaaaa.mfmt"
    write_container(directory / name, {"shards": tensors}, metadata={"dcp": {"shards": records}})
    with mettaformat.open(directory / name) as c:
        record = FileRecord(name, c.file_size, c.preamble.header_checksum)
    write_index(directory, DcpIndex("00000000aaaaaaaa", {name: record}, {"w": TensorRecord("F32", (4, 4))}, ()))


@pytest.mark.parametrize(
    "shards",
    [
        [((0, 0), (4, 4)), ((2, 0), (2, 4))],  # overlap
        [((0, 0), (2, 4))],  # half missing
        [((0, 0), (2, 4)), ((3, 0), (2, 4))],  # outside
    ],
)
def test_forged_shard_tables_are_refused(tmp_path: Path, shards: list[Any]) -> None:
    forged_directory(tmp_path / "ck", shards)
    with pytest.raises(LayoutError):
        read_metadata(tmp_path / "ck")


def test_a_well_forged_directory_loads(tmp_path: Path) -> None:
    forged_directory(tmp_path / "ck", [((0, 0), (2, 4)), ((2, 0), (2, 4))])  # the oracle for the cases above
    target = {"w": torch.zeros(4, 4)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(target, storage_reader=MettaStorageReader(tmp_path / "ck"), no_dist=True)
    assert torch.equal(target["w"], torch.ones(4, 4))


class Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_metadata_with_a_payload_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    d = tmp_path / "hostile"
    d.mkdir()
    (d / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(FormatError, match="never unpickled"):
        read_metadata(d)
    with pytest.raises(LegacyImportError, match="expected a Metadata record"):
        mettaformat.load_any(d)
    for command in (["inspect", str(d)], ["validate", str(d)], ["convert", str(d), str(tmp_path / "o.mfmt")]):
        assert cli(["-q", *command]) == 1
    assert not marker.exists()


def test_payload_inside_an_item_of_torchs_layout_is_recorded_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2), "evil": Payload(marker)}, checkpoint_id=tmp_path / "t", no_dist=True)
    assert cli(["-q", "validate", str(tmp_path / "t")]) == 1  # names the unsafe global
    ckpt = mettaformat.load_any(tmp_path / "t")
    assert repr(ckpt.training.trainer_state["evil"]).startswith("LegacyObject(posix.system")  # type: ignore[union-attr]
    assert not marker.exists()


def test_missing_index_says_why(tmp_path: Path) -> None:
    (tmp_path / "ck").mkdir()
    with pytest.raises(FormatError, match="no committed distributed checkpoint"):
        read_index(tmp_path / "ck")


# -- MettaAgent ---------------------------------------------------------------------------------
def test_agent_training_checkpoint_through_dcp_resumes_exactly(tmp_path: Path) -> None:
    def trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        optim = torch.optim.Adam(model.parameters(), lr=0.01)
        model(torch.ones(2, 4)).sum().backward()
        optim.step()
        return model, optim

    model, optim = trained(0)
    agent = mettaformat.MettaAgent(model, model_type="mlp", metadata={"epoch": 3}, agent_attributes={"obs": {0: 1.5}})
    counters = {"epoch": 3, "agent_step": 4096, "by_env": {7: 0.25}}
    agent.save_for_training(tmp_path / "ck", optim, trainer_state=counters, distributed=True)
    expected_next = torch.rand(3)  # what the RNG gives right after the save
    assert pickle_findings(tmp_path / "ck") == []

    model2, optim2 = trained(1)
    resumed = mettaformat.MettaAgent.load_for_training(tmp_path / "ck", model=model2, optimizer=optim2,
                                                       distributed=True)
    assert torch.equal(torch.rand(3), expected_next)
    assert resumed.trainer_state == counters and resumed.agent_attributes == {"obs": {0: 1.5}}
    assert resumed.model_type == "mlp" and resumed.metadata == {"epoch": 3}
    assert equal(model2.state_dict(), model.state_dict())
    assert equal(optim2.state_dict()["state"], optim.state_dict()["state"])


@pytest.mark.parametrize("name", mettaformat.dcp.__all__)
def test_public_dcp_names_are_in_the_api_reference(name: str) -> None:
    from tests.test_api_reference import documented

    assert f"mettaformat.dcp.{name}" in documented(), f"docs/api.md has no entry for mettaformat.dcp.{name}"


def test_spec_page_lists_the_index_fields_the_writer_writes(tmp_path: Path) -> None:
    import re

    spec = (Path(__file__).resolve().parents[1] / "spec" / "DCP.md").read_text()
    body_table = spec[spec.index("The body:") : spec.index("## 4.")]
    documented = set(re.findall(r"^\| `(\w+)` \|", body_table, re.M))
    save(state(), tmp_path / "ck")
    outer = msgpack.unpackb((tmp_path / "ck" / INDEX_NAME).read_bytes())
    assert set(msgpack.unpackb(outer["body"])) == documented
    assert set(outer) == set(re.findall(r"^\| `(\w+)` \|", spec[spec.index("## 3.") : spec.index("The body:")], re.M))
