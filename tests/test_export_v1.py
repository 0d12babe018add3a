"""v1 PolicyRecord export: exact round trips v1 -> mfmt -> v1 -> mfmt, checked by torch.load with stand-ins.

The stand-in classes live only in subprocesses: for the synthesized eras, the modules that
``legacy_helpers/make_eras.py`` wrote; for the real fixtures, a meta-path finder that makes up
a class for every name under the Metta, gym, omegaconf and tensordict packages. This process
never imports anything a file names.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from mettaformat import load_any
from mettaformat.checkpoint import Checkpoint
from mettaformat.container.tree import LegacyObject
from mettaformat.convert import convert
from mettaformat.errors import WriteError
from mettaformat.legacy import import_legacy
from mettaformat.legacy.export import export_v1
from mettaformat.legacy.graph import graph_equal

HELPER = Path(__file__).resolve().parent / "legacy_helpers" / "make_eras.py"
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "metta"

#: argv: [--src DIR] ORIGINAL EXPORTED [ORIGINAL EXPORTED ...]; exit 0 iff every pair matches.
COMPARE = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, math, sys, types
    from collections import OrderedDict
    import numpy as np, torch, torch.nn as nn

    args = sys.argv[1:]
    if args[0] == "--src":
        sys.path.insert(0, args[1]); args = args[2:]
    else:
        from tests.legacy_helpers.standins import install
        install()

    def same(a, b, path, seen):
        if (id(a), id(b)) in seen:
            return
        seen.add((id(a), id(b)))
        if isinstance(a, torch.Tensor):
            assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape, path
            assert torch.equal(a.view(torch.uint8) if a.dtype.is_floating_point and a.numel() == 0 else a, b), path
            return
        if isinstance(a, np.ndarray):
            assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
            return
        if {type(a), type(b)} <= {dict, OrderedDict}:
            # The importer reads every OrderedDict as a dict; module hook tables are restored.
            assert type(a) is type(b) or "hooks" not in path.rsplit(".", 1)[-1], path
        else:
            assert (type(a).__module__, type(a).__qualname__) == (type(b).__module__, type(b).__qualname__), path
        if isinstance(a, dict):
            assert list(a) == list(b), path
            for k in a:
                same(a[k], b[k], f"{path}.{k}", seen)
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), path
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{path}[{i}]", seen)
        elif isinstance(a, float):
            assert a == b or (math.isnan(a) and math.isnan(b)), path
        elif hasattr(a, "__dict__") and not isinstance(a, type):
            same(vars(a), vars(b), path, seen)
        else:
            r = a == b  # some leaves compare elementwise
            assert bool(r.all()) if isinstance(r, (torch.Tensor, np.ndarray)) else bool(r), path

    def policy(obj):
        d = getattr(obj, "__dict__", {})
        return next((d[k] for k in ("_cached_policy", "_policy") if d.get(k) is not None), obj)

    def metadata(obj):
        d = getattr(obj, "__dict__", {})
        return dict(next((d[k] for k in ("_metadata", "metadata") if d.get(k) is not None), {}))

    for original, exported in zip(args[::2], args[1::2]):
        a = torch.load(original, weights_only=False, map_location="cpu")
        b = torch.load(exported, weights_only=False, map_location="cpu")
        sa, sb = policy(a).state_dict(), policy(b).state_dict()
        assert list(sa) == list(sb), original
        assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa), original
        assert metadata(a) == metadata(b), original
        same(policy(a), policy(b), "policy", set())
        if type(a).__name__ == type(b).__name__:
            same(a, b, "root", set())
    print("ok")
    """
)


