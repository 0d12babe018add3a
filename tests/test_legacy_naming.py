"""One naming of legacy tensors: importing a .pt, reading its .mfmt conversion and re-importing its v1/v2
exports give the same ``tensors`` and ``legacy_tensors`` names, for every real fixture and every synthetic era."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import mettaformat
from mettaformat.convert import convert
from mettaformat.legacy import import_legacy
from tests.conftest import FIXTURES

HELPER = Path(__file__).resolve().parent / "legacy_helpers" / "make_eras.py"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("eras")
    subprocess.run([sys.executable, str(HELPER), str(out)], check=True, capture_output=True, timeout=120)
    eras = [p for p in sorted(out.glob("*.pt")) if not p.name.endswith(".expected.pt")]
    real = sorted(FIXTURES.glob("*.pt")) if FIXTURES.is_dir() else []
    return eras + real


def test_legacy_tensor_names_are_stable_across_import_conversion_and_export(
    sources: list[Path], tmp_path: Path
) -> None:
    checked = 0
    for src in sources:
        ckpt = import_legacy(src)
        names = (list(ckpt.tensors), list(ckpt.legacy_tensors))
        shape = ckpt.provenance.get("shape")
        targets = ["mfmt"] + (["v1"] if shape == "v1-policy-record" else [])
        targets += ["v2-full"] if shape in ("v2-full-model", "module") else []
        for target in targets:
            out = tmp_path / f"{src.stem}.{target}.{'mfmt' if target == 'mfmt' else 'pt'}"
            convert(src, out, to=target)  # type: ignore[arg-type]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                back = mettaformat.load_any(out, migrate=False)
            assert (list(back.tensors), list(back.legacy_tensors)) == names, (src.name, target)
            checked += 1
        if ckpt.legacy_tensors:
            assert all(not k.startswith("_cached_policy") and "._modules." not in k for k in ckpt.legacy_tensors)
    assert checked >= len(sources)
