"""Every path a user names goes through one guard for inputs and one for outputs, and memory
stays proportional to the input whatever sizes a file declares."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import mettaformat
from mettaformat.errors import FormatError, MettaFormatError, WriteError
from tests import craft


@pytest.fixture
def container(tmp_path: Path) -> Path:
    path = tmp_path / "m.mfmt"
    mettaformat.save_file({"w": torch.arange(16.0), "b": torch.ones(3)}, path, metadata={"epoch": 1})
    return path


def _openers() -> dict[str, Callable[[Path], Any]]:
    from mettaformat.anyformat import load_any, sniff_format
    from mettaformat.checkpoint_io import read_checkpoint
    from mettaformat.compat import check_checkpoint_compatibility
    from mettaformat.diff import diff_checkpoints
    from mettaformat.legacy import import_legacy
    from mettaformat.repair import repair

    return {
        "open": lambda p: mettaformat.open(p),
        "load_file": mettaformat.load_file,
        "load_any": load_any,
        "sniff_format": sniff_format,
        "read_checkpoint": read_checkpoint,
        "import_legacy": import_legacy,
        "repair": lambda p: repair(p, p.parent / "repaired.mfmt"),
        "diff": lambda p: diff_checkpoints(p, p),
        "MettaAgent.load": lambda p: mettaformat.MettaAgent.load(p),
        # documented never to raise: the refusal is in the report
        "compat": lambda p: _raise_errors(check_checkpoint_compatibility(p).errors),
        "validate": lambda p: _raise_problems(p),
    }


def _raise_errors(errors: list[str]) -> None:
    if errors:
        raise FormatError("; ".join(errors))


def _raise_problems(path: Path) -> None:
    from mettaformat.validate import validate

    report = validate(path)
    if not report.ok:
        raise FormatError("; ".join(p.message for p in report.problems))


@pytest.fixture
def special_files(tmp_path: Path) -> Iterator[dict[str, Path]]:
    fifo = tmp_path / "pipe.mfmt"
    os.mkfifo(fifo)
    files = {"fifo": fifo, "directory": tmp_path / "dir.pt"}
    files["directory"].mkdir()
    if Path("/dev/zero").exists():
        files["char device"] = Path("/dev/zero")
        link = tmp_path / "zero.pt"
        link.symlink_to("/dev/zero")
        files["link to a char device"] = link
    yield files


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError("blocked")


@pytest.mark.parametrize("entry", sorted(_openers()))
def test_every_entry_point_refuses_non_regular_files_at_once(entry: str, special_files: dict[str, Path]) -> None:
    opener = _openers()[entry]
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for kind, path in special_files.items():
            signal.setitimer(signal.ITIMER_REAL, 5)
            try:
                with pytest.raises(MettaFormatError) as info:
                    opener(path)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            assert "not a regular file" in str(info.value), (entry, kind, info.value)
    finally:
        signal.signal(signal.SIGALRM, old)


def _writers(tmp_path: Path, container: Path) -> dict[str, Callable[[Path], Any]]:
    from mettaformat.container.extract import extract_safetensors
    from mettaformat.convert import convert
    from mettaformat.migrate import migrate
    from mettaformat.repair import repair

    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy)
    return {
        "extract": lambda out: extract_safetensors(container, out),
        "convert": lambda out: convert(container, out, to="mfmt"),
        "repair": lambda out: repair(container, out),
        "migrate --no-backup": lambda out: _migrate_raise(migrate(legacy, out, backup=False)),
    }


def _migrate_raise(summary: Any) -> None:
    (result,) = summary.results
    if result.status == "failed":
        raise WriteError(result.reason)


@pytest.mark.parametrize("writer", ["extract", "convert", "repair", "migrate --no-backup"])
@pytest.mark.parametrize("how", ["same path", "symlink", "hard link", "dot-dot"])
def test_every_writer_refuses_an_output_that_resolves_to_its_input(
    tmp_path: Path, container: Path, writer: str, how: str
) -> None:
    write = _writers(tmp_path, container)[writer]
    source = tmp_path / "legacy.pt" if writer.startswith("migrate") else container
    before = source.read_bytes()
    if how == "same path":
        out = source
    elif how == "symlink":
        out = tmp_path / "alias.out"
        out.symlink_to(source)
    elif how == "hard link":
        out = tmp_path / "hard.out"
        os.link(source, out)
    else:
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / source.name
    with pytest.raises(WriteError, match="never overwrites its input"):
        write(out)
    assert source.read_bytes() == before


def test_migrate_in_place_with_a_backup_is_still_allowed(tmp_path: Path) -> None:
    from mettaformat.migrate import migrate

    legacy = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, legacy)
    (result,) = migrate(legacy, legacy).results
    assert result.status == "migrated" and Path(result.backup).exists()  # type: ignore[arg-type]


def _huge_declared(container: Path, compression: str) -> Path:
    """The last tensor claims 2**40 bytes; everything else (checksums of the header) is consistent."""
    data = container.read_bytes()
    if compression == "zstd":
        mettaformat.save_file({"w": torch.arange(16.0), "b": torch.ones(3)}, container, compression="zstd")
        data = container.read_bytes()
    parts = craft.parse(data)
    t = max(parts.section()["tensors"], key=lambda t: t["offsets"][0])
    begin = t["offsets"][0]
    grow = (1 << 40) - (t["offsets"][1] - begin)
    t["shape"], t["offsets"] = [1 << 19, 1 << 19], [begin, begin + (1 << 40)]
    section = parts.section()
    section["stream"]["length"] += grow
    if compression == "raw":
        section["length"] += grow
    parts.header["file_length"] += grow  # as if the file had been cut
    out = container.with_name(f"huge-{compression}.mfmt")
    out.write_bytes(craft.build(parts, fix_file_length=False))
    return out


@pytest.mark.parametrize("compression", ["raw", "zstd"])
@pytest.mark.parametrize("zero", [False, True])
def test_repair_allocates_only_what_the_input_holds(
    container: Path, compression: str, zero: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mettaformat import repair as repair_mod

    path = _huge_declared(container, compression)
    sizes: list[int] = []
    for name in ("empty", "zeros"):
        real = getattr(torch, name)

        def spy(*shape: Any, _real: Any = real, **kw: Any) -> torch.Tensor:
            n = 1
            for d in shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape:
                n *= int(d)
            sizes.append(n)
            return _real(*shape, **kw)

        monkeypatch.setattr(repair_mod.torch, name, spy)
    try:
        report = repair_mod.repair(path, path.with_name("fixed.mfmt"), zero=zero)
    except MettaFormatError:
        pass  # refusing is fine; allocating is not
    else:
        assert "model:b" in report.lost and not report.zero_filled
    assert max(sizes, default=0) <= path.stat().st_size


_DIFF_PROBE = """
import resource, sys, torch
from mettaformat.diff import diff_checkpoints
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
d = diff_checkpoints(sys.argv[1], sys.argv[2])
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(d.changed[0].detail, grew // 1024)
"""


def test_diff_of_huge_broadcast_views_stays_small(tmp_path: Path) -> None:
    n = 1 << 27  # 512 MiB of float32 as a view of one element; 1 GiB once widened to float64
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({"w": torch.zeros(1).expand(n), "m": torch.ones(2, 1).expand(2, n // 2)}, a)
    torch.save({"w": torch.ones(1).expand(n), "m": torch.ones(2, 1).expand(2, n // 2)}, b)
    assert a.stat().st_size < 4096
    out = subprocess.run(
        [sys.executable, "-c", _DIFF_PROBE, str(a), str(b)], capture_output=True, text=True, timeout=120, check=True
    )
    detail, grew_mib = out.stdout.rsplit(" ", 1)
    assert detail == f"{n} of {n} elements differ"
    assert int(grew_mib) < 100, out.stdout


def test_diff_tolerances(tmp_path: Path) -> None:
    from mettaformat.diff import diff_checkpoints

    a, b = tmp_path / "a.mfmt", tmp_path / "b.mfmt"
    mettaformat.save_file({"w": torch.tensor([1.0, 2.0, float("nan")])}, a)
    mettaformat.save_file({"w": torch.tensor([1.0, 2.001, float("nan")])}, b)
    assert diff_checkpoints(a, a).identical  # NaN equals NaN
    assert not diff_checkpoints(a, b).identical
    assert diff_checkpoints(a, b, atol=0.01).identical
    assert diff_checkpoints(a, b, rtol=0.001).identical
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