def _compare_in_subprocess(pairs: list[tuple[Path, Path]], src: Path | None = None) -> None:
    argv = [sys.executable, "-c", COMPARE] + (["--src", str(src)] if src else [])
    argv += [str(p) for pair in pairs for p in pair]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert list(a.tensors) == list(b.tensors)
    assert all(graph_equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert graph_equal(a.metadata, b.metadata)
    assert (a.name, a.uri) == (b.name, b.uri)
    assert graph_equal(a.legacy_graph, b.legacy_graph)


@pytest.fixture(scope="module")
def eras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eras")
    subprocess.run([sys.executable, str(HELPER), str(out)], check=True, capture_output=True, timeout=120)
    return out


ERAS = ("era_a0", "era_a1", "era_a2", "era_c", "era_d", "era_d2", "legacy_stream_d")


def test_v1_mfmt_v1_mfmt_round_trip_every_era(eras: Path, tmp_path: Path) -> None:
    pairs = []
    for name in ERAS:
        src = eras / f"{name}.pt"
        original = import_legacy(src)
        m1, v1, m2 = tmp_path / f"{name}.1.mfmt", tmp_path / f"{name}.v1.pt", tmp_path / f"{name}.2.mfmt"
        assert convert(src, m1).not_carried == []
        _assert_same(original, load_any(m1, migrate=False))
        report = convert(m1, v1, to="v1")
        assert report.not_carried == [], report.not_carried
        again = import_legacy(v1)
        _assert_same(original, again)
        assert again.provenance["era"] == original.provenance["era"]
        convert(v1, m2)
        _assert_same(original, load_any(m2, migrate=False))
        pairs.append((src, v1))
    _compare_in_subprocess(pairs, src=eras / "src")


def test_v1_export_writes_hub_edits_into_the_graph(eras: Path, tmp_path: Path) -> None:
    ckpt = import_legacy(eras / "era_d.pt")
    key = next(k for k in ckpt.tensors if k.endswith("fc1._net.0.weight"))
    tensors = dict(ckpt.tensors)
    tensors[key] = torch.full_like(tensors[key], 7.0)
    ckpt.tensors = tensors
    ckpt.metadata = {**ckpt.metadata, "epoch": 99, "note": "edited"}
    ckpt.name = "renamed.pt"
    report = export_v1(ckpt, tmp_path / "edited.pt")
    assert any("metadata written" in n for n in report.notes)
    back = import_legacy(tmp_path / "edited.pt")
    assert torch.equal(back.tensors[key], tensors[key])
    assert back.metadata == ckpt.metadata and back.name == "renamed.pt"
    assert back.provenance["era"] == "D"
    # The untouched parts of the graph are unchanged; the original graph was not modified.
    assert graph_equal(import_legacy(eras / "era_d.pt").legacy_graph, ckpt.legacy_graph)


def test_v1_from_module_shapes(eras: Path, tmp_path: Path) -> None:
    # Era E (bare module) and v2 full-model files have a module graph: an era-D record is synthesised.
    for name in ("era_e", "v2_full"):
        ckpt = import_legacy(eras / f"{name}.pt")
        report = export_v1(ckpt, tmp_path / f"{name}.v1.pt")
        assert any("synthesised" in n for n in report.notes)
        back = import_legacy(tmp_path / f"{name}.v1.pt")
        assert back.provenance["shape"] == "v1-policy-record" and back.provenance["era"] == "D"
        assert list(back.tensors) == list(ckpt.tensors)
        assert all(torch.equal(back.tensors[k], t) for k, t in ckpt.tensors.items())
        assert back.metadata == ckpt.metadata


def test_v1_from_native_checkpoint_needs_a_model(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    ckpt = Checkpoint(tensors=dict(model.state_dict()), metadata={"epoch": 3, "agent_step": 10}, name="m.pt")
    with pytest.raises(WriteError, match="model="):
        export_v1(ckpt, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    with pytest.raises(WriteError, match="differs"):
        export_v1(ckpt, tmp_path / "x.pt", model=torch.nn.Linear(3, 2))
    export_v1(ckpt, tmp_path / "x.pt", model=model)
    back = import_legacy(tmp_path / "x.pt")
    assert back.provenance["shape"] == "v1-policy-record" and back.name == "m.pt"
    assert back.metadata == {"epoch": 3, "agent_step": 10}
    assert back.provenance["model_class"] == "torch.nn.modules.linear.Linear"
    assert all(torch.equal(back.tensors[k], t) for k, t in ckpt.tensors.items())
    record = back.legacy_graph
    assert isinstance(record, LegacyObject) and record.class_path == "metta.agent.policy_record.PolicyRecord"
    assert list(record.state) == ["_policy_store", "run_name", "uri", "_metadata", "_cached_policy"]


def test_v1_strict_reports_training_state(eras: Path, tmp_path: Path) -> None:
    ckpt = import_legacy(eras / "era_d.pt")
    ckpt.versions = {"checkpoint_format": 1, "action_space": "v2"}
    report = export_v1(ckpt, tmp_path / "a.pt")
    assert report.not_carried == ["versions.action_space ('v2')"]
    with pytest.raises(WriteError, match="strict"):
        export_v1(ckpt, tmp_path / "b.pt", strict=True)
    assert not (tmp_path / "b.pt").exists()


def _expected(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.with_suffix(".expected.json").read_text())
    return data


def _sha256(t: torch.Tensor) -> str:
    flat = t.detach().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"").hexdigest()


def test_real_fixtures_mfmt_and_back_to_v1_losslessly(tmp_path: Path) -> None:
    if not FIXTURES.is_dir():
        pytest.skip(f"Metta fixtures not found at {FIXTURES} (they live in ../shared beside the repo)")
    pairs = []
    for src in sorted(FIXTURES.glob("*.pt")):
        original = import_legacy(src)
        mfmt, v1 = tmp_path / f"{src.stem}.mfmt", tmp_path / f"{src.stem}.v1.pt"
        convert(src, mfmt, compression="zstd")
        assert convert(mfmt, v1, to="v1").not_carried == []
        back = import_legacy(v1)
        assert back.metadata == original.metadata
        assert graph_equal(back.legacy_tensors, original.legacy_tensors)
        if original.provenance["shape"] == "v1-policy-record":
            _assert_same(original, back)
        expected = _expected(src)
        assert sorted(back.tensors) == sorted(expected["state"])
        for name, (dtype, shape, digest) in expected["state"].items():
            t = back.tensors[name]
            assert (str(t.dtype).removeprefix("torch."), list(t.shape), _sha256(t)) == (dtype, shape, digest), name
        assert back.metadata == (expected["metadata"] or {})
        pairs.append((src, v1))
    _compare_in_subprocess(pairs)
