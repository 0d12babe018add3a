"""Import time of a real v1 file vs ``torch.load(weights_only=False)`` with stand-in classes.

Prints timings (BENCH.md target: no slower than torch.load); asserts only a loose ceiling.
torch.load runs in a subprocess whose meta-path finder supplies stand-in modules, so the test
process never imports anything the file names.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mettaformat.legacy import import_legacy

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "metta" / "v1_era_d_model_0050.pt"

TORCH_LOAD = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, sys, time, types
    import torch, torch.nn as nn

    PREFIXES = ("metta", "gymnasium", "omegaconf")

    from tests.legacy_helpers.standins import install
    install()
    path = sys.argv[1]
    torch.load(path, weights_only=False)
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        torch.load(path, weights_only=False)
        times.append(time.perf_counter() - t0)
    print(min(times))
    """
)


def test_import_time_vs_torch_load() -> None:
    if not FIXTURE.is_file():
        pytest.skip(f"fixture {FIXTURE} not found (../shared/fixtures beside the repo)")
    import_legacy(FIXTURE)
    ours = min(
        (lambda t0: (import_legacy(FIXTURE), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(7)
    )
    out = subprocess.run(
        [sys.executable, "-c", TORCH_LOAD, str(FIXTURE)], capture_output=True, text=True, timeout=120, check=True
    )
    theirs = float(out.stdout.strip().splitlines()[-1])
    print(f"\nv1_era_d_model_0050.pt (3.5 MB): import_legacy {ours * 1e3:.1f} ms, torch.load {theirs * 1e3:.1f} ms")
    assert ours < 2.0  # loose ceiling only; the comparison is reported, not asserted
