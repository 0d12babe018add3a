"""migrate: file and directory modes, backups, skips, dry runs, failures, recursion, crash safety; and the CLIs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from mettaformat import load_any
from mettaformat.anyformat import sniff_format
from mettaformat.cli import convert_cmd, migrate_cmd
from mettaformat.container import writer
from mettaformat.migrate import migrate, plan_migration


def _v2(path: Path, epoch: int = 1) -> Path:
    torch.save(
        {
            "model_state_dict": {"w": torch.full((3,), float(epoch)), "b": torch.zeros(2)},
            "model_type": "brain",
            "name": path.name,
            "uri": f"file://{path}",
            "metadata": {"epoch": epoch, "initial_uri": "file://x/model_0000.pt"},
            "checkpoint_format_version": 2,
        },
        path,
    )
    return path


def _cli(module: Any, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-q", "--quiet", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    module.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    code: int = args.run(args)
    return code


def test_single_file_beside_the_input_with_migrations_and_provenance(tmp_path: Path) -> None:
    src = _v2(tmp_path / "model_0001.pt")
    before = src.read_bytes()
    summary = migrate(src)
    assert (summary.processed, summary.migrated, summary.skipped, summary.failed) == (1, 1, 0, 0)
    result = summary.results[0]
    assert result.dst == str(tmp_path / "model_0001.mfmt") and result.backup is None
    assert "initial_uri->initial_pr" in result.migrations
    ckpt = load_any(tmp_path / "model_0001.mfmt", migrate=False)
    assert ckpt.metadata["initial_pr"] == "file://x/model_0000.pt" and "initial_uri" not in ckpt.metadata
    assert ckpt.provenance["migrated_from"]["path"] == str(src)
    assert torch.equal(ckpt.tensors["w"], torch.ones(3))
    assert src.read_bytes() == before and not (tmp_path / "model_0001.pt.backup").exists()
    # Second run: the output is up to date.
    assert migrate(src).results[0].status == "skipped"
    assert migrate(tmp_path / "model_0001.mfmt").results[0].reason == "already a mettaformat container"


def test_in_place_backs_up_first_and_never_overwrites_a_backup(tmp_path: Path) -> None:
    src = _v2(tmp_path / "m.pt")
    before = src.read_bytes()
    result = migrate(src, src).results[0]
    assert result.status == "migrated" and result.backup == str(tmp_path / "m.pt.backup")
    assert (tmp_path / "m.pt.backup").read_bytes() == before
    assert sniff_format(src) == "mettaformat"
    other = _v2(tmp_path / "n.pt")
    (tmp_path / "n.pt.backup").write_bytes(b"older backup")
    result = migrate(other, other).results[0]
    assert result.status == "failed" and "already exists" in result.reason
    assert (tmp_path / "n.pt.backup").read_bytes() == b"older backup"
    assert migrate(_v2(tmp_path / "o.pt"), tmp_path / "o.pt", backup=False).results[0].backup is None


def test_directory_dry_run_failures_recursive_and_dst_tree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ckpts"
    (root / "sub").mkdir(parents=True)
    _v2(root / "model_0001.pt")
    _v2(root / "sub" / "model_0002.pt", 2)
    (root / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (root / "notes.txt").write_text("ignored")
    assert [p.name for p, _ in plan_migration(root)] == ["broken.pt", "model_0001.pt"]
    dry = migrate(root, recursive=True, dry_run=True)
    assert (dry.processed, dry.migrated, dry.failed) == (3, 2, 1) and dry.dry_run
    assert not list(root.rglob("*.mfmt"))
    out = tmp_path / "out"
    code = _cli(migrate_cmd, ["migrate", str(root), str(out), "--recursive"])
    assert code == 1  # broken.pt failed
    text = capsys.readouterr().out
    assert "failed   " in text and "3 processed, 2 migrated, 0 skipped, 1 failed" in text
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mfmt")) == [
        "model_0001.mfmt",
        "sub/model_0002.mfmt",
    ]
    assert _cli(migrate_cmd, ["migrate", str(root / "model_0001.pt"), str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped"] == 1 and summary["results"][0]["reason"] == "model_0001.mfmt is up to date"


def test_crash_mid_write_leaves_the_input_and_no_partial_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _v2(tmp_path / "m.pt")
    before = src.read_bytes()

    def crash(fd: int, *args: Any, **kwargs: Any) -> int:
        os.pwrite(fd, b"\x89MFT partial container bytes", 0)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_write", crash)
    for dst in (None, src):  # beside the input, and in place
        result = migrate(src, dst).results[0]
        assert result.status == "failed" and "No space left" in result.reason
        assert src.read_bytes() == before
        assert not (tmp_path / "m.mfmt").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.backup"][: 1 + (dst is not None)]


def test_convert_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _v2(tmp_path / "m.pt")
    assert _cli(convert_cmd, ["convert", str(src), str(tmp_path / "m.mfmt"), "--compression", "zstd"]) == 0
    assert "-> " in capsys.readouterr().out
    argv = ["convert", str(tmp_path / "m.mfmt"), str(tmp_path / "sd.pt"), "--to", "pt", "--json"]
    assert _cli(convert_cmd, argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["target"] == "pt" and any(x.startswith("metadata") for x in report["not_carried"])
    assert list(torch.load(tmp_path / "sd.pt", weights_only=True)) == ["w", "b"]
    from mettaformat.errors import WriteError

    with pytest.raises(WriteError, match="--to"):
        _cli(convert_cmd, ["convert", str(src), str(tmp_path / "x.pt")])
    with pytest.raises(WriteError, match="compression"):
        _cli(convert_cmd, ["convert", str(src), str(tmp_path / "x.pt"), "--to", "v2", "--compression", "zstd"])
    with pytest.raises(WriteError, match="strict"):
        _cli(convert_cmd, ["convert", str(src), str(tmp_path / "x.pt"), "--to", "pt", "--strict"])
    with pytest.raises(WriteError, match="source"):
        _cli(convert_cmd, ["convert", str(src), str(src), "--to", "v2"])
    assert not (tmp_path / "x.pt").exists()
