"""Real Metta checkpoints import exactly as their independently computed expected.json says."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mettaformat.container.tree import LegacyObject
from mettaformat.legacy import import_legacy, sniff

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "metta"
NAMES = ["v1_era_d_model_0000", "v1_era_d_model_0050", "v1_era_d2_model_0001", "era_e_policy"]


def _fixture(name: str) -> tuple[Path, dict[str, Any]]:
    if not FIXTURES.is_dir():
        pytest.skip(f"real Metta fixtures not found at {FIXTURES} (../shared/fixtures beside the repo)")
    return FIXTURES / f"{name}.pt", json.loads((FIXTURES / f"{name}.expected.json").read_text())


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_fixture_matches_expected(name: str) -> None:
    path, expected = _fixture(name)
    ckpt = import_legacy(path)
    assert sorted(ckpt.tensors) == sorted(expected["state"])
    for key, (dtype, shape, sha) in expected["state"].items():
        t = ckpt.tensors[key]
        assert str(t.dtype).removeprefix("torch.") == dtype, key
        assert list(t.shape) == shape, key
        assert _sha(t) == sha, key
        assert t.device.type == "cpu"
    assert ckpt.metadata == (expected["metadata"] or {})


@pytest.mark.parametrize("name", NAMES)
def test_fixture_provenance(name: str) -> None:
    path, _ = _fixture(name)
    assert sniff(path.read_bytes()[:64]) == "torch-zip"
    ckpt = import_legacy(path)
    prov = ckpt.provenance
    assert prov["source_format"] == "torch-zip"
    assert prov["class_paths"] == sorted(prov["class_paths"])
    assert "torch._utils._rebuild_tensor_v2" in prov["class_paths"]
    assert isinstance(ckpt.legacy_graph, LegacyObject)
    if name.startswith("v1"):
        assert prov["shape"] == "v1-policy-record"
        assert ckpt.model_type == "brain"
        assert ckpt.name == name.rsplit("_", 2)[-2] + "_" + name.rsplit("_", 1)[-1] + ".pt"
        assert ckpt.versions == {"checkpoint_format": 1}
        assert ckpt.agent_attributes["obs_width"] == 11
        if "d2" not in name:  # the Aug-2025 agent keeps its action space on MettaAgent itself
            space = ckpt.agent_attributes["action_space"]
            assert isinstance(space, LegacyObject)
            assert space.class_path == "gymnasium.spaces.multi_discrete.MultiDiscrete"
        # initial_weights copies are graph-only tensors, not state-dict entries.
        assert any(k.endswith("fc1.initial_weights") for k in ckpt.legacy_tensors)
    else:
        assert prov["shape"] == "module"


def test_fixture_era_d_details() -> None:
    path, _ = _fixture("v1_era_d_model_0050")
    ckpt = import_legacy(path)
    assert ckpt.uri == "file://tmp/checkpoints/model_0050.pt"
    assert ckpt.provenance["era"] == "D"
    assert ckpt.provenance["action_names"][:2] == ["attack", "attack_nearest"]
    assert ckpt.tensors["components._action_embeds_.active_indices"].shape == (25,)
    assert ckpt.agent_attributes["obs_shape"] == (200, 3)
    assert "numpy._core.multiarray._reconstruct" in ckpt.provenance["class_paths"]
    assert ckpt.legacy_tensors["action_index_tensor"].dtype == torch.int32


def test_fixture_era_d2_policy_submodule_and_numpy1_path() -> None:
    path, _ = _fixture("v1_era_d2_model_0001")
    ckpt = import_legacy(path)
    assert ckpt.provenance["era"] == "D (policy submodule)"
    assert "numpy.core.multiarray._reconstruct" in ckpt.provenance["class_paths"]
    assert all(k.startswith("policy.components.") for k in ckpt.tensors)


def test_fixture_tensors_share_the_file_buffer_and_are_usable() -> None:
    path, _ = _fixture("v1_era_d_model_0050")
    ckpt = import_legacy(path)
    w = ckpt.tensors["components.fc1._net.0.weight"]
    assert not w.requires_grad
    w2 = w.clone()
    w2.add_(1)  # writable, ordinary CPU tensor
    assert torch.isfinite(w).all()
