"""A checkpoint's own fields (agent attributes, versions, training and RNG trees) are type-checked
before any consumer uses them; one bad file never stops a listing or a batch."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mettaformat
from mettaformat.checkpoint_io import CHECKPOINT_KEY
from mettaformat.compat import CompatibilityLevel, check_checkpoint_compatibility
from mettaformat.container.writer import write_container
from mettaformat.errors import HeaderError, MettaFormatError
from mettaformat.store import LatestN, PolicyStore
from mettaformat.store.index import INDEX_FILE_NAME, read_index
from tests.workers.store_helpers import write_mfmt

GOOD_OWN: dict[str, Any] = {"model_type": "pytorch", "versions": {"checkpoint_format": 3}}

BAD_OWN: dict[str, dict[str, Any]] = {
    "agent_attributes a list": {"agent_attributes": [1, 2, 3]},
    "agent_attributes int keys": {"agent_attributes": {1: "x"}},
    "versions a list": {"versions": ["v1"]},
    "version a list": {"versions": {"observation_space": [1, 2]}},
    "version a float": {"versions": {"action_space": 1.5}},
    "version a bool": {"versions": {"layer": True}},
    "checkpoint_format a string": {"versions": {"checkpoint_format": "3"}},
    "model_type an int": {"model_type": 7},
    "name bytes": {"name": b"policy"},
    "provenance a string": {"provenance": "x"},
    "container_version garbage": {"provenance": {"container_version": "3.x"}},
    "config a list": {"config": [1]},
}

BAD_TREES: dict[str, dict[str, Any]] = {
    "optimizer a list": {"optimizer": [1, 2]},
    "optimizer without param_groups": {"optimizer": {"state": {}}},
    "optimizer state a list": {"optimizer": {"state": [], "param_groups": []}},
    "trainer_state a string": {"trainer_state": "epoch 5"},
    "rng a list": {"rng": [1]},
    "rng torch a float tensor": {"rng": {"torch": torch.ones(4)}},
    "rng python short": {"rng": {"python": [3, [1, 2]]}},
    "rng cuda not a list": {"rng": {"cuda": torch.ones(2, dtype=torch.uint8)}},
    "rng numpy missing keys": {"rng": {"numpy": {"kind": "MT19937"}}},
    "scheduler an int": {"scheduler": 5},
}


def _write(path: Path, own: dict[str, Any] | None = None, trees: dict[str, Any] | None = None) -> Path:
    metadata = {"epoch": 1, CHECKPOINT_KEY: {**GOOD_OWN, **(own or {})}}
    write_container(path, {"model": {"w": torch.ones(2)}}, metadata=metadata, trees=trees or {})
    return path


CASES = {
    **{f"own: {k}": (v, None) for k, v in BAD_OWN.items()},
    **{f"tree: {k}": (None, v) for k, v in BAD_TREES.items()},
}


def _consumers() -> dict[str, Callable[[Path], Any]]:
    from mettaformat.convert import convert

    return {
        "load_any": lambda p: mettaformat.load_any(p),
        "load_for_training": lambda p: mettaformat.MettaAgent.load_for_training(p, model=_W()),
        "convert": lambda p: convert(p, p.with_name("out.safetensors")),
    }


class _W(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_fields_end_in_a_header_error_naming_the_field(tmp_path: Path, case: str) -> None:
    own, trees = CASES[case]
    path = _write(tmp_path / "bad.mfmt", own, trees)
    training_only = case.startswith("tree:")
    for name, consume in _consumers().items():
        if training_only and name == "convert":
            continue
        with pytest.raises(HeaderError) as info:
            consume(path)
        assert str(path) in str(info.value), (name, info.value)
    report = check_checkpoint_compatibility(path)  # documented never to raise
    if not training_only:
        assert report.level is CompatibilityLevel.UNKNOWN and report.errors


@pytest.mark.parametrize("case", sorted(BAD_OWN))
def test_a_malformed_file_never_stops_a_listing_or_a_prune(tmp_path: Path, case: str) -> None:
    for epoch in (1, 2, 3):
        write_mfmt(tmp_path, f"model_{epoch:04d}.mfmt", {"epoch": epoch})
    _write(tmp_path / "model_0009.mfmt", BAD_OWN[case])
    store = PolicyStore(tmp_path)
    scan = store.scan()
    assert [r.epoch for r in store.records()] == [3, 2, 1]
    assert [e.path.name for e in scan.unreadable] == ["model_0009.mfmt"]
    report = store.prune(LatestN(1))
    assert [r.epoch for r in report.deleted] == [2, 1]
    assert (tmp_path / "model_0009.mfmt").exists() and report.skipped


def test_a_good_training_checkpoint_still_passes(tmp_path: Path) -> None:
    model = _W()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = mettaformat.MettaAgent(model, model_type="pytorch")
    agent.save_for_training(tmp_path / "t.mfmt", optimizer=opt, trainer_state={"epoch": 2})
    fresh = _W()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = mettaformat.MettaAgent.load_for_training(
            tmp_path / "t.mfmt", model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1)
        )
    assert loaded.trainer_state == {"epoch": 2}


def test_an_optimizer_state_that_does_not_fit_is_a_clear_error(tmp_path: Path) -> None:
    groups = [{"lr": 0.1, "params": [0, 1, 2]}]  # three parameters; the model has one
    path = _write(tmp_path / "t.mfmt", trees={"optimizer": {"state": {}, "param_groups": groups}})
    model = _W()
    with pytest.raises(MettaFormatError, match="does not fit this optimizer"):
        mettaformat.MettaAgent.load_for_training(path, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1))


def test_index_entries_with_bytes_keys_are_ignored(tmp_path: Path) -> None:
    from mettaformat.container.header import encode_msgpack

    write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1})
    store = PolicyStore(tmp_path)
    (record,) = store.records()
    entry = {
        "mtime_ns": record.mtime_ns,
        "size": record.size,
        "ino": record.ino,
        "format": "mettaformat",
        "epoch": 77,
        "agent_step": 0,
        "model_type": None,
        "metadata": {b"epoch": 77},
    }
    payload = {
        "format": "mettaformat-store-index",
        "version": 1,
        "entries": {"model_0001.mfmt": entry, b"model_0002.mfmt": entry},
    }
    (tmp_path / INDEX_FILE_NAME).write_bytes(encode_msgpack(payload))
    assert read_index(tmp_path) == {}
    assert [r.epoch for r in PolicyStore(tmp_path).records()] == [1]  # read from the file, not the index


def test_one_failing_file_never_stops_migrate_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mettaformat import migrate as migrate_mod

    for i in range(3):
        torch.save({"w": torch.full((2,), float(i))}, tmp_path / f"m{i}.pt")
    real = migrate_mod.load_any

    def flaky(path: Any, **kw: Any) -> Any:
        if Path(path).name == "m1.pt":
            raise TypeError("a bug reached by one file")
        return real(path, **kw)

    monkeypatch.setattr(migrate_mod, "load_any", flaky)
    summary = migrate_mod.migrate(tmp_path)
    status = {Path(r.src).name: r.status for r in summary.results}
    assert status == {"m0.pt": "migrated", "m1.pt": "failed", "m2.pt": "migrated"}
    (failed,) = [r for r in summary.results if r.status == "failed"]
    assert "TypeError: a bug reached by one file" in (failed.reason or "")
