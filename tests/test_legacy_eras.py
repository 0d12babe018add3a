"""Synthesized files for every Metta era, v2 dicts, trainer state and the pre-1.6 stream.

A subprocess writes stand-in classes at each era's module path and ``torch.save``s objects
built from them; this process, where those modules do not exist, imports the files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mettaformat.container.tree import LegacyObject
from mettaformat.legacy import import_legacy, sniff

HELPER = Path(__file__).resolve().parent / "legacy_helpers" / "make_eras.py"


@pytest.fixture(scope="module")
def eras(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eras")
    subprocess.run([sys.executable, str(HELPER), str(out)], check=True, capture_output=True, timeout=120)
    assert "metta" not in sys.modules and "agent" not in sys.modules
    return out


def _expected(eras: Path, name: str) -> dict[str, Any]:
    return torch.load(eras / f"{name}.expected.pt", weights_only=True)


def _assert_state(ckpt_tensors: Any, expected: dict[str, torch.Tensor]) -> None:
    assert list(ckpt_tensors) == list(expected)  # same order as module.state_dict()
    for k, v in expected.items():
        assert ckpt_tensors[k].dtype == v.dtype and torch.equal(ckpt_tensors[k], v), k


@pytest.mark.parametrize(
    ("name", "era", "model_type", "record_name"),
    [
        ("era_a0", "A0", None, "/ckpt/model_0002.pt"),
        ("era_a1", "A1", "brain", "/ckpt/model_0002.pt"),
        ("era_a2", "A2", "brain", "/ckpt/model_0002.pt"),
        ("era_c", "C", "brain", "model_0002.pt"),
        ("era_d", "D", "brain", "model_0002.pt"),
        ("era_d2", "D (policy submodule)", "brain", "model_0002.pt"),
    ],
)
def test_v1_policy_record_eras(eras: Path, name: str, era: str, model_type: str | None, record_name: str) -> None:
    ckpt = import_legacy(eras / f"{name}.pt")
    exp = _expected(eras, name)
    _assert_state(ckpt.tensors, exp["state"])
    assert ckpt.metadata == exp["metadata"]
    assert ckpt.provenance["shape"] == "v1-policy-record"
    assert ckpt.provenance["era"] == era
    assert ckpt.model_type == model_type
    assert ckpt.name == record_name
    assert ckpt.versions == {"checkpoint_format": 1}
    assert isinstance(ckpt.legacy_graph, LegacyObject) and ckpt.legacy_graph.name == "PolicyRecord"
    # Non-persistent buffers and initial_weights are graph-only; None buffers are skipped.
    assert any(k.endswith("obs_normalizer.scratch") for k in ckpt.legacy_tensors)
    assert any(k.endswith("fc1.initial_weights") for k in ckpt.legacy_tensors)
    assert not any(k.endswith("unused") for k in ckpt.tensors)
    # Tied weights stay one storage.
    head = next(v for k, v in ckpt.tensors.items() if k.endswith("head._net.0.weight"))
    tied = next(v for k, v in ckpt.tensors.items() if k.endswith("tied._net.0.weight"))
    assert head.untyped_storage().data_ptr() == tied.untyped_storage().data_ptr()
    if era not in ("A0", "A1"):
        assert ckpt.agent_attributes["obs_shape"] == (200, 3)
        assert ckpt.agent_attributes["feature_normalizations"] == {0: 1.0, 1: 30.0}


def test_era_e_bare_module(eras: Path) -> None:
    ckpt = import_legacy(eras / "era_e.pt")
    _assert_state(ckpt.tensors, _expected(eras, "era_e")["state"])
    assert ckpt.provenance["shape"] == "module"
    assert ckpt.provenance["model_class"] == "metta.agent.policy_auto_builder.PolicyAutoBuilder"


def test_v2_standard_dict(eras: Path) -> None:
    ckpt = import_legacy(eras / "v2_standard.pt")
    exp = _expected(eras, "v2_standard")
    _assert_state(ckpt.tensors, exp["state"])
    assert ckpt.provenance["shape"] == "v2-state-dict"
    assert ckpt.versions == {"checkpoint_format": 2}
    assert (ckpt.model_type, ckpt.name, ckpt.uri) == ("brain", "model_0002.pt", "file://ckpt/model_0002.pt")
    assert ckpt.metadata == exp["metadata"]
    assert ckpt.agent_attributes["obs_width"] == 11


def test_v2_full_model_dict(eras: Path) -> None:
    ckpt = import_legacy(eras / "v2_full.pt")
    exp = _expected(eras, "v2_full")
    _assert_state(ckpt.tensors, exp["state"])
    assert ckpt.provenance["shape"] == "v2-full-model"
    assert ckpt.provenance["model_class"] == "metta.agent.brain_policy.BrainPolicy"
    assert ckpt.versions == {"checkpoint_format": 2}
    assert ckpt.model_type == "brain"
    assert ckpt.agent_attributes["obs_height"] == 11  # from the model's attribute


def test_raw_state_dict(eras: Path) -> None:
    ckpt = import_legacy(eras / "raw_state_dict.pt")
    _assert_state(ckpt.tensors, _expected(eras, "raw_state_dict")["state"])
    assert ckpt.provenance["shape"] == "state-dict"


def test_legacy_stream_era_d(eras: Path) -> None:
    path = eras / "legacy_stream_d.pt"
    assert sniff(path.read_bytes()[:64]) == "torch-legacy-stream"
    ckpt = import_legacy(path)
    exp = _expected(eras, "legacy_stream_d")
    _assert_state(ckpt.tensors, exp["state"])
    assert ckpt.provenance["source_format"] == "torch-legacy-stream"
    assert ckpt.metadata == exp["metadata"]
    assert "container_sources" in ckpt.provenance  # ("module", ...) ids, kept as text (F30)


def _equal_tree(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal_tree(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@pytest.mark.parametrize(
    ("name", "extra"), [("trainer_2024", "policy_path"), ("trainer_2025", "stopwatch_state"), ("trainer_era_e", None)]
)
def test_trainer_state(eras: Path, name: str, extra: str | None) -> None:
    ckpt = import_legacy(eras / f"{name}.pt")
    assert ckpt.provenance["shape"] == "trainer-state"
    assert ckpt.training is not None
    assert _equal_tree(ckpt.training.optimizer, _expected(eras, name)["optimizer"])
    assert ckpt.training.trainer_state["epoch"] == 1 and ckpt.training.trainer_state["agent_step"] == 10
    if extra:
        assert extra in ckpt.training.trainer_state
    assert dict(ckpt.tensors) == {}
