"""Selectors: top / latest / random / all, on records and on crafted directories."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import pytest

from mettaformat.errors import StoreError
from mettaformat.store import PolicyRecord, PolicyStore, PolicyStoreWarning
from mettaformat.store.record import agent_step_of, effective_epoch
from mettaformat.store.selectors import lookup_metric, select_records
from tests.workers.store_helpers import requires_legacy, write_legacy, write_mfmt


def rec(name: str, mtime_ns: int = 0, **metadata: Any) -> PolicyRecord:
    path = Path("/ckpt") / name
    return PolicyRecord(
        path=path,
        uri=path.as_uri(),
        name=name,
        metadata=metadata,
        epoch=effective_epoch(metadata, name),
        agent_step=agent_step_of(metadata),
        mtime_ns=mtime_ns,
        size=1,
        format="mettaformat",
    )


def names(records: Any) -> list[str]:
    return [r.name for r in records]


# -- latest ---------------------------------------------------------------------------------------
def test_latest_orders_by_epoch_then_step_then_mtime_then_name() -> None:
    records = [
        rec("a.mfmt", epoch=5, agent_step=100, mtime_ns=9),
        rec("b.mfmt", epoch=5, agent_step=200, mtime_ns=1),
        rec("c.mfmt", epoch=5, agent_step=200, mtime_ns=5),
        rec("e.mfmt", epoch=5, agent_step=200, mtime_ns=5),
        rec("d.mfmt", epoch=4, agent_step=999, mtime_ns=99),
    ]
    expected = ["e.mfmt", "c.mfmt", "b.mfmt", "a.mfmt", "d.mfmt"]
    for order in (records, records[::-1], records[2:] + records[:2]):
        assert names(select_records(order, selector="all")) == expected
        assert names(select_records(order, selector="latest", n=2)) == expected[:2]


def test_epoch_falls_back_to_the_file_name() -> None:
    era_d_default = {"agent_step": 0, "epoch": 0, "generation": 0, "train_time": 0.0}
    assert rec("model_0042.pt", **era_d_default).epoch == 42
    assert rec("model_0042.pt").epoch == 42  # no epoch at all
    assert rec("model_0042.pt", epoch=7).epoch == 7  # a real epoch wins over the name
    assert rec("model_0042.pt", **{**era_d_default, "agent_step": 5}).epoch == 0  # not the all-zero default
    assert rec("run.mfmt", **era_d_default).epoch == 0
    assert rec("model_0042.pt", epoch=True).epoch == 42  # bool is not a count
    assert rec("x.mfmt", epoch=3.0).epoch == 3
    records = [rec("model_0010.pt", **era_d_default), rec("model_0002.pt", epoch=2), rec("model_0007.mfmt")]
    assert names(select_records(records, selector="latest", n=3)) == [
        "model_0010.pt",
        "model_0007.mfmt",
        "model_0002.pt",
    ]


# -- top ------------------------------------------------------------------------------------------
def test_top_max_min_ties_nan_missing_and_exclusions() -> None:
    records = [
        rec("model_0001.mfmt", epoch=1, score=0.5),
        rec("model_0002.mfmt", epoch=2, score=0.9),
        rec("model_0003.mfmt", epoch=3, score=0.5),  # ties with epoch 1: the newer wins
        rec("model_0004.mfmt", epoch=4, score=math.nan),
        rec("model_0005.mfmt", epoch=5),
        rec("model_0006.mfmt", epoch=6, score="high"),
        rec("model_0007.mfmt", epoch=7, score=None),
        rec("model_0008.mfmt", epoch=8, score=True),
        rec("model_0009.mfmt", epoch=9, score=-math.inf),
    ]
    best = select_records(records, n=3, metric="score", mode="max")
    assert names(best) == ["model_0002.mfmt", "model_0003.mfmt", "model_0001.mfmt"]
    assert best.shortfall == 0 and not best.fell_back and best.candidates == 9
    reasons = {e.path.name: e.reason for e in best.excluded}
    assert reasons == {
        "model_0004.mfmt": "nan_metric",
        "model_0005.mfmt": "missing_metric",
        "model_0006.mfmt": "non_numeric_metric",
        "model_0007.mfmt": "missing_metric",
        "model_0008.mfmt": "non_numeric_metric",
    }
    worst = select_records(records, n=3, metric="score", mode="min")
    assert names(worst) == ["model_0009.mfmt", "model_0003.mfmt", "model_0001.mfmt"]
    many = select_records(records, n=10)
    assert len(many) == 4 and many.shortfall == 6 and "6 fewer than the 10 requested" in many.describe()


def test_metric_lookup_top_level_eval_scores_and_score_stem() -> None:
    md = {"score": 1.0, "eval_scores": {"score": 2.0, "navigation": 3.0, "nav_score": 4.0, "obj": None}}
    assert lookup_metric(md, "score")[:2] == (1.0, None)  # top level first
    assert lookup_metric(md, "navigation")[:2] == (3.0, None)
    assert lookup_metric(md, "navigation_score") == (3.0, None, "eval_scores.navigation")  # the stem
    assert lookup_metric(md, "nav_score")[:2] == (4.0, None)  # an exact name beats the stem
    assert lookup_metric(md, "obj")[1] == "missing_metric"
    assert lookup_metric(md, "_score")[1] == "missing_metric"  # no empty stem
    assert lookup_metric({"eval_scores": [1, 2]}, "x")[1] == "missing_metric"
    records = [
        rec("model_0001.mfmt", epoch=1, eval_scores={"navigation": 0.7}),
        rec("model_0002.mfmt", epoch=2, navigation_score=0.6),
        rec("model_0003.mfmt", epoch=3, eval_scores={"navigation_score": 0.8}),
    ]
    assert names(select_records(records, n=3, metric="navigation_score")) == [
        "model_0003.mfmt",
        "model_0001.mfmt",
        "model_0002.mfmt",
    ]


def test_fallback_to_latest_below_eighty_percent() -> None:
    scored = [rec(f"model_{e:04d}.mfmt", epoch=e, score=float(-e)) for e in range(1, 8)]
    unscored = [rec(f"model_{e:04d}.mfmt", epoch=e) for e in range(8, 11)]  # 7 of 10 = 70% scored
    strict = select_records(scored + unscored, n=2)
    assert names(strict) == ["model_0001.mfmt", "model_0002.mfmt"] and not strict.fell_back
    fallback = select_records(scored + unscored, n=2, fallback_to_latest=True)
    assert names(fallback) == ["model_0010.mfmt", "model_0009.mfmt"] and fallback.fell_back
    assert "so the latest were returned" in fallback.describe() and len(fallback.excluded) == 3
    enough = select_records(scored + unscored[:1], n=2, fallback_to_latest=True)  # 7 of 8 = 87.5%
    assert names(enough) == ["model_0001.mfmt", "model_0002.mfmt"] and not enough.fell_back
    none = select_records(unscored, n=2)
    assert len(none) == 0 and none.shortfall == 2


# -- random and all -------------------------------------------------------------------------------
def test_random_is_seeded_distinct_and_bounded() -> None:
    records = [rec(f"model_{e:04d}.mfmt", epoch=e) for e in range(20)]
    a = select_records(records, selector="random", n=5, seed=7)
    b = select_records(records[::-1], selector="random", n=5, seed=7)  # input order does not matter
    assert names(a) == names(b) and len(set(names(a))) == 5
    assert any(names(select_records(records, selector="random", n=5, seed=s)) != names(a) for s in range(1, 5))
    everything = select_records(records[:3], selector="random", n=5, seed=1)
    assert sorted(names(everything)) == names(records[:3]) and everything.shortfall == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"selector": "rand"}, "Invalid selector type 'rand'"),
        ({"mode": "maximum"}, "Invalid mode"),
        ({"n": 0}, "positive integer"),
        ({"n": True}, "positive integer"),
    ],
)
def test_bad_arguments_are_store_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(StoreError, match=match):
        select_records([rec("a.mfmt")], **kwargs)


# -- on crafted directories -----------------------------------------------------------------------
def test_store_policies_warns_on_shortfall_and_raises_when_nothing_qualifies(tmp_path: Path) -> None:
    write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1, "score": 0.3})
    write_mfmt(tmp_path, "model_0002.mfmt", {"epoch": 2, "score": math.nan})
    write_mfmt(tmp_path, "model_0003.mfmt", {"epoch": 3})
    store = PolicyStore(tmp_path)
    with pytest.warns(PolicyStoreWarning, match="1 of 3 checkpoints, 2 fewer than the 3 requested"):
        agents = store.policies(n=3)
    assert [a.metadata["epoch"] for a in agents] == [1]
    with pytest.raises(StoreError, match=r"qualifies.*3 missing_metric"):
        store.policies(metric="reward")
    with pytest.warns(PolicyStoreWarning, match="latest were returned"):
        fell_back = store.policies(metric="reward", fallback_to_latest=True)
    assert fell_back[0].metadata["epoch"] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(store.policies(selector="all", n=1)) == 3
        assert store.policies(selector="latest")[0].metadata["epoch"] == 3


def test_store_select_on_a_directory_with_equal_epochs(tmp_path: Path) -> None:
    base = 1_700_000_000_000_000_000
    write_mfmt(tmp_path, "b.mfmt", {"epoch": 4, "agent_step": 10}, mtime_ns=base + 5)
    write_mfmt(tmp_path, "a.mfmt", {"epoch": 4, "agent_step": 10}, mtime_ns=base + 5)
    write_mfmt(tmp_path, "c.mfmt", {"epoch": 4, "agent_step": 10}, mtime_ns=base + 1)
    write_mfmt(tmp_path, "d.mfmt", {"epoch": 4, "agent_step": 11}, mtime_ns=base)
    for _ in range(2):
        assert names(PolicyStore(tmp_path).select(selector="all")) == ["d.mfmt", "b.mfmt", "a.mfmt", "c.mfmt"]


@requires_legacy
def test_mixed_legacy_and_container_directory(tmp_path: Path) -> None:
    era_d = {"agent_step": 0, "epoch": 0, "generation": 0, "train_time": 0.0}
    write_legacy(tmp_path, "model_0005.pt", {**era_d, "eval_scores": {"navigation": 0.8}})
    write_legacy(tmp_path, "model_0003.pt", {"epoch": 3, "agent_step": 30, "score": 0.4})
    write_legacy(tmp_path, "model_0002.pt", {"epoch": 2, "score": math.nan})
    write_mfmt(tmp_path, "model_0004.mfmt", {"epoch": 4, "score": 0.6, "eval_scores": {"navigation": 0.1}})
    write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1, "score": 0.9})
    (tmp_path / "model_0006.pt").write_bytes(b"PK\x03\x04 truncated zip")
    store = PolicyStore(tmp_path)
    assert names(store.select(selector="all")) == [
        "model_0005.pt",
        "model_0004.mfmt",
        "model_0003.pt",
        "model_0002.pt",
        "model_0001.mfmt",
    ]
    top = store.select(n=2, metric="score")
    assert names(top) == ["model_0001.mfmt", "model_0004.mfmt"]
    assert {e.path.name: e.reason for e in top.excluded} == {
        "model_0006.pt": "unreadable",
        "model_0005.pt": "missing_metric",
        "model_0002.pt": "nan_metric",
    }
    nav = store.select(n=5, metric="navigation_score", mode="min")
    assert names(nav) == ["model_0004.mfmt", "model_0005.pt"] and nav.shortfall == 3
    assert names(store.select(selector="latest", n=1)) == ["model_0005.pt"]
