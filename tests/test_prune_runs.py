"""Prune never crosses runs: rules count per run, format copies count once, deletion is confirmed."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from mettaformat.cli import main
from mettaformat.store import LatestN, PolicyStore
from mettaformat.store.runs import group_by_run
from tests.workers.store_helpers import requires_legacy, write_legacy, write_mfmt


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))


def test_runs_named_by_metadata_are_pruned_separately(tmp_path: Path) -> None:
    for run in ("alpha", "beta", "gamma"):
        for epoch in range(1, 5):
            write_mfmt(tmp_path, f"{run[0]}{epoch}.mfmt", {"epoch": epoch, "run": run})
    report = PolicyStore(tmp_path).prune(LatestN(2))
    assert names(tmp_path) == sorted(f"{r}{e}.mfmt" for r in "abg" for e in (3, 4))
    assert {report.runs[r.path] for r in report.deleted} == {"alpha", "beta", "gamma"}


def test_runs_named_by_file_name_pattern_are_pruned_separately(tmp_path: Path) -> None:
    for run in ("ppo_a", "ppo_b"):
        for epoch in range(1, 4):
            write_mfmt(tmp_path, f"{run}_{epoch:04d}.mfmt", {"epoch": epoch})
    PolicyStore(tmp_path).prune(LatestN(1))
    assert names(tmp_path) == ["ppo_a_0003.mfmt", "ppo_b_0003.mfmt"]


def test_the_same_run_in_two_directories_is_two_runs(tmp_path: Path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for epoch in range(1, 4):
            write_mfmt(tmp_path / d, f"model_{epoch:04d}.mfmt", {"epoch": epoch})
    PolicyStore().prune(LatestN(1), str(tmp_path / "*" / "*.mfmt"))
    assert names(tmp_path / "a") == names(tmp_path / "b") == ["model_0003.mfmt"]


@requires_legacy
def test_format_copies_of_one_checkpoint_count_once_and_share_its_fate(tmp_path: Path) -> None:
    for epoch in range(1, 4):
        write_legacy(tmp_path, f"model_{epoch:04d}.pt", {"epoch": epoch, "run": "r"})
        write_mfmt(tmp_path, f"model_{epoch:04d}.mfmt", {"epoch": epoch, "run": "r"})
    records = PolicyStore(tmp_path).records()
    (group,) = group_by_run(records)
    assert [len(c.files) for c in group.checkpoints] == [2, 2, 2]
    assert all(c.representative.format == "mettaformat" for c in group.checkpoints)
    report = PolicyStore(tmp_path).prune(LatestN(2))
    assert names(tmp_path) == [f"model_{e:04d}.{s}" for e in (2, 3) for s in ("mfmt", "pt")]
    assert sorted(r.name for r in report.deleted) == ["model_0001.mfmt", "model_0001.pt"]
    assert report.kept_by[tmp_path / "model_0002.pt"] == ("LatestN(n=2)",)


def test_a_run_name_that_is_a_file_name_names_no_run(tmp_path: Path) -> None:
    # Older exports record the file name as run_name; that must not make each file its own run.
    for epoch in range(1, 4):
        write_mfmt(tmp_path, f"model_{epoch:04d}.mfmt", {"epoch": epoch, "run_name": f"model_{epoch:04d}.pt"})
    PolicyStore(tmp_path).prune(LatestN(1))
    assert names(tmp_path) == ["model_0003.mfmt"]


def _three_runs(tmp_path: Path) -> None:
    for run in ("x", "y"):
        for epoch in range(1, 4):
            write_mfmt(tmp_path, f"{run}_{epoch}.mfmt", {"epoch": epoch, "run": run})


def test_cli_dry_run_says_would_on_every_deleting_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _three_runs(tmp_path)
    assert main.main(["prune", str(tmp_path), "--keep-last", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "delet" in line]
    assert len(lines) == 5 and all("would delete" in line for line in lines)
    assert len(names(tmp_path)) == 6


def test_cli_asks_on_a_terminal_and_deletes_nothing_unless_confirmed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _three_runs(tmp_path)

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Tty("n\n"))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    assert main.main(["prune", str(tmp_path), "--keep-last", "1"]) == 0
    out = capsys.readouterr().out
    assert "Delete 4 files? [y/N]" in out and "nothing deleted" in out and "would delete" in out
    assert len(names(tmp_path)) == 6

    monkeypatch.setattr(sys, "stdin", Tty("y\n"))
    assert main.main(["prune", str(tmp_path), "--keep-last", "1"]) == 0
    assert names(tmp_path) == ["x_3.mfmt", "y_3.mfmt"]


def test_cli_yes_skips_the_question(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _three_runs(tmp_path)

    def no_input(prompt: str = "") -> str:
        raise AssertionError("asked although --yes was given")

    monkeypatch.setattr("builtins.input", no_input)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    assert main.main(["prune", str(tmp_path), "--keep-last", "2", "--yes"]) == 0
    assert len(names(tmp_path)) == 4
    assert "deleted" in capsys.readouterr().out


def test_prune_report_str_is_readable(tmp_path: Path) -> None:
    _three_runs(tmp_path)
    text = str(PolicyStore(tmp_path).prune(LatestN(1), dry_run=True))
    assert text.startswith("LatestN(n=1): kept 2, would delete 4")
    assert text.count("would delete ") == 5 and "PolicyRecord(" not in text
