"""Delta saves through MettaAgent and PolicyStore, and retention that keeps the bases kept files need."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import mettaformat
from mettaformat import MettaAgent
from mettaformat.container import delta_write
from mettaformat.container.delta import declared_base
from mettaformat.errors import StoreError
from mettaformat.store import LatestN, PolicyStore, PolicyStoreWarning


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 64, generator=g)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 16))


def test_store_saves_deltas_against_the_latest_full_checkpoint(tmp_path: Path) -> None:
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    store = PolicyStore(tmp_path)
    saved = {}
    for epoch in range(6):
        _train(model, optimizer, 2, epoch)
        store.save(agent=MettaAgent(model, model_type="delta_test"), metadata={"epoch": epoch}, delta=True,
                   full_every=3, compression="zstd")
        saved[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    bases = {e: declared_base(tmp_path / f"model_{e:04d}.mfmt") for e in range(6)}
    assert {e: b.name if b else None for e, b in bases.items()} == {
        0: None, 1: "model_0000.mfmt", 2: "model_0000.mfmt", 3: None, 4: "model_0003.mfmt", 5: "model_0003.mfmt"}
    assert {r.name: r.base for r in store.records()} == {f"model_{e:04d}.mfmt": b for e, b in bases.items()}
    for epoch, state in saved.items():
        loaded = mettaformat.load_file(tmp_path / f"model_{epoch:04d}.mfmt")
        assert all(torch.equal(loaded[k], v) for k, v in state.items())

    report = store.prune(LatestN(1))
    left = sorted(p.name for p in tmp_path.glob("*.mfmt"))
    assert left == ["model_0003.mfmt", "model_0005.mfmt"]  # the base of the kept delta stays
    assert [r.name for r in report.deleted] and "model_0003.mfmt" not in [r.name for r in report.deleted]
    assert torch.equal(mettaformat.load_file(tmp_path / "model_0005.mfmt")["2.bias"], saved[5]["2.bias"])


def test_auto_writes_full_when_the_model_changed(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path)
    store.save(agent=MettaAgent(_model(), model_type="delta_test"), metadata={"epoch": 0}, delta="auto")
    other = nn.Sequential(nn.Linear(64, 32))
    store.save(agent=MettaAgent(other, model_type="delta_test"), metadata={"epoch": 1}, delta="auto")
    assert declared_base(tmp_path / "model_0001.mfmt") is None
    store.save(agent=MettaAgent(_model(), model_type="delta_test"), metadata={"epoch": 2}, delta="auto")
    # model_0001 is the latest full checkpoint of the run, and it shares too little: full again
    assert declared_base(tmp_path / "model_0002.mfmt") is None
    with pytest.raises(StoreError, match="full_every"):
        store.save(agent=MettaAgent(_model()), metadata={"epoch": 3}, delta=True, full_every=0)


def test_save_for_training_with_base_keeps_optimizer_state_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    monkeypatch.setattr(delta_write, "_MIN_GAIN", 1.0)  # any gain takes a residual: exactness is the point here
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    _train(model, optimizer, 3, 1)
    agent = MettaAgent(model, model_type="delta_test")
    agent.save_for_training(tmp_path / "a.mfmt", optimizer, trainer_state={"epoch": 1}, compression="zstd")
    _train(model, optimizer, 1, 2)
    agent.save_for_training(tmp_path / "b.mfmt", optimizer, trainer_state={"epoch": 2}, base=tmp_path / "a.mfmt")
    with mettaformat.open(tmp_path / "b.mfmt") as ckpt:
        assert ckpt.header.delta is not None and "optimizer" in ckpt.header.delta.tensors
    training = mettaformat.load_any(tmp_path / "b.mfmt").training
    assert training is not None and training.optimizer is not None
    for key, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(training.optimizer["state"][key][name], value), (key, name)
    agent.save(tmp_path / "c.mfmt", base=tmp_path / "a.mfmt")
    assert declared_base(tmp_path / "c.mfmt") == tmp_path / "a.mfmt"


def test_damaged_base_gives_a_full_save_with_a_warning(tmp_path: Path) -> None:
    model = _model()
    store = PolicyStore(tmp_path)
    store.save(agent=MettaAgent(model, model_type="delta_test"), metadata={"epoch": 0})  # raw: bytes at known places
    with mettaformat.open(tmp_path / "model_0000.mfmt") as ckpt:
        s = ckpt.header.section("model")
        assert s is not None
        entry = s.index.get("0.weight")  # a tensor the next save stores as a residual against it
        assert entry is not None
        where = s.offset + s.stream_header_length + entry.begin
    data = bytearray((tmp_path / "model_0000.mfmt").read_bytes())
    data[where] ^= 0xFF
    (tmp_path / "model_0000.mfmt").write_bytes(bytes(data))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-5)
    with pytest.warns(PolicyStoreWarning, match="saved as a full checkpoint.*model_0000.mfmt"):
        record = store.save(agent=MettaAgent(model, model_type="delta_test"), metadata={"epoch": 1}, delta=True)
    assert declared_base(record.path) is None
    loaded = mettaformat.load_file(record.path)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def _chain_of_three(tmp_path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """model_0000 (full) <- model_0001 <- model_0002, each a delta of the one before."""
    g = torch.Generator().manual_seed(7)
    states = {0: {"w": torch.randn(64, 64, generator=g), "b": torch.randn(1024, generator=g)}}
    for e in (1, 2):
        states[e] = {k: v + 1e-5 * torch.randn(v.shape, generator=g) for k, v in states[e - 1].items()}
    for e, state in states.items():
        base = tmp_path / f"model_{e - 1:04d}.mfmt" if e else None
        mettaformat.save_file(state, tmp_path / f"model_{e:04d}.mfmt", metadata={"epoch": e}, compression="zstd",
                              base=base)
    assert declared_base(tmp_path / "model_0002.mfmt") == tmp_path / "model_0001.mfmt"
    with mettaformat.open(tmp_path / "model_0002.mfmt") as ckpt:  # a delta on a delta takes residuals too
        assert ckpt.header.delta is not None and set(ckpt.header.delta.tensors["model"]) == {"w", "b"}
    return states


def test_prune_can_make_kept_deltas_standalone_and_delete_their_bases(tmp_path: Path) -> None:
    states = _chain_of_three(tmp_path)
    store = PolicyStore(tmp_path)
    plan = store.prune(LatestN(2), materialize_dependants=True, dry_run=True)
    # each delta is rewritten before its base, which it is still rebuilt from
    assert list(plan.materialized) == [tmp_path / "model_0002.mfmt", tmp_path / "model_0001.mfmt"]
    assert declared_base(tmp_path / "model_0002.mfmt") is not None  # a dry run changes nothing
    report = store.prune(LatestN(2), materialize_dependants=True)
    assert [r.name for r in report.deleted] == ["model_0000.mfmt"] and not report.skipped
    assert sorted(p.name for p in tmp_path.glob("*.mfmt")) == ["model_0001.mfmt", "model_0002.mfmt"]
    for e in (1, 2):
        assert declared_base(tmp_path / f"model_{e:04d}.mfmt") is None
        loaded = mettaformat.load_file(tmp_path / f"model_{e:04d}.mfmt")
        assert all(torch.equal(loaded[k], v) for k, v in states[e].items())
    assert not list(tmp_path.glob("*.mfmt-tmp"))


def test_prune_keeps_the_bases_of_a_delta_it_cannot_make_standalone(tmp_path: Path) -> None:
    _chain_of_three(tmp_path)
    with mettaformat.open(tmp_path / "model_0000.mfmt") as ckpt:
        s = ckpt.header.section("model")
        assert s is not None
        middle = (s.offset + s.end) // 2
    data = bytearray((tmp_path / "model_0000.mfmt").read_bytes())
    data[middle] ^= 0xFF  # the full base is damaged: nothing on it can be rebuilt
    (tmp_path / "model_0000.mfmt").write_bytes(bytes(data))
    report = PolicyStore(tmp_path).prune(LatestN(1), materialize_dependants=True)
    assert [s.path.name for s in report.skipped] == ["model_0002.mfmt"]
    assert "cannot be made standalone" in report.skipped[0].reason
    assert not report.deleted and not report.materialized
    assert declared_base(tmp_path / "model_0002.mfmt") == tmp_path / "model_0001.mfmt"


def test_prune_cli_materialize_dependants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from mettaformat.cli.main import main

    _chain_of_three(tmp_path)
    assert main(["prune", str(tmp_path), "--keep-last", "1", "--materialize-dependants", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["materialized"] == [str(tmp_path / "model_0002.mfmt")]
    assert sorted(Path(d["path"]).name for d in out["deleted"]) == ["model_0000.mfmt", "model_0001.mfmt"]
    assert declared_base(tmp_path / "model_0002.mfmt") is None
