"""``mettaformat ls`` and ``mettaformat prune``: human output and --json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mettaformat.cli import ls_cmd, main, prune_cmd
from tests.workers.store_helpers import write_mfmt


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    # Until cli/main.py lists them in COMMANDS.
    extra = tuple(c for c in (ls_cmd, prune_cmd) if c not in main.COMMANDS)
    monkeypatch.setattr(main, "COMMANDS", (*main.COMMANDS, *extra))


@pytest.fixture
def ckpts(tmp_path: Path) -> Path:
    scores = {1: 0.9, 2: 0.1, 3: 0.5, 4: math.nan, 5: None, 6: 0.7}
    for epoch, score in scores.items():
        metadata = {"epoch": epoch, "agent_step": epoch * 100}
        if score is not None:
            metadata["score"] = score
        write_mfmt(tmp_path, f"model_{epoch:04d}.mfmt", metadata)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_human(ckpts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ls", str(ckpts))
    lines = out.splitlines()
    assert code == 0
    assert lines[0].split() == ["name", "epoch", "step", "score", "size"]
    assert [line.split()[0] for line in lines[2:-1]] == [f"model_{e:04d}.mfmt" for e in (6, 5, 4, 3, 2, 1)]
    assert lines[2].split()[:4] == ["model_0006.mfmt", "6", "600", "0.7"]
    assert lines[3].split()[3] == "-" and lines[4].split()[3] == "nan"
    assert lines[-1] == "6 checkpoints"
    code, out, _ = run(capsys, "ls", str(ckpts), "--sort", "score", "--top", "2")
    assert [line.split()[0] for line in out.splitlines()[2:-1]] == ["model_0001.mfmt", "model_0006.mfmt"]
    assert out.splitlines()[-1] == "2 of 6 checkpoints"
    code, out, _ = run(capsys, "ls", str(ckpts), "--sort", "score", "--mode", "min")
    shown = [line.split()[0] for line in out.splitlines()[2:-1]]
    assert shown[:4] == ["model_0002.mfmt", "model_0003.mfmt", "model_0006.mfmt", "model_0001.mfmt"]
    assert sorted(shown[4:]) == ["model_0004.mfmt", "model_0005.mfmt"]  # unscored last


def test_ls_json_and_unreadable_files(ckpts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (ckpts / "model_0009.mfmt").write_bytes(b"\x1b[2Jgarbage")
    code, out, err = run(capsys, "ls", str(ckpts), "--json", "--sort", "score", "--top", "3")
    data = json.loads(out)
    assert code == 1 and err == ""
    assert [c["name"] for c in data["checkpoints"]] == ["model_0001.mfmt", "model_0006.mfmt", "model_0003.mfmt"]
    first = data["checkpoints"][0]
    assert first["epoch"] == 1 and first["agent_step"] == 100 and first["metric"] == 0.9
    assert first["metadata"]["score"] == 0.9 and first["size"] > 0 and first["format"] == "mettaformat"
    assert data["count"] == 6 and [u["path"] for u in data["unreadable"]] == [str(ckpts / "model_0009.mfmt")]
    code, out, err = run(capsys, "ls", str(ckpts))
    assert code == 1 and "unreadable: " in err and "model_0009.mfmt" in err


def test_ls_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "ls", str(tmp_path / "missing"))
    assert code == 1 and "No policy records found" in err
    code, _, err = run(capsys, "ls", str(tmp_path), "--top", "0")
    assert code == 2


def test_prune_dry_run_human_then_json(ckpts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["prune", str(ckpts), "--keep-last", "2", "--keep-best", "1", "--metric", "score", "--drop-unscored"]
    code, out, _ = run(capsys, *args, "--dry-run")
    assert code == 0
    assert "would delete" in out and "kept 3, would delete 3" in out
    assert "LatestN(n=2) | BestN(n=1, metric='score'" in out
    assert len(list(ckpts.glob("*.mfmt"))) == 6

    code, out, _ = run(capsys, *args, "--every-n-epochs", "3", "--json")
    report = json.loads(out)
    assert code == 0 and report["dry_run"] is False
    assert [k["path"].rsplit("/", 1)[1] for k in report["kept"]] == [
        "model_0006.mfmt",
        "model_0005.mfmt",
        "model_0003.mfmt",
        "model_0001.mfmt",
    ]
    assert [d["epoch"] for d in report["deleted"]] == [4, 2] and report["bytes_freed"] > 0
    assert sorted(p.name for p in ckpts.glob("*.mfmt")) == [f"model_{e:04d}.mfmt" for e in (1, 3, 5, 6)]


def test_prune_usage_errors(ckpts: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "prune", str(ckpts))
    assert code == 2 and "at least one of" in err
    code, _, err = run(capsys, "prune", str(ckpts), "--keep-last", "-1")
    assert code == 2
    (ckpts / "model_0001.mfmt").unlink()
    code, _, err = run(capsys, "prune", str(ckpts), "--keep-best", "1", "--drop-unscored", "--metric", "nothing")
    assert code == 1 and "keeps none" in err and len(list(ckpts.glob("*.mfmt"))) == 5
