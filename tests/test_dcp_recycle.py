"""Two saves at rest: a save overwrites the files of the save before the committed one in place,
never a file a reader holds, and a crash while overwriting leaves the committed save intact."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from mettaformat import _atomic
from mettaformat.cli.main import main as cli
from mettaformat.container.writer import write_container
from mettaformat.dcp import INDEX_NAME
from mettaformat.dcp.index import read_index
from mettaformat.dcp.reader import open_rank_file
from mettaformat.errors import FormatError
from tests.test_dcp import equal, load, save, state

REPO = Path(__file__).resolve().parents[1]


def step(n: int) -> dict[str, Any]:
    s = state()
    s["step"] = n
    s["model"]["fc.weight"] = s["model"]["fc.weight"] + n
    return s


def rank_file(directory: Path) -> str:
    (name,) = read_index(directory).files  # one process: one rank file per save
    return name


def inode(path: Path) -> int:
    return os.stat(path).st_ino


@pytest.mark.parametrize("compression", ["raw", "zstd"])
def test_a_reused_file_gets_exactly_the_bytes_of_a_new_one(tmp_path: Path, compression: Any) -> None:
    tensors = {"a": torch.randn(1000, 37), "b": torch.arange(5000, dtype=torch.int16), "c": torch.ones(3).half()}
    write_container(tmp_path / "new.mfmt", {"shards": tensors}, trees={"objects": {"x": [1, "y"]}},
                    compression=compression)
    old = tmp_path / "old.mfmt"
    old.write_bytes(b"\xa5" * (3 * (tmp_path / "new.mfmt").stat().st_size))  # longer, no zero anywhere
    before = inode(old)
    write_container(tmp_path / "reused.mfmt", {"shards": tensors}, trees={"objects": {"x": [1, "y"]}},
                    compression=compression, reuse=old)
    assert not old.exists() and inode(tmp_path / "reused.mfmt") == before
    assert (tmp_path / "reused.mfmt").read_bytes() == (tmp_path / "new.mfmt").read_bytes()


def test_each_save_overwrites_the_files_of_the_save_before_the_committed_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = tmp_path / "ck"
    names, inodes = [], []
    for n in range(4):
        save(step(n), ck, durable=n % 2 == 1)
        names.append(rank_file(ck))
        inodes.append(inode(ck / names[-1]))
        assert equal(load(ck), step(n))
        # the committed save and the one before it stay at rest
        assert set(os.listdir(ck)) == {INDEX_NAME, *names[-2:]}
    assert len(set(names)) == 4
    assert inodes[2] == inodes[0] and inodes[3] == inodes[1] and inodes[0] != inodes[1]
    assert cli(["validate", str(ck)]) == 0  # the earlier save at rest is not damage
    assert cli(["inspect", str(ck)]) == 0
    committed = (ck / INDEX_NAME).stat().st_size + (ck / names[-1]).stat().st_size
    earlier = (ck / names[-2]).stat().st_size
    assert f"{earlier:,} more bytes in the directory (an earlier save" in capsys.readouterr().out
    assert cli(["inspect", "--json", str(ck)]) == 0
    assert json.loads(capsys.readouterr().out)["file_bytes"] == committed  # the checkpoint, not the directory


def test_keep_previous_false_keeps_one_save_and_never_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    claims: list[Path] = []
    real_claim = _atomic._claim
    monkeypatch.setattr(_atomic, "_claim", lambda old, tmp: claims.append(old) or real_claim(old, tmp))
    ck = tmp_path / "ck"
    for n in range(3):
        save(step(n), ck, keep_previous=False)
        assert set(os.listdir(ck)) == {INDEX_NAME, rank_file(ck)}
    assert equal(load(ck), step(2)) and claims == []
    save(step(3), ck)  # the default keeps the file of save 2 at rest, and save 4 overwrites it
    save(step(4), ck)
    assert len(claims) == 1 and equal(load(ck), step(4))


def test_a_file_held_by_a_reader_in_this_process_is_not_overwritten(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    save(step(0), ck)
    first = rank_file(ck)
    save(step(1), ck)
    with open_rank_file(ck, first) as reader:  # its own open file description, so its own lock
        weight = reader.get_tensor("model.fc.weight", section="shards")
        save(step(2), ck)
        assert torch.equal(weight, step(0)["model"]["fc.weight"])  # not torn: a new file was written
        assert not (ck / first).exists()  # unlinked after the commit; the reader keeps its inode
    assert equal(load(ck), step(2))
    assert len(os.listdir(ck)) == 3


def test_a_file_locked_by_another_process_is_not_overwritten(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    save(step(0), ck)
    first = ck / rank_file(ck)
    held = inode(first)
    save(step(1), ck)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         f"fd = os.open({str(first)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_SH)\n"
         "print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        save(step(2), ck)
    finally:
        holder.communicate("")
    assert inode(ck / rank_file(ck)) != held
    assert equal(load(ck), step(2))


def test_a_reader_never_reads_a_file_a_writer_has_claimed(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    save(step(0), ck)
    name = rank_file(ck)
    fd = os.open(ck / name, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a writer holds while overwriting
        with pytest.raises(FormatError, match="replaced by a newer save"), open_rank_file(ck, name):
            pass
    finally:
        os.close(fd)
    os.rename(ck / name, ck / ".claimed")  # what a claim does before it writes
    with pytest.raises(FormatError, match="named by the index but missing"), open_rank_file(ck, name):
        pass


_CRASHING_SAVE = """
import os, signal, sys, warnings
import torch.distributed.checkpoint as dcp
from mettaformat.container.codecs import raw
from tests.test_dcp_recycle import step
from mettaformat.dcp import MettaStorageWriter

real = raw.pwritev_all
def write_then_die(*args, **kwargs):
    real(*args, **kwargs)  # part of the data is in the reused file: now die without cleaning up
    os.kill(os.getpid(), signal.SIGKILL)
raw.pwritev_all = write_then_die
warnings.simplefilter("ignore")
dcp.save(step(2), storage_writer=MettaStorageWriter(sys.argv[1], durable=True), no_dist=True)
"""


def test_a_crash_while_overwriting_a_reused_file_keeps_the_committed_save(tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    save(step(0), ck)
    reused = rank_file(ck)
    before = (ck / reused).read_bytes()
    save(step(1), ck)
    committed = rank_file(ck)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(_CRASHING_SAVE), str(ck)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    # the reused file was claimed (renamed to a temp name) and partly overwritten
    left = set(os.listdir(ck)) - {INDEX_NAME, committed}
    assert reused not in left and len(left) == 1
    (temp,) = left
    assert temp.endswith(".mfmt-tmp") and (ck / temp).read_bytes() != before
    assert rank_file(ck) == committed and equal(load(ck), step(1))
    assert cli(["validate", str(ck)]) == 0
    save(step(3), ck)  # the next save clears the leftover
    assert set(os.listdir(ck)) == {INDEX_NAME, committed, rank_file(ck)}
    assert equal(load(ck), step(3))
