"""Every reference in the repository resolves inside it: threat-model ids are defined in
docs/threat-model.md, and no file points at documents the repository does not contain."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THREAT_MODEL = ROOT / "docs" / "threat-model.md"
ID = re.compile(r"(?<![A-Za-z0-9])(FR|TT|MD|ZS|IN|PK|AR|FS|WR|OP)(\d{1,2})(?![0-9])")
OUTSIDE = re.compile(r"\b(HOSTILE|BENCH|LEGACY|DESIGN|STYLE)(\.md)?\b|shared/fixtures/[^ ]*\.md")


TEXT_SUFFIXES = (".py", ".md", ".toml", ".txt")
#: Everything a reader might open, data included (committed benchmark results, vectors' expectations).
ALL_TEXT_SUFFIXES = (*TEXT_SUFFIXES, ".json", ".cfg", ".ini", ".yaml", ".yml", ".sh")


def _files(suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / f for f in out.split() if f.endswith(suffixes) and (ROOT / f).is_file()]


def _defined() -> set[str]:
    return set(re.findall(r"^\| ((?:FR|TT|MD|ZS|IN|PK|AR|FS|WR|OP)\d{1,2}) \|", THREAT_MODEL.read_text(), re.M))


def test_every_threat_model_id_cited_is_defined() -> None:
    defined = _defined()
    assert len(defined) > 100
    missing = []
    for path in _files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in ID.finditer(line):
                if m.group(0) not in defined:
                    missing.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)}")
    assert not missing, "ids not defined in docs/threat-model.md:\n" + "\n".join(missing)


def test_no_file_refers_to_documents_outside_the_repository() -> None:
    found = []
    for path in [*_files(ALL_TEXT_SUFFIXES), ROOT / "dev", ROOT / ".ci" / "run"]:
        if path.name == Path(__file__).name:
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)
