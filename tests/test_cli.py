"""The ``mettaformat`` command line: every subcommand, human and ``--json`` output, exit codes,
common flags, one-line errors, ``--debug`` tracebacks and escaping of hostile names.

Commands run in-process through :func:`mettaformat.cli.main.main` (fast); the installed console
script and ``python -m mettaformat`` run once each in a subprocess.

Tests marked ``xfail(strict=True)`` pin known CLI bugs: each reason says what is wrong and what
the fix is. When a bug is fixed the test XPASSes, which fails the suite: remove the mark then.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import mettaformat
from mettaformat import MettaAgent, registry
from mettaformat.cli import inspect_cmd
from mettaformat.cli.main import build_parser, main

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SUBCOMMANDS = ("inspect", "convert", "migrate", "validate", "repair", "compat", "ls", "prune", "extract",
               "materialize", "diff",
               "bench", "completion")
#: A tensor name and a metadata key that would rewrite a terminal if printed raw.
EVIL = "evil\x1b[31mname\n"
EVIL_KEY = "k\x07"


# -- helpers ----------------------------------------------------------------------------------------
def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, err = run(capsys, *argv, "--json")
    assert "Traceback" not in err
    return code, json.loads(out)


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: mettaformat" in err and "Traceback" not in err
    return err


def one_line_error(err: str, command: str) -> str:
    """The CLI's error convention: exactly one line, prefixed by the command, no traceback."""
    assert "Traceback" not in err
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    assert lines[0].startswith(f"mettaformat {command}: error: "), err
    return lines[0]


def assert_escaped(text: str) -> None:
    """No raw control character other than newline reaches the terminal, and names show escaped."""
    assert "\x1b" not in text and "\x07" not in text


def corrupt_tensor(path: Path, name: str) -> None:
    """Flip one byte of tensor ``name`` in a raw container (its checksum then fails)."""
    with mettaformat.open(path, verify=False) as ckpt:
        section = ckpt.header.section("model")
        assert section is not None
        entry = section.by_name()[name]
        offset = section.offset + section.stream_header_length + entry.begin
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path: Path) -> Path:
    """A directory with containers (raw, zstd, a changed one), a legacy v2 .pt and junk."""
    weights = {
        "a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.ones(3),
        EVIL: torch.zeros(2),
    }
    mettaformat.save_file(weights, tmp_path / "m.mfmt", metadata={"epoch": 3, "score": 0.5, EVIL_KEY: "v\x1b"})
    mettaformat.save_file(weights, tmp_path / "z.mfmt", metadata={"epoch": 3}, compression="zstd")
    mettaformat.save_file({"a.weight": torch.zeros(2, 3), "c": torch.ones(1)}, tmp_path / "n.mfmt",
                          metadata={"epoch": 4})
    torch.save(
        {
            "model_state_dict": {"w": torch.ones(3), "v": torch.arange(4, dtype=torch.float32)},
            "checkpoint_format_version": 2,
            "model_type": "brain",
            "name": "model_0050.pt",
            "uri": "file://model_0050.pt",
            "metadata": {"epoch": 50, "initial_uri": "wandb://old"},
        },
        tmp_path / "model_0050.pt",
    )
    (tmp_path / "junk.bin").write_bytes(b"hello, this is not a checkpoint")
    return tmp_path


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    d = tmp_path / "ckpts"
    d.mkdir()
    for epoch, score in ((1, 0.9), (2, 0.1), (3, 0.5), (4, 0.2)):
        mettaformat.save_file({"w": torch.full((2,), float(epoch))}, d / f"model_{epoch:04d}.mfmt",
                              metadata={"epoch": epoch, "agent_step": epoch * 10, "score": score})
    return d


