"""The cold scan reads many headers at once; its result is the serial scan's, file for file."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

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
    concurrent = PolicyStore(tmp_path, use_index=False).scan()
    assert any(name.startswith("mettaformat-scan") for name in threads)
    assert "model_0005.mfmt" not in _names(concurrent)[0]
    monkeypatch.setattr(catalog_mod, "_CONCURRENT_MIN", 10**9)
    serial = PolicyStore(tmp_path, use_index=False).scan()
    assert _names(concurrent) == _names(serial)
    assert len(serial.records) == 39 and _names(serial)[1] == ["model_0100.mfmt"]
    assert [r.metadata["epoch"] for r in serial.records] == [r.metadata["epoch"] for r in concurrent.records]
