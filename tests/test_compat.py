"""Compatibility reports: each level, with the exact texts of Metta's checker."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from mettaformat import CompatibilityLevel, MettaAgent, RuntimeVersions, check_checkpoint_compatibility, load_file
from mettaformat.cli.main import main
from mettaformat.errors import IntegrityError


def agent_file(tmp_path: Path, **versions: str) -> Path:
    agent = MettaAgent(nn.Linear(2, 2), model_type="linear")
    agent.observation_space_version = versions.get("obs")
    agent.action_space_version = versions.get("action")
    agent.layer_version = versions.get("layer")
    path = tmp_path / "a.mfmt"
    agent.save(path)
    return path


def test_full(tmp_path: Path) -> None:
    report = check_checkpoint_compatibility(agent_file(tmp_path, obs="v1", action="v1"),
                                            RuntimeVersions(observation_space="v1", action_space="v1"))
    assert report.level is CompatibilityLevel.FULL and report.is_compatible()
    assert str(report) == "Compatibility Level: full"


def test_partial_unknown_format_version(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path)
    report = check_checkpoint_compatibility(path)
    assert str(report) == ("Compatibility Level: partial\n\nWarnings:\n"
                           "  - Checkpoint format version is unknown, loading may fail")


def test_partial_action_space_mismatch(tmp_path: Path) -> None:
    report = check_checkpoint_compatibility(agent_file(tmp_path, action="v2"), RuntimeVersions(action_space="v1"))
    assert str(report) == ("Compatibility Level: partial\n\nWarnings:\n  - Action space version mismatch: checkpoint "
                           "uses v2, runtime uses v1. Some actions may not work correctly.")


def test_incompatible_observation_space_and_layer(tmp_path: Path) -> None:
    report = check_checkpoint_compatibility(agent_file(tmp_path, obs="v2", action="v2", layer="v2"),
                                            RuntimeVersions(observation_space="v1", action_space="v1", layer="v1"))
    assert report.level is CompatibilityLevel.INCOMPATIBLE and not report.is_compatible()
    assert str(report) == (
        "Compatibility Level: incompatible\n\nErrors:\n"
        "  - Observation space mismatch: checkpoint uses v2, runtime expects v1\n\nWarnings:\n"
        "  - Action space version mismatch: checkpoint uses v2, runtime uses v1. Some actions may not work correctly.\n"
        "  - Layer architecture version mismatch: checkpoint uses v2, runtime uses v1")


def test_incompatible_newer_major_version(tmp_path: Path) -> None:
    path = agent_file(tmp_path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<HH", data, 8, 4, 0)  # major 4, minor 0
    path.write_bytes(bytes(data))
    report = check_checkpoint_compatibility(path)
    assert report.level is CompatibilityLevel.INCOMPATIBLE
    assert report.errors[0] == "Checkpoint format v4 is not compatible with runtime v3"
    assert "not supported" in report.errors[1] and "4.0" in report.errors[1]


def test_unknown_for_unreadable_files(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"definitely not a checkpoint")
    report = check_checkpoint_compatibility(path)
    assert report.level is CompatibilityLevel.UNKNOWN and report.errors


def test_container_check_reads_header_only(tmp_path: Path) -> None:
    path = agent_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # damage the trailer index: a full load notices, a header-only check never reads it
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        load_file(path)
    assert check_checkpoint_compatibility(path).level is CompatibilityLevel.FULL


@pytest.mark.parametrize(("versions", "runtime", "code"), [
    ({}, [], 0), ({"action": "v2"}, ["--action-space", "v1"], 1), ({"obs": "v2"}, ["--observation-space", "v1"], 2)])
def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str], versions: dict[str, str],
                        runtime: list[str], code: int) -> None:
    path = agent_file(tmp_path, **versions)
    assert main(["compat", str(path), *runtime]) == code
    assert capsys.readouterr().out.startswith("Compatibility Level: ")
    assert main(["compat", str(path), "--json", *runtime]) == code
    assert '"level"' in capsys.readouterr().out
