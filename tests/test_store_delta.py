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
