"""Crash consistency (threat model WR1-WR5): a save killed at any point leaves the old file or the new one."""

from __future__ import annotations

import errno
import multiprocessing
import multiprocessing.spawn
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import mettaformat
from mettaformat._atomic import TEMP_SUFFIX
from mettaformat.errors import WriteError
from tests.workers import crash

KILLS = 60


@pytest.fixture(scope="module")
def ctx() -> Iterator[multiprocessing.context.BaseContext]:
    # forkserver: children fork from a server that preloaded torch, so each starts in ~20 ms.
    # Children need not re-run pytest's __main__ (which costs ~0.5 s each): drop that step.
    real = multiprocessing.spawn.get_preparation_data

    def without_main(name: str) -> dict[str, object]:
        data = real(name)
        data.pop("init_main_from_path", None)
        data.pop("init_main_from_name", None)
        return data

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multiprocessing.spawn, "get_preparation_data", without_main)
        context = multiprocessing.get_context("forkserver")
        # The package imports its torch-backed modules lazily: preload the writer and reader too.
        context.set_forkserver_preload(
            ["torch", "mettaformat.container.writer", "mettaformat.container.reader", "tests.workers.crash"]
        )
        yield context


def check_complete(path: Path) -> int:
    """The file at ``path`` is a complete checkpoint of one version; return that version."""
    with mettaformat.open(path) as f:
        version = f.metadata["version"]
        f.verify_structure()
    loaded = mettaformat.load_file(path)  # every checksum verified
    assert set(loaded) == {f"t{i}" for i in range(8)}
    for t in loaded.values():
        assert torch.all(t == float(version))
    return int(version)


def _wait_for(saves: Any, at_least: int, proc: multiprocessing.process.BaseProcess) -> None:
    deadline = time.monotonic() + 120
    while saves.value < at_least:
        assert proc.is_alive() and time.monotonic() < deadline, f"the saver never reached {at_least} saves"
        time.sleep(0.001)


def _stopped(pid: int) -> bool:
    state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    return state in ("T", "t")


def _kill_inside_a_save(proc: multiprocessing.process.BaseProcess, folder: Path) -> None:
    """SIGKILL the saver at a moment its temp file exists: stop it once one is seen, and kill it if the
    temp file is still there (the rename that would remove it runs on the stopped main thread)."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.is_alive() and time.monotonic() < deadline, "the saver never showed a temp file"
        if any(folder.glob(f"*{TEMP_SUFFIX}")):
            os.kill(proc.pid, signal.SIGSTOP)  # type: ignore[arg-type]
            while not _stopped(proc.pid):  # type: ignore[arg-type]
                time.sleep(0.0005)
            if any(folder.glob(f"*{TEMP_SUFFIX}")):
                os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
                return
            os.kill(proc.pid, signal.SIGCONT)  # type: ignore[arg-type]
        time.sleep(0.0002)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see that a process has stopped")
@pytest.mark.parametrize("compression", ["raw", "zstd"])
def test_WR1_sigkill_at_random_points_leaves_old_or_new_file(tmp_path: Path, ctx: multiprocessing.context.BaseContext,
                                                            compression: str) -> None:
    path = tmp_path / "policy.mfmt"
    rng = random.Random(1234)
    # Time one save to spread the kills over whole saves.
    start = time.perf_counter()
    mettaformat.save_file(crash.version_tensors(0), path, metadata={"version": 0},
                          compression=compression)  # type: ignore[arg-type]
    one_save = time.perf_counter() - start
    versions_seen = set()
    mid_write = 0
    for i in range(KILLS // 2):
        saves = ctx.Value("i", -1)  # type: ignore[attr-defined]
        proc = ctx.Process(target=crash.save_loop, args=(str(path), (i + 1) * 1000, compression, False, saves))  # type: ignore[attr-defined]
        proc.start()
        # Kills are timed from the saver's own progress, not from its start, which load delays:
        # odd rounds land at a random moment of its first saves, even rounds inside a save after
        # at least one finished, so both a torn temp file and a replaced version are always tried.
        if i % 2:
            _wait_for(saves, 0, proc)
            time.sleep(rng.uniform(0, 3 * one_save))
            os.kill(proc.pid, signal.SIGKILL)  # type: ignore[arg-type]
        else:
            _wait_for(saves, 1, proc)
            _kill_inside_a_save(proc, tmp_path)
        proc.join()
        leftovers = list(tmp_path.glob(f"*{TEMP_SUFFIX}"))
        mid_write += bool(leftovers)
        versions_seen.add(check_complete(path))
        for leftover in leftovers:  # WR5: readers ignore them; the store cleans them
            leftover.unlink()
    assert mid_write >= KILLS // 4, "a kill inside a save left no temp file"
    assert len(versions_seen) > 1


def test_WR2_no_space_raises_keeps_old_file_and_leaves_no_temp(tmp_path: Path,
                                                              ctx: multiprocessing.context.BaseContext) -> None:
    path = tmp_path / "policy.mfmt"
    mettaformat.save_file({"w": torch.ones(4)}, path, metadata={"version": 1})
    before = path.read_bytes()
    result = tmp_path / "result.txt"
    proc = ctx.Process(target=crash.save_with_file_size_limit, args=(str(path), 64 << 10, str(result)))  # type: ignore[attr-defined]
    proc.start()
    proc.join(60)
    assert result.read_text().startswith("WriteError"), result.read_text()
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(f"*{TEMP_SUFFIX}"))


def test_WR3_fsync_failure_aborts_the_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.mfmt"
    mettaformat.save_file({"w": torch.ones(4)}, path)
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(WriteError, match="Input/output error"):
        mettaformat.save_file({"w": torch.zeros(4)}, path, durable=True)
    assert path.read_bytes() == before
    assert not list(tmp_path.glob(f"*{TEMP_SUFFIX}"))


def test_WR4_temp_file_is_created_beside_the_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        renames.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "sub" / "policy.mfmt"
    target.parent.mkdir()
    mettaformat.save_file({"w": torch.ones(4)}, target)
    (src, dst), = renames
    assert Path(src).parent == target.parent and Path(dst) == target  # a rename within one file system


def test_WR5_leftover_temp_files_are_ignored_by_readers(tmp_path: Path) -> None:
    path = tmp_path / "policy.mfmt"
    mettaformat.save_file({"w": torch.ones(4)}, path)
    (tmp_path / f".policy.mfmt.0123456789ab{TEMP_SUFFIX}").write_bytes(b"partial")
    assert torch.equal(mettaformat.load_file(path)["w"], torch.ones(4))
    mettaformat.save_file({"w": torch.zeros(4)}, path)  # the next save is not disturbed by the leftover
    assert torch.equal(mettaformat.load_file(path)["w"], torch.zeros(4))
