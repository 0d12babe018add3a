"""Schema migrations on load: applied with a warning, recorded in provenance, skippable."""

from __future__ import annotations

from pathlib import Path

import pytest

import mettaformat
from mettaformat import CompatibilityLevel, check_checkpoint_compatibility
from mettaformat.convert import convert
from mettaformat.migrations import MigrationWarning
from tests.conftest import fixtures_dir


def test_real_v1_fixture_is_migrated_on_load() -> None:
    path = fixtures_dir() / "v1_era_d_model_0050.pt"
    raw = mettaformat.load_any(path, migrate=False)
    assert raw.metadata["initial_uri"] == "file://tmp/checkpoints/model_0000.pt"
    assert "initial_pr" not in raw.metadata and "migrations" not in raw.provenance
    with pytest.warns(MigrationWarning, match="initial_uri"):
        migrated = mettaformat.load_any(path)
    assert migrated.metadata["initial_pr"] == "file://tmp/checkpoints/model_0000.pt"
    assert "initial_uri" not in migrated.metadata
    applied = [m["id"] for m in migrated.provenance["migrations"]]
    assert "initial_uri->initial_pr" in applied
    assert migrated.metadata["run_name"] == raw.name == "model_0050.pt"
    # tensors are untouched by migrations
    assert migrated.tensors.keys() == raw.tensors.keys()


def test_migrations_survive_a_round_trip_through_the_container(tmp_path: Path) -> None:
    out = tmp_path / "m.mfmt"
    convert(fixtures_dir() / "v1_era_d_model_0050.pt", out)
    with pytest.warns(MigrationWarning):
        again = mettaformat.load_any(out)
    assert again.metadata["initial_pr"] == "file://tmp/checkpoints/model_0000.pt"


def test_legacy_files_get_a_compatibility_report() -> None:
    report = check_checkpoint_compatibility(fixtures_dir() / "v1_era_d_model_0050.pt")
    assert report.level is CompatibilityLevel.FULL
    assert str(report).startswith("Compatibility Level: full\n\nRecommendations:\n")
    assert report.checkpoint["checkpoint_format_version"] == 1
