"""Fuzzing in the suite: corpus replay, regressions, mutated fixtures, and a short coverage-guided run."""

from __future__ import annotations

import importlib.util
import os
import random
import time
import warnings
from pathlib import Path

import pytest

from fuzz.__main__ import run_session
from fuzz.mutate import fuzz_loop, mutate
from fuzz.targets import TARGETS
from tests.conftest import REPO, fixtures_dir

CORPUS = REPO / "fuzz" / "corpus"
REGRESSIONS = REPO / "tests" / "regressions"
#: Seconds of coverage-guided fuzzing per target in the suite (longer: ./dev fuzz --seconds N).
SECONDS = int(os.environ.get("METTAFORMAT_FUZZ_SECONDS", "10"))


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_replays_cleanly(target: str) -> None:
    inputs = sorted((CORPUS / target).iterdir())
    assert inputs, f"empty corpus for {target}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vectors include a newer-minor file that warns
        for path in inputs:
            TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("path", sorted(REGRESSIONS.iterdir()), ids=lambda p: p.name)
def test_fuzz_findings_stay_fixed(path: Path) -> None:
    target = path.name.split("-")[0]
    TARGETS[target](path.read_bytes())


def test_mutated_fixtures_fail_cleanly() -> None:
    rng = random.Random(7)
    for fixture in sorted(fixtures_dir().glob("*.pt")):
        data = fixture.read_bytes()
        for _ in range(25):
            TARGETS["torch_zip"](mutate(data, rng, []))


def test_builtin_mutator_finds_nothing_in_a_short_run() -> None:
    for target in ("header", "stream_json", "unpickler", "zstd_frame", "delta"):
        corpus = [p.read_bytes() for p in sorted((CORPUS / target).iterdir())]
        runs = fuzz_loop(TARGETS[target], corpus, time.monotonic() + 2, seed=11, clock=time.monotonic)
        assert runs > 100


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_coverage_guided_session(target: str, tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    result = run_session(target, SECONDS, f"{tmp_path}/", tmp_path / "work", capture_output=True)
    findings = [p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-"))]
    assert result.returncode == 0 and not findings, result.stderr[-3000:]
