"""Retention policies and PolicyStore.prune: unions, dry runs, safety rules, temp-file cleanup."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import pytest

from mettaformat._atomic import TEMP_SUFFIX
from mettaformat.errors import StoreError
from mettaformat.store import INDEX_FILE_NAME, AnyOf, BestN, EveryNEpochs, LatestN, PolicyRecord, PolicyStore
from mettaformat.store.index import read_index
from mettaformat.store.maintenance import clean_temp_files
from tests.workers.store_helpers import write_mfmt

SCORES = {1: 0.9, 2: 0.1, 3: 0.5, 4: math.nan, 5: None, 6: 0.7, 7: 0.2, 8: 0.3, 9: 0.05, 10: 0.4}


def rec(epoch: int, **metadata: Any) -> PolicyRecord:
    name = f"model_{epoch:04d}.mfmt"
    return PolicyRecord(
        path=Path("/ckpt") / name,
        uri=f"file:///ckpt/{name}",
        name=name,
        metadata={"epoch": epoch, **metadata},
        epoch=epoch,
        agent_step=0,
        mtime_ns=0,
        size=1,
        format="mettaformat",
    )


RECORDS = [rec(e, **({"score": s} if s is not None else {})) for e, s in SCORES.items()]


def epochs(paths: frozenset[Path]) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in paths)


def test_each_policy() -> None:
    assert epochs(LatestN(3).keep(RECORDS)) == [8, 9, 10]
    assert epochs(LatestN(0).keep(RECORDS)) == []
    assert epochs(BestN(2, "score").keep(RECORDS)) == [1, 4, 5, 6]  # + unscored (NaN, missing) kept
    assert epochs(BestN(2, "score", keep_unscored=False).keep(RECORDS)) == [1, 6]
    assert epochs(BestN(2, "score", mode="min", keep_unscored=False).keep(RECORDS)) == [2, 9]
    assert epochs(EveryNEpochs(4).keep(RECORDS)) == [4, 8]
    assert epochs(EveryNEpochs(4).keep([rec(0), rec(3)])) == [0]


def test_unions_compose_and_flatten() -> None:
    union = LatestN(2) | BestN(2, "score", keep_unscored=False) | EveryNEpochs(5)
    assert isinstance(union, AnyOf) and len(union.policies) == 3
    assert union == AnyOf(LatestN(2), AnyOf(BestN(2, "score", keep_unscored=False), EveryNEpochs(5)))
    assert epochs(union.keep(RECORDS)) == [1, 5, 6, 9, 10]
    assert epochs(AnyOf().keep(RECORDS)) == []
    assert repr(union).startswith("LatestN(n=2) | BestN(")
    assert hash(union) == hash(AnyOf(*union.policies))
    with pytest.raises(TypeError):
        AnyOf(LatestN(1), "latest")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: LatestN(-1),
        lambda: LatestN(True),
        lambda: BestN(1.5),
        lambda: BestN(1, metric=""),
        lambda: BestN(1, mode="best"),
        lambda: EveryNEpochs(0),
    ],
)
def test_invalid_policies_are_programming_errors(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


# -- prune --------------------------------------------------------------------------------------
def make_dir(tmp_path: Path) -> None:
    for epoch, score in SCORES.items():
        write_mfmt(
            tmp_path, f"model_{epoch:04d}.mfmt", {"epoch": epoch, **({"score": score} if score is not None else {})}
        )


def on_disk(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_prune_dry_run_then_for_real(tmp_path: Path) -> None:
    make_dir(tmp_path)
    store = PolicyStore(tmp_path)
    policy = LatestN(2) | BestN(2, "score", keep_unscored=False) | EveryNEpochs(5)
    store.records()  # writes the index (a cache, not a checkpoint)
    before = on_disk(tmp_path)
    dry = store.prune(policy, dry_run=True)
    assert on_disk(tmp_path) == before and dry.dry_run
    assert [r.epoch for r in dry.kept] == [10, 9, 6, 5, 1]
    assert [r.epoch for r in dry.deleted] == [8, 7, 4, 3, 2]
    assert dry.kept_by[tmp_path / "model_0010.mfmt"] == ("LatestN(n=2)", "EveryNEpochs(n=5)")

    report = store.prune(policy)
    assert [r.epoch for r in report.deleted] == [8, 7, 4, 3, 2] and report.skipped == ()
    kept_names = [f"model_{e:04d}.mfmt" for e in (1, 5, 6, 9, 10)]
    assert on_disk(tmp_path) == sorted([INDEX_FILE_NAME, *kept_names])
    assert sorted(read_index(tmp_path)) == kept_names  # deleted files left the index
    assert [r.name for r in store.records()] == kept_names[::-1]
    summary = report.to_dict()
    assert summary["bytes_freed"] == sum(r.size for r in report.deleted) and len(summary["kept"]) == 5


def test_prune_refuses_to_delete_everything_unless_asked(tmp_path: Path) -> None:
    make_dir(tmp_path)
    store = PolicyStore(tmp_path)
    with pytest.raises(StoreError, match="keeps none of the 10"):
        store.prune(LatestN(0))
    assert len(store.records()) == 10
    assert len(store.prune(LatestN(0), allow_delete_all=True).deleted) == 10
    assert store.records() == []
    assert store.prune(LatestN(0)).deleted == ()  # nothing left: nothing to refuse


def test_prune_never_deletes_unreadable_or_changed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dir(tmp_path)
    (tmp_path / "model_0000.mfmt").write_bytes(b"not a container")
    store = PolicyStore(tmp_path)
    # A trainer re-saves epoch 2 between the listing and the deletion.
    from mettaformat.store import maintenance

    real = maintenance.delete_records

    def resave_then_delete(records: Any) -> Any:
        write_mfmt(tmp_path, "model_0002.mfmt", {"epoch": 2, "score": 0.95}, seed=9)
        return real(records)

    monkeypatch.setattr("mettaformat.store.pruning.delete_records", resave_then_delete)
    report = store.prune(LatestN(1))
    skipped = {s.path.name: s.reason for s in report.skipped}
    assert skipped["model_0000.mfmt"].startswith("unreadable")
    assert skipped["model_0002.mfmt"] == "changed since it was listed"
    assert (tmp_path / "model_0000.mfmt").exists() and (tmp_path / "model_0002.mfmt").exists()
    assert len(report.deleted) == 8


def test_prune_evicts_deleted_policies_from_the_cache(tmp_path: Path) -> None:
    make_dir(tmp_path)
    store = PolicyStore(tmp_path)
    store.policies(selector="all")
    assert len(store.cache) == 10
    store.prune(LatestN(3))
    assert sorted(k[0] for k in store.cache.keys()) == [str(tmp_path / f"model_{e:04d}.mfmt") for e in (8, 9, 10)]


def test_temp_files_respect_the_grace_period(tmp_path: Path) -> None:
    write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1})
    now = time.time()
    old = tmp_path / f".model_0002.mfmt.1111{TEMP_SUFFIX}"
    young = tmp_path / f".model_0003.mfmt.2222{TEMP_SUFFIX}"
    link = tmp_path / f".link{TEMP_SUFFIX}"
    for p, age in ((old, 7200), (young, 60)):
        p.write_bytes(b"partial")
        os.utime(p, (now - age, now - age))
    os.symlink(old, link)
    os.utime(link, (now - 9999, now - 9999), follow_symlinks=False)

    assert clean_temp_files(tmp_path, grace_s=3600, dry_run=True) == [old]
    assert old.exists()
    dry = PolicyStore(tmp_path).prune(LatestN(1), dry_run=True)
    assert dry.temp_files_removed == (old,) and old.exists()
    report = PolicyStore(tmp_path).prune(LatestN(1))
    assert report.temp_files_removed == (old,)
    assert not old.exists() and young.exists() and link.is_symlink()  # a link is never touched
    assert PolicyStore(tmp_path).clean_temp_files(grace_s=30) == [young]
    with pytest.raises(ValueError):
        clean_temp_files(tmp_path, grace_s=-1)
