"""The legacy benchmark runs end to end on a real fixture (it reports; nothing here asserts a timing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_legacy
from tests.conftest import FIXTURES

FIXTURE = FIXTURES / "v1_era_d_model_0050.pt"


def test_benchmark_reports_import_vs_torch_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if not FIXTURE.is_file():
        pytest.skip(f"fixture {FIXTURE} not found (../shared/fixtures beside the repo)")
    out = tmp_path / "legacy.json"
    assert bench_legacy.main([str(FIXTURE), "--repeat", "2", "--parts", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "import_legacy ÷ torch.load" in printed and "load_torch_zip (VM + tensors)" in printed
    result = __import__("json").loads(out.read_text())["results"][0]
    assert result["ratio_vs_torch_load"] > 0 and result["tensors"] == 27
