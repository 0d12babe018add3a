"""The hot-path and GPU benchmarks stay runnable: each piece on tiny inputs, and the GPU one says
why it measured nothing where there is no CUDA device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import bench_gpu, bench_hotpaths


def test_hotpath_pieces_measure_and_report(tmp_path: Path) -> None:
    rows = bench_hotpaths.lazy_open_rows(tmp_path, [3], 1)
    rows += bench_hotpaths.verify_rows(tmp_path, [1 << 20], 1)
    rows += bench_hotpaths.save_rows(tmp_path, [1 << 20], 1)
    assert all(r["ratio"] > 0 for r in rows)
    doc = {"rows": rows, "hashing": bench_hotpaths.hashing(1 << 20, 1),
           "growth_tensors": bench_hotpaths.growth_tensors(tmp_path, [3], 1),
           "growth_sizes": bench_hotpaths.growth_sizes(tmp_path, [1 << 20], 1),
           "loadavg_start": (0, 0, 0), "loadavg_end": (0, 0, 0)}
    text = bench_hotpaths.report(doc)
    assert "verify=True ÷ verify=False" in text and "save_file" in text and "GIL" in text


@pytest.mark.skipif(not bench_hotpaths.FIXTURES_METTA.is_dir(), reason="the Metta fixtures are not beside the repo")
def test_legacy_rows_compare_with_torch_load() -> None:
    rows = bench_hotpaths.legacy_rows(1)
    assert rows and all(r["ratio"] > 0 and r["theirs_ms"] > 0 for r in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_gpu_benchmark_says_why_it_is_skipped(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert bench_gpu.main(["--quick", "--json", str(tmp_path / "gpu.json")]) == 0
    assert bench_gpu.SKIP_MESSAGE in capsys.readouterr().out
    assert "skipped" in (tmp_path / "gpu.json").read_text()
