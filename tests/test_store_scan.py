"""The cold scan reads many headers at once; its result is the serial scan's, file for file."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from mettaformat.container.opened import CHECKPOINT_KEY
from mettaformat.store import PolicyStore
from mettaformat.store import catalog as catalog_mod
from tests.workers.store_helpers import write_mfmt


def _names(scan: object) -> tuple[list[str], list[str]]:
    return ([r.name for r in scan.records], sorted(e.path.name for e in scan.unreadable))  # type: ignore[attr-defined]


def test_a_concurrent_cold_scan_equals_a_serial_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(40):
        write_mfmt(tmp_path, f"model_{i:04d}.mfmt", {"epoch": i, "score": (i * 7) % 11})
    (tmp_path / "model_0100.mfmt").write_bytes(b"MFMT garbage")
    threads: set[str] = set()
    real = catalog_mod.read_record

    def spy(path: Path, signature: object) -> object:
        threads.add(threading.current_thread().name)
        if path.name == "model_0005.mfmt":
            path.unlink()  # deleted while the scan runs: skipped, not reported
            raise FileNotFoundError(path)
        return real(path, signature)  # type: ignore[arg-type]

    monkeypatch.setattr(catalog_mod, "read_record", spy)
    monkeypatch.setattr(catalog_mod, "_head_cached", lambda path: False)  # as on a cold cache
    concurrent = PolicyStore(tmp_path, use_index=False).scan()
    assert any(name.startswith("mettaformat-scan") for name in threads)
    assert "model_0005.mfmt" not in _names(concurrent)[0]
    monkeypatch.setattr(catalog_mod, "_CONCURRENT_MIN", 10**9)
    serial = PolicyStore(tmp_path, use_index=False).scan()
    assert _names(concurrent) == _names(serial)
    assert len(serial.records) == 39 and _names(serial)[1] == ["model_0100.mfmt"]
    assert [r.metadata["epoch"] for r in serial.records] == [r.metadata["epoch"] for r in concurrent.records]


def test_files_in_the_page_cache_are_read_without_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(20):
        write_mfmt(tmp_path, f"model_{i:04d}.mfmt", {"epoch": i})
    assert catalog_mod._head_cached(tmp_path / "model_0000.mfmt")  # just written
    assert not catalog_mod._head_cached(tmp_path / "missing.mfmt")
    threads: set[str] = set()
    real = catalog_mod.read_record

    def spy(path: Path, signature: object) -> object:
        threads.add(threading.current_thread().name)
        return real(path, signature)  # type: ignore[arg-type]

    monkeypatch.setattr(catalog_mod, "read_record", spy)
    assert len(PolicyStore(tmp_path, use_index=False).scan().records) == 20
    assert threads == {threading.current_thread().name}


def test_a_record_read_from_the_header_alone_matches_the_full_reader(tmp_path: Path) -> None:
    from mettaformat.checkpoint_io import read_checkpoint
    from mettaformat.container.opened import read_metadata

    path = write_mfmt(tmp_path, "model_0003.mfmt", {"epoch": 3, "score": 0.5, "nested": {"a": [1, (2, 3)]}})
    full = read_checkpoint(path, with_tensors=False)
    fmt, fields = catalog_mod._read_header(path)
    assert fmt == "mettaformat" and fields is not None
    assert (fields.metadata, fields.model_type, fields.versions, fields.provenance) == (
        full.metadata, full.model_type, full.versions, full.provenance)
    # a header longer than the first bytes read takes a second read
    fd = os.open(path, os.O_RDONLY)
    try:
        preamble, metadata = read_metadata(fd, path.stat().st_size, os.pread(fd, 64, 0))
    finally:
        os.close(fd)
    assert metadata == dict(full.metadata, **{CHECKPOINT_KEY: metadata[CHECKPOINT_KEY]}) and preamble.major == 3


def test_a_damaged_header_is_still_reported_unreadable(tmp_path: Path) -> None:
    path = write_mfmt(tmp_path, "model_0001.mfmt", {"epoch": 1})
    write_mfmt(tmp_path, "model_0002.mfmt", {"epoch": 2})
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside the header: its checksum no longer matches
    path.write_bytes(bytes(data))
    scan = PolicyStore(tmp_path, use_index=False).scan()
    assert [r.name for r in scan.records] == ["model_0002.mfmt"]
    assert [e.path.name for e in scan.unreadable] == ["model_0001.mfmt"]
    assert "checksum" in scan.unreadable[0].detail
