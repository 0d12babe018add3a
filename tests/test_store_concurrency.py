"""Two processes saving into one PolicyStore directory at once: nothing lost, nothing corrupted."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mettaformat
from mettaformat._atomic import TEMP_SUFFIX
from mettaformat.store import INDEX_FILE_NAME, PolicyStore
from mettaformat.store.catalog import read_record
from mettaformat.store.index import read_index
from mettaformat.store.record import stat_signature
from tests.conftest import REPO

COUNT = 20


def test_two_processes_save_concurrently(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.workers.store_saver", str(tmp_path), str(w), str(COUNT)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for w in (1, 2)
    ]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready-{w}").exists() for w in (1, 2)):  # importing torch takes seconds
        assert time.monotonic() < deadline and all(p.poll() is None for p in workers), "a worker did not start"
        time.sleep(0.01)
    (tmp_path / "go").touch()
    outputs = [p.communicate(timeout=120)[0] for p in workers]
    assert [p.returncode for p in workers] == [0, 0], outputs
    spans = [[float(t.split("=")[1]) for t in out.split() if t.startswith(("start=", "end="))] for out in outputs]
    assert max(s for s, _ in spans) < min(e for _, e in spans), f"the workers did not overlap: {spans}"

    expected = sorted(f"w{w}_{i:03d}.mfmt" for w in (1, 2) for i in range(COUNT))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(TEMP_SUFFIX)]
    scan = PolicyStore(tmp_path).scan()
    assert scan.unreadable == ()
    assert sorted(r.name for r in scan.records) == expected
    for record in scan.records:
        # Every byte checked: the structure, and each tensor's checksum as it is read.
        with mettaformat.open(record.path, verify=True) as ckpt:
            ckpt.verify_structure()
            ckpt.load_section("model")
        assert record.metadata["worker"] == int(record.name[1]) and record.epoch == int(record.name[3:6])

    # The index is valid msgpack, and every entry that still matches its file is accurate.
    index = read_index(tmp_path)
    assert (tmp_path / INDEX_FILE_NAME).exists() and index
    assert set(index) <= set(expected)
    for name, entry in index.items():
        path = tmp_path / name
        signature = stat_signature(os.lstat(path))
        if entry.signature == signature:
            assert entry.to_record(path) == read_record(path, signature)
