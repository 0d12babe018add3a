"""One allowlist: ``validate`` flags exactly the globals the importer does not interpret and that run code,
so it passes every real Metta checkpoint and our own v1/v2 exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mettaformat.convert import convert
from mettaformat.legacy import allowlist
from mettaformat.legacy.unsafe import is_unsafe_global, unsafe_class_paths
from mettaformat.validate import unsafe_globals, validate
from tests.conftest import REPO, fixtures_dir


def _fixtures() -> list[Path]:
    found = sorted(fixtures_dir().glob("*.pt")) if fixtures_dir().is_dir() else []
    if not found:
        pytest.skip(f"real Metta fixtures not found at {fixtures_dir()} (../shared/fixtures beside the repo)")
    return found


def test_one_allowlist_for_importer_and_validate() -> None:
    for module, name in allowlist._TABLE:
        assert allowlist.interprets(module, name) and not is_unsafe_global(module, name)
    assert not is_unsafe_global("__builtin__", "long") and not is_unsafe_global("torch", "FloatStorage")
    for module, name in [("os", "system"), ("builtins", "eval"), ("__builtin__", "getattr"), ("x.y", "loads")]:
        assert is_unsafe_global(module, name)
    paths = ["__builtin__.long", "posix.system", "metta.agent.policy_record.PolicyRecord"]
    assert unsafe_globals(paths) == unsafe_class_paths(paths) == ["posix.system"]


def test_validate_exits_0_on_every_real_metta_fixture() -> None:
    for path in _fixtures():
        report = validate(path)
        assert report.ok, (path.name, report.problems)
        result = subprocess.run([sys.executable, "-m", "mettaformat", "validate", str(path)], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("target", ["v1", "v2", "v2-full", "mfmt"])
def test_validate_exits_0_on_our_own_exports(tmp_path: Path, target: str) -> None:
    for path in _fixtures():
        out = tmp_path / f"{path.stem}.{target}.{'mfmt' if target == 'mfmt' else 'pt'}"
        convert(path, out, to=target)  # type: ignore[arg-type]
        report = validate(out)
        assert report.ok, (path.name, target, report.problems)