@pytest.fixture
def brain_builder(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Register ``brain`` (the legacy v2 file's model type) for this test only."""
    monkeypatch.setattr(registry, "_builders", dict(registry._builders))

    class Brain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.zeros(3))
            self.register_buffer("v", torch.zeros(4))

    mettaformat.register_model_type("brain", lambda attrs, meta, cfg: Brain(), replace=True)
    yield


# -- entry points, version, usage -------------------------------------------------------------------
def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mettaformat {mettaformat.__version__}"


def test_console_script_and_python_m() -> None:
    script = VENV_BIN / "mettaformat"
    assert script.exists(), f"console script not installed at {script}"
    # Both start at once: each pays torch's import time, so in parallel the test costs one.
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        for argv in ([str(script), "--version"], [sys.executable, "-m", "mettaformat", "--version"])
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == f"mettaformat {mettaformat.__version__}"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_is_registered() -> None:
    assert tuple(subcommands()) == SUBCOMMANDS


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["nonsense"],
        ["inspect"],
        ["diff", "only-one"],
        ["completion", "fish"],
        ["convert", "a", "b", "--to", "onnx"],
        ["convert", "a", "b", "--compression", "lz4"],
        ["ls", "d", "--mode", "median"],
        ["bench", "--repeat", "many"],
        ["inspect", "f", "--no-such-flag"],
    ],
    ids=lambda a: " ".join(a) or "<none>",
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    usage_error(capsys, *argv)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_common_flags_accepted_after_subcommand(command: str) -> None:
    positional = {"convert": ["a", "b"], "repair": ["a", "b"], "extract": ["a", "b"], "diff": ["a", "b"],
                  "materialize": ["a", "b"],
                  "completion": ["bash"], "bench": []}.get(command, ["a"])
    parser = build_parser()
    after = parser.parse_args([command, *positional, "-q", "-v", "--debug"])
    assert (after.quiet, after.verbose, after.debug) == (True, True, True)
    before = parser.parse_args(["--quiet", "--verbose", "--debug", command, *positional])
    assert (before.quiet, before.verbose, before.debug) == (True, True, True)
    neither = parser.parse_args([command, *positional])
    assert (neither.quiet, neither.verbose, neither.debug) == (False, False, False)


def test_keyboard_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch, files: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(inspect_cmd, "run", interrupted)
    assert run(capsys, "inspect", str(files / "m.mfmt"))[0] == 130


