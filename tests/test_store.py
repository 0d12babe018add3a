"""PolicyStore: Metta's save/load behaviours, URIs, listing hygiene, the index and the cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import mettaformat
from mettaformat import MettaAgent
from mettaformat._atomic import TEMP_SUFFIX
from mettaformat.container.header import decode_msgpack
from mettaformat.errors import StoreError, WriteError
from mettaformat.store import INDEX_FILE_NAME, PolicyMetadata, PolicyRecord, PolicyStore, register_scheme
from mettaformat.store import catalog as catalog_mod
from mettaformat.store import index as index_mod
from mettaformat.store import store as store_mod
from mettaformat.store.index import read_index
from tests.workers.store_helpers import MODEL_TYPE, TinyNet, requires_legacy, write_legacy, write_mfmt


# -- Metta's own tests (docs/legacy-formats.md section 8, item 1) ----------------------------------------------
class MockPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(10, 10)
        self.components = nn.ModuleDict(
            {"_core_": nn.LSTM(10, 10), "_value_": nn.Linear(10, 1), "_action_": nn.Linear(10, 5)}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)  # type: ignore[no-any-return]


mettaformat.register_model_type("mock_policy", lambda attrs, meta, cfg: MockPolicy(), replace=True)


def _check_mock(agent: MettaAgent) -> None:
    assert type(agent.model) is MockPolicy
    assert agent(torch.randn(1, 10)).shape == torch.Size([1, 10])
    assert hasattr(agent.model, "fc")
    for name in ("_core_", "_value_", "_action_"):
        assert name in agent.model.components


def test_policy_save_load_with_policy_metadata(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    metadata = PolicyMetadata(action_names=["move", "turn"], agent_step=100, epoch=5, generation=1, train_time=60.0)
    path = tmp_path / "test_policy.mfmt"
    policy = MockPolicy()
    record = store.save(path=path, agent=MettaAgent(policy, model_type="mock_policy"), metadata=metadata)
    # What is on disk, read from the header alone: exactly those five values.
    with mettaformat.open(path) as raw:
        user = {k: v for k, v in raw.metadata.items() if k != "mettaformat.checkpoint"}
    assert user == {
        "action_names": ["move", "turn"],
        "agent_step": 100,
        "epoch": 5,
        "generation": 1,
        "train_time": 60.0,
    }
    assert record.epoch == 5 and record.agent_step == 100 and record.name == "test_policy.mfmt"

    loaded = PolicyStore().policy(f"file://{path}")
    _check_mock(loaded)
    assert loaded.metadata == dict(metadata)
    for (k, a), (k2, b) in zip(policy.state_dict().items(), loaded.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_policy_save_load_with_dict_metadata(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    metadata = {"action_names": ["move", "turn"], "agent_step": 100, "epoch": 5, "generation": 1, "train_time": 60.0}
    store.save(name="model_0005.mfmt", agent=MettaAgent(MockPolicy(), model_type="mock_policy"), metadata=metadata)
    loaded = store.policy(tmp_path / "model_0005.mfmt")
    _check_mock(loaded)
    assert loaded.metadata["action_names"] == ["move", "turn"]
    assert loaded.metadata == metadata


def test_policy_metadata_required_fields_and_attribute_access() -> None:
    md = PolicyMetadata(score=0.5)
    assert (md.agent_step, md.epoch, md.generation, md.train_time) == (0, 0, 0, 0.0)
    md.epoch = 7
    assert md["epoch"] == 7 and md.score == 0.5
    for remove in (lambda: md.pop("epoch"), lambda: md.__delitem__("agent_step")):
        with pytest.raises(KeyError, match="Cannot"):
            remove()
    with pytest.raises(AttributeError, match="Cannot delete required field: epoch"):
        del md.epoch
    del md.score
    assert "score" not in md
    with pytest.raises(AttributeError):
        _ = md.missing
    with pytest.raises(ValueError, match="Missing required fields: generation, train_time"):
        PolicyMetadata.from_dict({"agent_step": 1, "epoch": 2})
    full = PolicyMetadata.from_dict({"agent_step": 1, "epoch": 2, "generation": 3, "train_time": 4.0, "x": 1})
    assert isinstance(full, dict) and full.x == 1
    md.clear()
    assert set(md) == {"agent_step", "epoch", "generation", "train_time"}


# -- saving -------------------------------------------------------------------------------------
def test_save_names_merges_metadata_and_does_not_touch_the_agent(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path / "ckpts")  # created on first save
    agent = MettaAgent(TinyNet(), model_type=MODEL_TYPE, metadata={"epoch": 3, "score": 0.1, "run": "a"})
    record = store.save(agent=agent, metadata={"score": 0.9, "agent_step": 640})
    assert record.path == tmp_path / "ckpts" / "model_0003.mfmt" and record.name == "model_0003.mfmt"
    assert dict(record.metadata) == {"epoch": 3, "score": 0.9, "run": "a", "agent_step": 640}
    assert agent.metadata == {"epoch": 3, "score": 0.1, "run": "a"}
    assert (record.epoch, record.agent_step, record.format) == (3, 640, "mettaformat")
    assert record.uri == record.path.as_uri() and record.size == record.path.stat().st_size
    assert record == store.records()[0]
    with pytest.raises(TypeError):
        record.metadata["score"] = 1.0  # type: ignore[index]
    assert not [p for p in (tmp_path / "ckpts").iterdir() if p.name.endswith(TEMP_SUFFIX)]
    # A bare module is accepted too.
    bare = store.save(name="bare.mfmt", agent=TinyNet(), model_type=MODEL_TYPE, metadata={"epoch": 9})
    assert isinstance(store.load(bare).model, TinyNet)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metadata": {"score": 1.0}}, "no non-negative integer 'epoch'"),
        ({"name": "../escape.mfmt"}, "plain file name"),
        ({"name": "sub/x.mfmt"}, "plain file name"),
        ({"name": "C:\\x.mfmt"}, "plain file name"),
        ({"name": "/abs.mfmt"}, "plain file name"),
        ({"name": "model.pt"}, "must end in .mfmt"),
        ({"name": INDEX_FILE_NAME}, "reserved"),
        ({"name": "x.mfmt" + TEMP_SUFFIX}, "reserved"),
    ],
)
def test_save_rejects_bad_names(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    agent = MettaAgent(TinyNet(), model_type=MODEL_TYPE)
    with pytest.raises(StoreError, match=match):
        PolicyStore(tmp_path).save(agent=agent, **kwargs)
    assert not list(tmp_path.iterdir())


def test_save_needs_a_root_or_a_path_and_an_agent(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no root"):
        PolicyStore().save(agent=TinyNet(), metadata={"epoch": 1})
    with pytest.raises(TypeError):
        PolicyStore(tmp_path).save(metadata={"epoch": 1})
    record = PolicyStore().save(path=tmp_path / "explicit.mfmt", agent=TinyNet(), model_type=MODEL_TYPE)
    assert record.path.exists()


def test_save_cleans_old_temp_files_but_not_young_ones(tmp_path: Path) -> None:
    old = tmp_path / f".model_0001.mfmt.aaaa{TEMP_SUFFIX}"
    young = tmp_path / f".model_0002.mfmt.bbbb{TEMP_SUFFIX}"
    for p in (old, young):
        p.write_bytes(b"partial")
    os.utime(old, (0, 0))
    PolicyStore(tmp_path).save(agent=TinyNet(), model_type=MODEL_TYPE, metadata={"epoch": 3})
    assert not old.exists() and young.exists()


# -- URIs ---------------------------------------------------------------------------------------
def test_uri_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for e in (1, 2):
        write_mfmt(tmp_path, f"model_{e:04d}.mfmt", {"epoch": e})
    (tmp_path / "other.mfmt").write_bytes((tmp_path / "model_0001.mfmt").read_bytes())
    store = PolicyStore()
    names = lambda uri: sorted(r.name for r in store.records(uri))  # noqa: E731
    assert names(tmp_path) == ["model_0001.mfmt", "model_0002.mfmt", "other.mfmt"]
    assert names(str(tmp_path / "model_0001.mfmt")) == ["model_0001.mfmt"]
    assert names(f"file://{tmp_path}") == names(tmp_path)
    assert names((tmp_path / "model_0002.mfmt").as_uri()) == ["model_0002.mfmt"]
    assert names(str(tmp_path / "model_*.mfmt")) == ["model_0001.mfmt", "model_0002.mfmt"]
    monkeypatch.chdir(tmp_path.parent)
    assert names(f"file://{tmp_path.name}/model_0002.mfmt") == ["model_0002.mfmt"]  # relative file:// URI
    assert names(f"{tmp_path.name}/model_000[12].mfmt") == ["model_0001.mfmt", "model_0002.mfmt"]
    # Percent-escapes, as Path.as_uri() writes them.
    spaced = tmp_path / "with space"
    spaced.mkdir()
    write_mfmt(spaced, "model_0003.mfmt", {"epoch": 3})
    assert names(spaced.as_uri()) == ["model_0003.mfmt"]
    assert store.records(str(tmp_path / "nothing_*.mfmt")) == []
    with pytest.raises(StoreError, match="No policy records found"):
        store.records(tmp_path / "missing")


def test_unknown_scheme_names_registered_ones_and_handlers_plug_in(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"unknown URI scheme 'nope'.*registered schemes: .*file"):
        PolicyStore().records("nope://bucket/run")
    write_mfmt(tmp_path, "model_0004.mfmt", {"epoch": 4, "score": 1.0})

    class MemHandler:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def list_files(self, uri: str) -> list[Path]:
            self.calls.append(uri)
            return [tmp_path / "model_0004.mfmt"]

    handler = MemHandler()
    register_scheme("memtest", handler, replace=True)
    with pytest.raises(ValueError, match="already registered"):
        register_scheme("memtest", handler)
    with pytest.raises(ValueError, match="invalid URI scheme"):
        register_scheme("1bad", handler)
    records = PolicyStore().records("memtest://anything")
    assert [r.name for r in records] == ["model_0004.mfmt"] and handler.calls == ["memtest://anything"]
    assert isinstance(PolicyStore().policy("memtest://anything").model, TinyNet)


# -- what is never listed (threat model FS1, FS2, WR5) ----------------------------------------------------
def test_listing_skips_temp_files_index_symlinks_and_special_files(tmp_path: Path) -> None:
    real = write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1})
    (tmp_path / f".model_0002.mfmt.0123{TEMP_SUFFIX}").write_bytes(b"in progress")
    (tmp_path / f"model_0003.mfmt{TEMP_SUFFIX}").write_bytes(b"in progress")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    os.symlink("/dev/zero", tmp_path / "zero.mfmt")
    os.symlink(real, tmp_path / "latest.mfmt")
    os.mkfifo(tmp_path / "fifo.pt")
    os.mkdir(tmp_path / "dir.mfmt")
    store = PolicyStore(tmp_path)
    scan = store.scan()
    assert [r.name for r in scan.records] == ["model_0001.mfmt"] and scan.unreadable == ()
    assert (tmp_path / INDEX_FILE_NAME).exists()
    assert [r.name for r in store.scan(str(tmp_path / "*")).records] == ["model_0001.mfmt"]
    # Named explicitly: a FIFO or a temp file is refused, a link to a checkpoint is followed.
    with pytest.raises(StoreError, match="not a regular file"):
        store.records(tmp_path / "fifo.pt")
    with pytest.raises(StoreError, match="incomplete checkpoint"):
        store.records(tmp_path / f"model_0003.mfmt{TEMP_SUFFIX}")
    assert [r.path for r in store.records(tmp_path / "latest.mfmt")] == [real]


def test_unreadable_files_are_reported_not_raised(tmp_path: Path) -> None:
    write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1})
    (tmp_path / "model_0002.mfmt").write_bytes(b"MFMT garbage")
    (tmp_path / "model_0003.pt").write_bytes(b"\x00" * 64)
    scan = PolicyStore(tmp_path).scan()
    assert [r.name for r in scan.records] == ["model_0001.mfmt"]
    assert sorted(e.path.name for e in scan.unreadable) == ["model_0002.mfmt", "model_0003.pt"]
    assert all(e.reason == "unreadable" and e.detail for e in scan.unreadable)
    with pytest.raises(StoreError, match=r"No policy records found.*unreadable"):
        PolicyStore().policy(tmp_path / "model_0002.mfmt")


# -- metadata only: headers, never weights --------------------------------------------------------
def test_listing_and_selecting_never_load_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for e in range(5):
        write_mfmt(tmp_path, f"model_{e:04d}.mfmt", {"epoch": e, "score": float(e)})

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were read")

    from mettaformat.container.reader import LazyCheckpoint

    monkeypatch.setattr(LazyCheckpoint, "load_section", boom)
    monkeypatch.setattr(LazyCheckpoint, "get_tensor", boom)
    monkeypatch.setattr(LazyCheckpoint, "state_dict", boom)
    monkeypatch.setattr(catalog_mod, "load_any", boom)  # containers are read by header
    monkeypatch.setattr(store_mod, "load_any", boom)
    store = PolicyStore(tmp_path, use_index=False)
    assert [r.epoch for r in store.records()] == [4, 3, 2, 1, 0]
    assert [r.epoch for r in store.select(n=2)] == [4, 3]
    assert [r.epoch for r in store.select(selector="random", n=3, seed=1)]


# -- the index -----------------------------------------------------------------------------------
def test_index_is_used_validated_and_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for e in range(4):
        write_mfmt(tmp_path, f"model_{e:04d}.mfmt", {"epoch": e, "score": e / 10, "eval_scores": {"nav": 1.0}})
    first = PolicyStore(tmp_path).records()
    raw = decode_msgpack((tmp_path / INDEX_FILE_NAME).read_bytes(), region="test")
    assert raw["format"] == "mettaformat-store-index" and sorted(raw["entries"]) == [r.name for r in first[::-1]]

    reads: list[Path] = []
    real_read = catalog_mod.read_record

    def counting(path: Path, signature: Any) -> PolicyRecord:
        reads.append(path)
        return real_read(path, signature)

    monkeypatch.setattr(catalog_mod, "read_record", counting)
    assert PolicyStore(tmp_path).records() == first and reads == []  # a fresh store: all from the index

    # A rewritten file is read again (its mtime/size/inode changed); the others still come from the index.
    write_mfmt(tmp_path, "model_0002.mfmt", {"epoch": 2, "score": 0.99})
    again = PolicyStore(tmp_path).records()
    assert reads == [tmp_path / "model_0002.mfmt"]
    assert [r.metadata["score"] for r in again] == [0.3, 0.99, 0.1, 0.0]
    assert read_index(tmp_path)["model_0002.mfmt"].metadata["score"] == 0.99

    # A damaged index is ignored and rebuilt; a symlinked one is never read.
    (tmp_path / INDEX_FILE_NAME).write_bytes(b"\xc1 not msgpack")
    reads.clear()
    assert PolicyStore(tmp_path).records() == again and len(reads) == 4
    assert len(read_index(tmp_path)) == 4
    evil = tmp_path / "elsewhere"
    evil.mkdir()
    (tmp_path / INDEX_FILE_NAME).rename(evil / INDEX_FILE_NAME)
    os.symlink(evil / INDEX_FILE_NAME, tmp_path / INDEX_FILE_NAME)
    assert read_index(tmp_path) == {}


def test_index_skips_metadata_that_would_not_round_trip(tmp_path: Path) -> None:
    write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1, "shape": (3, 4)})  # a tuple comes back as a list
    write_mfmt(tmp_path, "model_0002.mfmt", {"epoch": 2, "shape": [3, 4]})
    store = PolicyStore(tmp_path)
    records = {r.name: r for r in store.records()}
    assert records["model_0001.mfmt"].metadata["shape"] == (3, 4)
    assert sorted(read_index(tmp_path)) == ["model_0002.mfmt"]
    assert {r.name: r for r in PolicyStore(tmp_path).records()} == records


def test_index_off_writes_nothing(tmp_path: Path) -> None:
    write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1})
    PolicyStore(tmp_path, use_index=False).records()
    assert not (tmp_path / INDEX_FILE_NAME).exists()


def test_an_unwritable_index_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1})

    def refuse(path: Any, **kwargs: Any) -> Any:
        raise WriteError(f"cannot create a temp file beside {path}: Read-only file system")

    # A read-only directory (root ignores permission bits, so the failure is injected).
    monkeypatch.setattr(index_mod, "atomic_fd", refuse)
    assert [r.name for r in PolicyStore(tmp_path).records()] == ["model_0001.mfmt"]
    assert not (tmp_path / INDEX_FILE_NAME).exists()


# -- loading and the cache -----------------------------------------------------------------------
def test_cache_hits_and_reloads_changed_files(tmp_path: Path) -> None:
    path = write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1}, seed=1)
    store = PolicyStore(tmp_path, cache_size=2)
    a = store.policy(path)
    assert store.policy(path) is a and len(store.cache) == 1
    write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1}, seed=2)  # same name, new content
    b = store.policy(path)
    assert b is not a and not torch.equal(a.model.fc.weight, b.model.fc.weight)
    with pytest.raises(ValueError, match="Cache size must be positive"):
        PolicyStore(cache_size=0)


def test_load_refuses_a_file_replaced_after_listing(tmp_path: Path) -> None:
    write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1, "score": 0.1})
    store = PolicyStore(tmp_path)
    (record,) = store.records()
    write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1, "score": 0.9}, seed=5)
    with pytest.raises(StoreError, match="changed since it was listed"):
        store.load(record)
    (tmp_path / "model_0001.mfmt").unlink()
    with pytest.raises(StoreError, match="cannot be loaded"):
        store.load(record)


def test_policy_of_a_directory_is_the_latest(tmp_path: Path) -> None:
    for e in (3, 10, 7):
        write_mfmt(tmp_path, f"model_{e:04d}.mfmt", {"epoch": e}, seed=e)
    agent = PolicyStore().policy(tmp_path)
    assert agent.metadata["epoch"] == 10 and agent.uri == (tmp_path / "model_0010.mfmt").as_uri()
    with pytest.raises(StoreError, match="No policy records found"):
        PolicyStore().policy(tmp_path / "empty_*.mfmt")


# -- legacy .pt files beside containers ----------------------------------------------------------
@requires_legacy
def test_mixed_directory_lists_and_loads_both(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_mfmt(tmp_path, "model_0002.mfmt", {"epoch": 2, "score": 0.2}, seed=2)
    write_legacy(tmp_path, "model_0001.pt", {"epoch": 1, "agent_step": 10, "score": 0.5}, model_type=MODEL_TYPE)
    store = PolicyStore(tmp_path)
    records = store.records()
    assert [(r.name, r.format) for r in records] == [("model_0002.mfmt", "mettaformat"), ("model_0001.pt", "torch-zip")]
    legacy = records[1]
    assert legacy.metadata["score"] == 0.5 and legacy.epoch == 1 and legacy.model_type == MODEL_TYPE
    agents = store.policies(n=2, metric="score")
    assert [a.metadata["score"] for a in agents] == [0.5, 0.2]
    assert all(isinstance(a.model, TinyNet) for a in agents)

    # The index spares the full unpickle of the legacy file next time.
    imports: list[Path] = []
    real = catalog_mod.load_any

    def counting(path: Any, **kwargs: Any) -> Any:
        imports.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(catalog_mod, "load_any", counting)
    assert PolicyStore(tmp_path).records() == records and imports == []


@pytest.mark.parametrize("how", ["derived name", "name=", "path="])
def test_save_never_replaces_an_existing_checkpoint_unless_asked(tmp_path: Path, how: str) -> None:
    store = PolicyStore(tmp_path)
    target = tmp_path / "model_0003.mfmt"
    where: dict[str, Any] = {"derived name": {}, "name=": {"name": target.name}, "path=": {"path": target}}[how]
    first = store.save(agent=TinyNet(), model_type=MODEL_TYPE, metadata={"epoch": 3, "score": 1.0}, **where)
    before = target.read_bytes()
    with pytest.raises(StoreError, match="already exists; pass overwrite=True"):
        store.save(agent=TinyNet(), model_type=MODEL_TYPE, metadata={"epoch": 3, "score": 2.0}, **where)
    assert target.read_bytes() == before and store.records()[0].metadata["score"] == 1.0
    second = store.save(
        agent=TinyNet(), model_type=MODEL_TYPE, metadata={"epoch": 3, "score": 2.0}, overwrite=True, **where
    )
    assert second.metadata["score"] == 2.0 and second.ino != first.ino
