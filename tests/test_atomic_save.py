"""Atomic saves: fsyncs (and early writeback) only with ``durable``, and large old versions swapped
out and deleted in the background instead of inside the rename."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import time
from pathlib import Path

import pytest
import torch

import mettaformat
from mettaformat import _atomic
from mettaformat._atomic import TEMP_SUFFIX
from mettaformat.container.writer import write_container
from mettaformat.errors import WriteError


def _big(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((_atomic._RELEASE_IN_BACKGROUND // 4 + 16,), value)}


def _no_leftovers(directory: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not list(directory.glob(f"*{TEMP_SUFFIX}")):
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("durable", [False, True])
def test_fsyncs_happen_only_when_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool) -> None:
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real(fd))
    mettaformat.save_file({"w": torch.ones(4)}, tmp_path / "a.mfmt", durable=durable)
    assert len(synced) == (2 if durable else 0)  # the file, then its directory


@pytest.mark.parametrize("exchange", [True, False])
def test_replacing_a_large_file_swaps_it_out_and_deletes_it_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    if not exchange:
        monkeypatch.setattr(_atomic, "_renameat2", None)  # a platform without renameat2
    path = tmp_path / "big.mfmt"
    mettaformat.save_file(_big(1.0), path)
    reader = mettaformat.open(path)
    old = reader.get_tensor("w")
    replaced: list[str] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: replaced.append(os.fspath(b)) or real(a, b))
    mettaformat.save_file(_big(2.0), path)
    assert replaced == ([] if exchange and _atomic._renameat2 is not None else [os.fspath(path)])
    assert bool((mettaformat.load_file(path)["w"] == 2.0).all())
    assert bool((old == 1.0).all())  # a reader of the old version keeps it
    reader.close()
    assert _no_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["big.mfmt"]


def test_small_or_durable_replacements_use_a_plain_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.mfmt"
    mettaformat.save_file({"w": torch.ones(4)}, path)
    swaps: list[tuple[Path, Path]] = []
    monkeypatch.setattr(_atomic, "_exchange", lambda a, b: swaps.append((a, b)) or False)
    mettaformat.save_file({"w": torch.zeros(4)}, path)  # small
    mettaformat.save_file(_big(1.0), path)  # the old version is small
    mettaformat.save_file(_big(2.0), path, durable=True)  # durable: the plain rename, then fsyncs
    assert swaps == []
    mettaformat.save_file(_big(3.0), path)
    assert len(swaps) == 1 and swaps[0][1] == path  # the fallback ran: the content is still right
    assert bool((mettaformat.load_file(path)["w"] == 3.0).all())
    assert _no_leftovers(tmp_path)


def test_a_symlinked_target_is_replaced_by_the_file_not_followed(tmp_path: Path) -> None:
    real_file = tmp_path / "real.mfmt"
    mettaformat.save_file(_big(1.0), real_file)
    link = tmp_path / "link.mfmt"
    link.symlink_to(real_file)
    mettaformat.save_file(_big(2.0), link)
    assert not link.is_symlink()
    assert bool((mettaformat.load_file(real_file)["w"] == 1.0).all())
    assert bool((mettaformat.load_file(link)["w"] == 2.0).all())


def test_a_durable_write_starts_writeback_while_the_file_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(_atomic, "_sync_file_range", lambda fd, offset, nbytes, flags: calls.append((fd, flags)) or 0)
    monkeypatch.setattr(_atomic, "_WRITEBACK_PERIOD_S", 0.001)
    with _atomic.atomic_fd(tmp_path / "plain.mfmt") as fd:
        os.write(fd, b"x")
        time.sleep(0.05)
    assert calls == []  # only durable writes ask for early writeback
    with _atomic.atomic_fd(tmp_path / "durable.mfmt", durable=True) as fd:
        os.write(fd, b"x")
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.005)
        written_fd = fd
    seen = len(calls)
    time.sleep(0.05)
    assert seen > 0 and len(calls) == seen  # it stopped with the block, before the descriptor was closed
    assert set(calls) == {(written_fd, _atomic._SYNC_FILE_RANGE_WRITE)}
    assert (tmp_path / "durable.mfmt").read_bytes() == b"x"


def test_early_writeback_stops_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(_atomic, "_sync_file_range", lambda fd, offset, nbytes, flags: calls.append(fd) or 0)
    monkeypatch.setattr(_atomic, "_WRITEBACK_PERIOD_S", 0.001)
    with pytest.raises(WriteError, match="disk full"):
        with _atomic.atomic_fd(tmp_path / "a.mfmt", durable=True):
            time.sleep(0.02)
            raise OSError("disk full")
    seen = len(calls)
    time.sleep(0.05)
    assert seen > 0 and len(calls) == seen
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("code", "fails"), [(errno.EIO, True), (errno.EINVAL, False)])
def test_a_write_error_seen_during_early_writeback_fails_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, fails: bool
) -> None:
    path = tmp_path / "a.mfmt"
    mettaformat.save_file({"w": torch.ones(4)}, path)

    def refuse(fd: int, offset: int, nbytes: int, flags: int) -> int:
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(_atomic, "_sync_file_range", refuse)
    monkeypatch.setattr(_atomic, "_WRITEBACK_PERIOD_S", 0.001)
    expectation = pytest.raises(WriteError, match=os.strerror(code)) if fails else contextlib.nullcontext()
    with expectation:
        with _atomic.atomic_fd(path, durable=True) as fd:
            os.write(fd, b"not a container")
            time.sleep(0.05)
    if fails:  # the previous version is untouched; an unsupported file system just skips the hint
        assert bool((mettaformat.load_file(path)["w"] == 1.0).all())
    else:
        assert path.read_bytes() == b"not a container"
    assert _no_leftovers(tmp_path)


def test_sync_dir_false_leaves_the_directory_to_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(_atomic, "fsync_dir", synced.append)
    write_container(tmp_path / "a.mfmt", {"model": {"w": torch.ones(2)}}, durable=True, sync_dir=False)
    assert synced == []
    mettaformat.save_file({"w": torch.ones(2)}, tmp_path / "b.mfmt", durable=True)
    assert synced == [tmp_path]