def test_broken_pipe_is_silent(monkeypatch: pytest.MonkeyPatch, files: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    def broken(args: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(inspect_cmd, "run", broken)
    code, _, err = run(capsys, "inspect", str(files / "m.mfmt"))
    assert code == 0 and "error" not in err


# -- errors: one line, no traceback; --debug shows it ------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["inspect", "{junk}"],
        ["inspect", "{missing}"],
        ["inspect", "{dir}"],
        ["convert", "{missing}", "{out}.mfmt"],
        ["convert", "{junk}", "{out}.mfmt"],
        ["migrate", "{missing}"],
        ["repair", "{junk}", "{out}.mfmt"],
        ["repair", "{missing}", "{out}.mfmt"],
        ["extract", "{legacy}", "{out}.safetensors"],
        ["extract", "{junk}", "{out}.safetensors"],
        ["diff", "{junk}", "{container}"],
        ["diff", "{container}", "{missing}"],
        ["bench", "--repeat", "1", "{missing}"],
        ["ls", "{missing}"],
        ["ls", "s3://bucket/run"],
    ],
    ids=lambda a: " ".join(a),
)
def test_errors_are_one_line(files: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    names = {"junk": files / "junk.bin", "missing": files / "missing.mfmt", "dir": files, "out": files / "out",
             "legacy": files / "model_0050.pt", "container": files / "m.mfmt"}
    argv = [a.format(**{k: str(v) for k, v in names.items()}) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert out == ""
    one_line_error(err, argv[0])


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_traceback(files: Path, capsys: pytest.CaptureFixture[str], where: str) -> None:
    junk = str(files / "junk.bin")
    argv = ["--debug", "inspect", junk] if where == "before" else ["inspect", junk, "--debug"]
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert "Traceback (most recent call last)" in err and "FormatError" in err
    assert err.rstrip("\n").split("\n")[-1].startswith("mettaformat inspect: error: ")


# -- inspect ----------------------------------------------------------------------------------------
def test_inspect_container_human(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", str(files / "m.mfmt"))
    assert code == 0 and err == ""
    assert out.startswith(f"{files / 'm.mfmt'}: mettaformat {mettaformat.MFMT_VERSION_MAJOR}.")
    assert "checksums xxh3-64" in out
    assert "section" in out and "codec" in out and "model    raw" in out
    assert "a.weight" in out and "2x3" in out
    assert "evil\\x1b[31mname\\n" in out  # escaped, not interpreted
    assert "metadata:" in out and "epoch: 3" in out and "k\\x07: 'v\\x1b'" in out
    assert_escaped(out)


def test_inspect_quiet_hides_tensor_table(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["inspect", str(files / "m.mfmt"), "-q"], ["-q", "inspect", str(files / "m.mfmt")]):
        code, out, _ = run(capsys, *argv)
        assert code == 0
        assert "a.weight" not in out and "tensor " not in out
        assert "section" in out and "metadata:" in out


def test_inspect_zstd_shows_codec(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "inspect", str(files / "z.mfmt"))
    assert code == 0
    assert [s["codec"] for s in data["sections"]] == ["zstd"]
    assert data["sections"][0]["configuration"]["level"] == 1


def test_inspect_container_json(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "inspect", str(files / "m.mfmt"))
    assert code == 0
    assert {"path", "format", "version", "file_bytes", "checksum", "sections", "tensors", "metadata",
            "trees"} <= set(data)
    assert data["format"] == "mettaformat" and data["checksum"] == "xxh3-64"
    assert data["version"] == f"{mettaformat.MFMT_VERSION_MAJOR}.{mettaformat.MFMT_VERSION_MINOR}"
    assert data["file_bytes"] == (files / "m.mfmt").stat().st_size
    (section,) = data["sections"]
    assert section["name"] == "model" and section["codec"] == "raw" and section["tensors"] == 3
    assert section["stored_bytes"] == section["raw_bytes"] and section["ratio"] == 1.0
    assert [t["name"] for t in data["tensors"]] == ["a.weight", "b", EVIL]
    assert data["tensors"][0]["shape"] == [2, 3] and data["tensors"][0]["bytes"] == 24
    assert data["metadata"] == {"epoch": 3, "score": 0.5, EVIL_KEY: "v\x1b"}


def test_inspect_legacy_human_and_verbose(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    legacy = str(files / "model_0050.pt")
    code, out, _ = run(capsys, "inspect", legacy)
    assert code == 0
    assert "torch-zip (v2-state-dict), checkpoint_format_version 2" in out
    assert "imported safely, nothing in it executed" in out
    assert "classes named in the pickle" not in out
    assert "initial_uri" in out  # shown as stored: no migration
    code, out, _ = run(capsys, "inspect", legacy, "-v")
    assert code == 0 and "classes named in the pickle: " in out and "collections.OrderedDict" in out


def test_inspect_legacy_json(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "inspect", str(files / "model_0050.pt"))
    assert code == 0
    assert data["format"] == "torch-zip" and data["shape"] == "v2-state-dict" and data["version"] == "2"
    assert data["model_type"] == "brain" and data["name"] == "model_0050.pt" and data["checksum"] is None
    assert sorted(t["name"] for t in data["tensors"]) == ["v", "w"]
    assert data["metadata"] == {"epoch": 50, "initial_uri": "wandb://old"}
    assert isinstance(data["class_paths"], list)


def test_inspect_json_dtype_spelling_is_format_independent(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mettaformat.convert.convert(files / "model_0050.pt", files / "same.mfmt")
    _, container = run_json(capsys, "inspect", str(files / "same.mfmt"))
    _, legacy = run_json(capsys, "inspect", str(files / "model_0050.pt"))
    assert {t["name"]: t["dtype"] for t in container["tensors"]} == {t["name"]: t["dtype"] for t in legacy["tensors"]}


def test_inspect_json_keys_are_format_independent(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, container = run_json(capsys, "inspect", str(files / "m.mfmt"))
    _, legacy = run_json(capsys, "inspect", str(files / "model_0050.pt"))
    assert set(container) == set(legacy)
    assert type(container["version"]) is type(legacy["version"])


# -- convert ----------------------------------------------------------------------------------------
def test_convert_legacy_to_mfmt_human(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "convert", str(files / "model_0050.pt"), str(files / "out.mfmt"), "-v")
    assert code == 0 and err == ""
    assert "(torch-zip, v2-state-dict) -> " in out and "(mfmt): 2 tensors" in out
    loaded = mettaformat.load_file(files / "out.mfmt")
    assert torch.equal(loaded["w"], torch.ones(3))
    code, out, _ = run(capsys, "convert", str(files / "model_0050.pt"), str(files / "out2.mfmt"), "-q")
    assert code == 0 and out == ""


def test_convert_json_reports_not_carried(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dst = files / "out.safetensors"
    code, data = run_json(capsys, "convert", str(files / "model_0050.pt"), str(dst))
    assert code == 0
    assert {"src", "dst", "source_format", "shape", "target", "tensors", "bytes_in", "bytes_out", "not_carried",
            "notes"} <= set(data)
    assert data["target"] == "safetensors" and data["source_format"] == "torch-zip" and data["tensors"] == 2
    assert data["bytes_out"] == dst.stat().st_size
    assert any(item.startswith("model_type") for item in data["not_carried"])
    assert torch.equal(safetensors.torch.load_file(dst)["w"], torch.ones(3))


def test_convert_human_lists_not_carried(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "convert", str(files / "model_0050.pt"), str(files / "sd.pt"), "--to", "pt")
    assert code == 0 and "  not carried: " in out and "(pt)" in out


def test_convert_zstd_and_strict(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, data = run_json(capsys, "convert", str(files / "m.mfmt"), str(files / "c.mfmt"), "--compression", "zstd")
    assert code == 0 and data["target"] == "mfmt" and data["not_carried"] == []
    with mettaformat.open(files / "c.mfmt") as ckpt:
        assert ckpt.header.sections[0].codec == "zstd"
    # a bare state dict cannot carry the metadata: --strict refuses, with one line
    code, _, err = run(capsys, "convert", str(files / "m.mfmt"), str(files / "s.pt"), "--to", "pt", "--strict")
    assert code == 1 and "strict" in one_line_error(err, "convert")
    assert not (files / "s.pt").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["{src}", "{dir}/o.pt"], "cannot tell the target format"),
        (["{src}", "{src}"], "refusing to overwrite the source"),
        (["{src}", "{dir}/o.pt", "--to", "pt", "--compression", "zstd"], "compression applies to mfmt"),
        (["{src}", "{dir}/o.pt", "--to", "v1"], "pickles the policy module"),
    ],
    ids=["ambiguous-suffix", "same-file", "compression-not-mfmt", "v1-without-module"],
)
def test_convert_refusals(files: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str) -> None:
    argv = [a.format(src=files / "m.mfmt", dir=files) for a in extra]
    code, out, err = run(capsys, "convert", *argv)
    assert code == 1 and out == ""
    assert needle in one_line_error(err, "convert")


# -- migrate ----------------------------------------------------------------------------------------
def test_migrate_file_json_then_skip(files: Path, capsys: pytest.CaptureFixture[str], brain_builder: None) -> None:
    src, dst = files / "model_0050.pt", files / "migrated.mfmt"
    code, data = run_json(capsys, "migrate", str(src), str(dst))
    assert code == 0
    assert {"processed", "migrated", "skipped", "failed", "dry_run", "results"} <= set(data)
    assert (data["processed"], data["migrated"], data["skipped"], data["failed"]) == (1, 1, 0, 0)
    (result,) = data["results"]
    assert result["status"] == "migrated" and result["shape"] == "v2-state-dict"
    assert "initial_uri->initial_pr" in result["migrations"]
    agent = MettaAgent.load(dst)  # rebuilt through the registered "brain" builder
    assert torch.equal(agent.model.get_buffer("w"), torch.ones(3)) and agent.metadata["initial_pr"] == "wandb://old"
    code, out, _ = run(capsys, "migrate", str(src), str(dst))
    assert code == 0
    assert out.splitlines()[0].startswith("skipped  ") and "up to date" in out
    assert out.splitlines()[-1] == "1 processed, 0 migrated, 1 skipped, 0 failed"


def test_migrate_directory_dry_run_and_quiet(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "migrate", str(files), "--dry-run")
    assert code == 0
    assert out.splitlines()[-1] == "Dry run: 1 processed, 1 to migrate, 0 skipped, 0 failed"
    assert not (files / "model_0050.mfmt").exists()
    code, out, _ = run(capsys, "migrate", str(files), "-q")
    assert code == 0 and out == "" and (files / "model_0050.mfmt").exists()


def test_migrate_failure_exits_1(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = files / "bad.pt"
    bad.write_bytes(b"\x1b[2J not a pickle")
    code, out, _ = run(capsys, "migrate", str(bad), "-q")  # failures are printed even with -q
    assert code == 1
    assert out.startswith("failed   ") and "FormatError" in out
    assert out.splitlines()[-1] == "1 processed, 0 migrated, 0 skipped, 1 failed"
    assert_escaped(out)
    code, data = run_json(capsys, "migrate", str(bad))
    assert code == 1 and data["failed"] == 1 and data["results"][0]["status"] == "failed"


# -- validate ---------------------------------------------------------------------------------------
def test_validate_ok_human_json_quiet(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(files / n) for n in ("m.mfmt", "z.mfmt", "model_0050.pt")]
    code, out, _ = run(capsys, "validate", *paths)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{paths[0]}: mettaformat (container), 3 tensors checked: ok"
    assert lines[2] == f"{paths[2]}: torch-zip (v2-state-dict), 2 tensors checked: ok"
    code, out, _ = run(capsys, "validate", *paths, "-q")
    assert code == 0 and out == ""
    code, data = run_json(capsys, "validate", *paths, "--deep")
    assert code == 0 and isinstance(data, list) and len(data) == 3
    assert {"path", "format", "shape", "tensors_checked", "problems", "unsafe_globals", "notes", "ok"} <= set(data[0])
    assert all(r["ok"] for r in data) and data[0]["tensors_checked"] == 3


def test_validate_names_the_damage(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt_tensor(files / "m.mfmt", "b")
    paths = [str(files / "m.mfmt"), str(files / "n.mfmt"), str(files / "junk.bin"), str(files / "missing")]
    code, out, err = run(capsys, "validate", *paths, "-q")
    assert code == 1 and err == ""
    assert "n.mfmt" not in out  # -q hides files that are fine
    assert "m.mfmt: mettaformat (container), 3 tensors checked: 1 problem(s)" in out
    assert "  section 'model' tensor 'b': checksum mismatch" in out
    assert "junk.bin: unknown format" in out and "missing: unknown format" in out
    code, data = run_json(capsys, "validate", *paths)
    assert code == 1
    assert [r["ok"] for r in data] == [False, True, False, False]
    assert data[0]["problems"][0]["region"] == "section 'model' tensor 'b'"


# -- repair -----------------------------------------------------------------------------------------
def test_repair_intact_and_damaged(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "repair", str(files / "m.mfmt"), str(files / "r0.mfmt"))
    assert code == 0 and out.startswith(f"wrote {files / 'r0.mfmt'} (index from the header): 3 tensors recovered")
    corrupt_tensor(files / "m.mfmt", EVIL)
    code, out, _ = run(capsys, "repair", str(files / "m.mfmt"), str(files / "r1.mfmt"))
    assert code == 1
    assert "2 tensors recovered, 1 lost, 0 zero-filled" in out
    assert "  lost: model:evil\\x1b[31mname\\n" in out
    assert_escaped(out)
    assert set(mettaformat.load_file(files / "r1.mfmt")) == {"a.weight", "b"}
    code, data = run_json(capsys, "repair", str(files / "m.mfmt"), str(files / "r2.mfmt"), "--zero")
    assert code == 1
    assert {"source", "output", "index_from", "recovered", "lost", "zero_filled", "notes"} <= set(data)
    assert data["index_from"] == "header" and data["lost"] == [] and data["zero_filled"] == [f"model:{EVIL}"]
    assert torch.equal(mettaformat.load_file(files / "r2.mfmt")[EVIL], torch.zeros(2))


def test_repair_never_overwrites_input(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (files / "m.mfmt").read_bytes()
    code, _, err = run(capsys, "repair", str(files / "m.mfmt"), str(files / "m.mfmt"))
    assert code == 1 and "never overwrites its input" in one_line_error(err, "repair")
    assert (files / "m.mfmt").read_bytes() == before


# -- compat -----------------------------------------------------------------------------------------
@pytest.fixture
def versioned(tmp_path: Path) -> Path:
    agent = MettaAgent(torch.nn.Linear(2, 2), model_type="cli-linear")
    agent.observation_space_version = "v1"
    agent.action_space_version = "a1"
    agent.layer_version = "l1"
    agent.save(tmp_path / "versioned.mfmt")
    return tmp_path / "versioned.mfmt"


@pytest.mark.parametrize(
    ("runtime", "level", "code"),
    [
        ([], "full", 0),
        (["--observation-space", "v1", "--action-space", "a1", "--layer", "l1"], "full", 0),
        (["--action-space", "a2"], "partial", 1),
        (["--layer", "l2"], "partial", 1),
        (["--observation-space", "v2"], "incompatible", 2),
    ],
)
def test_compat_levels(versioned: Path, capsys: pytest.CaptureFixture[str], runtime: list[str], level: str,
                       code: int) -> None:
    got, out, _ = run(capsys, "compat", str(versioned), *runtime)
    assert got == code
    assert out.splitlines()[0] == f"Compatibility Level: {level}"
    got, data = run_json(capsys, "compat", str(versioned), *runtime)
    assert got == code
    assert {"file", "level", "errors", "warnings", "recommendations", "checkpoint"} <= set(data)
    assert data["level"] == level and data["file"] == str(versioned)
    assert data["checkpoint"]["observation_space_version"] == "v1"


def test_compat_legacy_and_unreadable(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "compat", str(files / "model_0050.pt"))
    assert code == 0 and "mettaformat migrate" in out
    code, out, err = run(capsys, "compat", str(files / "junk.bin"))
    assert code == 2 and err == ""
    assert out.startswith("Compatibility Level: unknown") and "Cannot read checkpoint" in out
    code, data = run_json(capsys, "compat", str(files / "missing.mfmt"))
    assert code == 2 and data["level"] == "unknown" and data["errors"]


def test_compat_escapes_newlines_in_paths(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hostile = files / "bad\nname\x1b[2J.bin"
    hostile.write_bytes(b"junk")
    code, out, _ = run(capsys, "compat", str(hostile))
    assert code == 2
    assert_escaped(out)
    assert "bad\\nname\\x1b[2J.bin" in out


# -- ls and prune -----------------------------------------------------------------------------------
def test_ls_human_json_quiet(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "ls", str(store_dir), "-q", "-v")
    assert code == 0
    assert out.splitlines()[0].split() == ["name", "epoch", "step", "score", "size"]
    assert [line.split()[0] for line in out.splitlines()[2:-1]] == [f"model_{e:04d}.mfmt" for e in (4, 3, 2, 1)]
    assert out.splitlines()[-1] == "4 checkpoints"
    code, data = run_json(capsys, "ls", str(store_dir), "--sort", "score", "--top", "2")
    assert code == 0
    assert {"uri", "sort", "mode", "metric", "count", "checkpoints", "unreadable"} <= set(data)
    assert [c["epoch"] for c in data["checkpoints"]] == [1, 3] and data["count"] == 4
    assert {"name", "path", "epoch", "agent_step", "metric", "size", "mtime_ns", "format", "model_type",
            "metadata"} <= set(data["checkpoints"][0])


def test_ls_escapes_hostile_file_names(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mettaformat.save_file({"w": torch.zeros(1)}, store_dir / "model_0009\x1b[2J.mfmt", metadata={"epoch": 9})
    code, out, _ = run(capsys, "ls", str(store_dir))
    assert code == 0 and "model_0009\\x1b[2J.mfmt" in out
    assert_escaped(out)


def test_prune_dry_run_then_real(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "prune", str(store_dir), "--keep-last", "1", "--keep-best", "1", "--dry-run")
    assert code == 0
    assert "would delete" in out and "kept 2, would delete 2" in out
    assert len(list(store_dir.glob("*.mfmt"))) == 4
    code, data = run_json(capsys, "prune", str(store_dir), "--keep-last", "1", "--keep-best", "1")
    assert code == 0
    assert {"uri", "policy", "dry_run", "kept", "deleted", "skipped", "temp_files_removed", "bytes_freed"} <= set(data)
    assert data["dry_run"] is False
    assert sorted(k["epoch"] for k in data["kept"]) == [1, 4] and sorted(d["epoch"] for d in data["deleted"]) == [2, 3]
    assert sorted(p.name for p in store_dir.glob("*.mfmt")) == ["model_0001.mfmt", "model_0004.mfmt"]


@pytest.mark.parametrize(
    "argv",
    [[], ["--keep-last", "-1"], ["--keep-best", "-2"]],
    ids=["no-rule", "negative-last", "negative-best"],
)
def test_prune_usage_errors_exit_2(store_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, "prune", str(store_dir), *argv)
    assert code == 2 and out == ""
    assert err.startswith("mettaformat prune: error: ") and err.count("\n") == 1
    assert len(list(store_dir.glob("*.mfmt"))) == 4


def test_prune_refuses_to_delete_everything(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "prune", str(store_dir), "--every-n-epochs", "1000")
    # EveryNEpochs keeps epoch 0 multiples only; none here, so everything would go.
    assert code == 1 and "allow_delete_all" in one_line_error(err, "prune")
    assert len(list(store_dir.glob("*.mfmt"))) == 4


def test_prune_bad_temp_grace_is_a_usage_error(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    usage_error(capsys, "prune", str(store_dir), "--keep-last", "1", "--temp-grace", "-1")
    usage_error(capsys, "prune", str(store_dir), "--keep-last", "1", "--temp-grace", "nan")
    assert len(list(store_dir.glob("*.mfmt"))) == 4


# -- extract ----------------------------------------------------------------------------------------
def test_extract_human_and_json(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = files / "w.safetensors"
    code, out, err = run(capsys, "extract", str(files / "m.mfmt"), str(out_path))
    assert code == 0
    size = out_path.stat().st_size
    assert out == f"wrote {out_path}: 3 tensors, {size} B\n"
    assert "not carried" not in err  # the metadata travels in __metadata__
    loaded = safetensors.torch.load_file(out_path)
    with safetensors.safe_open(out_path, "pt") as f:
        assert f.metadata()["epoch"] == "3"
    assert set(loaded) == {"a.weight", "b", EVIL} and torch.equal(loaded["b"], torch.ones(3))
    code, out, err = run(capsys, "extract", str(files / "m.mfmt"), str(out_path), "-q")
    assert code == 0 and out == ""
    code, data = run_json(capsys, "extract", str(files / "m.mfmt"), str(out_path))
    assert code == 0
    assert data["not_carried"] == [] and data["notes"] and data["bytes"] == size


def test_extract_tied_tensors_noted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    emb = torch.randn(4, 2)
    mettaformat.save_file({"embed": emb, "head": emb}, tmp_path / "tied.mfmt")
    code, data = run_json(capsys, "extract", str(tmp_path / "tied.mfmt"), str(tmp_path / "t.safetensors"))
    assert code == 0 and data["aliases"] == {"head": "embed"}
    code, _, err = run(capsys, "extract", str(tmp_path / "tied.mfmt"), str(tmp_path / "t.safetensors"))
    assert code == 0 and "tied tensor 'head' is stored once as 'embed'" in err


def test_extract_unknown_section_message(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "extract", str(files / "m.mfmt"), str(files / "x.safetensors"), "--section", "nope")
    assert code == 1
    assert "no section named 'nope'" in one_line_error(err, "extract")


def test_extract_unknown_section_exits_1(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "extract", str(files / "m.mfmt"), str(files / "x.safetensors"), "--section", "nope")
    assert code == 1 and "'nope'" in one_line_error(err, "extract")
    assert not (files / "x.safetensors").exists()


# -- diff -------------------------------------------------------------------------------------------
def test_diff_identical(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "diff", str(files / "m.mfmt"), str(files / "m.mfmt"))
    assert code == 0 and out == "identical: 3 tensors and the metadata match\n"
    mettaformat.convert.convert(files / "model_0050.pt", files / "same.mfmt")
    code, data = run_json(capsys, "diff", str(files / "model_0050.pt"), str(files / "same.mfmt"))
    assert code == 0, data  # formats differ, content does not
    assert data["identical"] is True and data["unchanged"] == 2


def test_diff_different_human_and_json(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "diff", str(files / "m.mfmt"), str(files / "n.mfmt"))
    assert code == 1
    lines = out.splitlines()
    assert "+ c" in lines and "- b" in lines and "- evil\\x1b[31mname\\n" in lines
    assert "~ a.weight: values: 5 of 6 elements differ, max abs diff 5" in lines
    assert "metadata epoch: 3 -> 4" in lines
    assert lines[-1] == "1 added, 2 removed, 1 changed, 0 unchanged, 3 metadata differences"
    assert_escaped(out)
    code, out, _ = run(capsys, "diff", str(files / "m.mfmt"), str(files / "n.mfmt"), "-q")
    assert code == 1 and "added," not in out
    code, data = run_json(capsys, "diff", str(files / "m.mfmt"), str(files / "n.mfmt"))
    assert code == 1
    assert {"added", "removed", "changed", "unchanged", "metadata", "identical"} <= set(data)
    assert data["identical"] is False and data["added"] == ["c"] and data["removed"] == ["b", EVIL]
    assert data["changed"] == [{"name": "a.weight", "kind": "values", "detail": "5 of 6 elements differ",
                                "max_abs_diff": 5.0}]
    assert data["metadata"]["epoch"] == {"a": 3, "b": 4} and data["metadata"]["score"] == {"a": 0.5, "b": None}


# -- bench ------------------------------------------------------------------------------------------
def test_bench_human_and_json(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiny = str(files / "n.mfmt")
    code, out, _ = run(capsys, "bench", "--repeat", "1", tiny)
    assert code == 0
    assert f"{tiny}: 2 tensors" in out and "| format | size |" in out and "| safetensors |" in out
    code, data = run_json(capsys, "bench", "--repeat", "1", tiny)
    assert code == 0 and len(data) == 1
    assert data[0]["input"] == tiny and data[0]["raw_bytes"] == 28
    formats = [r["format"] for r in data[0]["results"]]
    assert "mettaformat raw" in formats and "safetensors" in formats and "torch.save" in formats
    assert all({"format", "size", "save_ms", "load_ms", "lazy_ms"} <= set(r) for r in data[0]["results"])


def test_bench_repeat_zero_is_a_usage_error(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    usage_error(capsys, "bench", "--repeat", "0", str(files / "n.mfmt"))


# -- completion -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_scripts(capsys: pytest.CaptureFixture[str], shell: str) -> None:
    code, out, _ = run(capsys, "completion", shell)
    assert code == 0
    assert "complete -o filenames -F _mettaformat mettaformat" in out
    for command in SUBCOMMANDS:
        assert f"        {command}) opts=" in out
    assert "--keep-last" in out and "--json" in out
    assert out.startswith("autoload -U +X bashcompinit") == (shell == "zsh")


def test_completion_script_is_valid_bash(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, "completion", "bash")
    done = subprocess.run(["bash", "-n"], input=out, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


# -- --json everywhere ------------------------------------------------------------------------------
JSON_COMMANDS = [c for c in SUBCOMMANDS if c != "completion"]


@pytest.mark.parametrize("command", JSON_COMMANDS)
def test_json_flag_is_accepted(command: str) -> None:
    positional = {"convert": ["a", "b"], "repair": ["a", "b"], "extract": ["a", "b"], "diff": ["a", "b"],
                  "materialize": ["a", "b"],
                  "bench": []}.get(command, ["a"])
    assert build_parser().parse_args([command, *positional, "--json"]).json is True


