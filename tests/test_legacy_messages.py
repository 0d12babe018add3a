"""Every error and warning from a legacy load names the file the caller passed, never a URI stored inside it."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

import mettaformat
from mettaformat.errors import LegacyImportError
from mettaformat.legacy import import_legacy
from tests.conftest import fixtures_dir
from tests.legacy_helpers import craft as C


@pytest.mark.parametrize(
    "data",
    [
        b"PK\x03\x04" + b"\x00" * 40,  # no central directory
        C.torch_zip(C.PROTO2 + C.tensor(C.storage_pid(key="7")) + C.STOP),  # missing storage record
        C.torch_zip(C.PROTO2 + b"\xff" + C.STOP),  # unknown opcode
        b"not a checkpoint at all",
    ],
    ids=["zip", "storage", "pickle", "format"],
)
def test_legacy_errors_name_the_file_passed(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "given_name.pt"
    path.write_bytes(data)
    with pytest.raises(LegacyImportError) as info:
        import_legacy(path)
    assert str(info.value).startswith(str(path)) and info.value.file == str(path)  # errors.naming_file
    if data.startswith(b"PK"):  # what load_any sends to the importer
        with pytest.raises(LegacyImportError, match="given_name"):
            mettaformat.load_any(path)


def test_legacy_warnings_name_the_file_on_disk_not_the_stored_uri(tmp_path: Path) -> None:
    src = fixtures_dir() / "v1_era_d_model_0050.pt"
    stored_uri = import_legacy(src).uri
    path = tmp_path / "moved_here.pt"
    shutil.copy(src, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mettaformat.load_any(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, mettaformat.migrations.MigrationWarning)]
    assert messages, "the fixture needs migrations, so the test can see their warnings"
    for message in messages:
        assert message.startswith(str(path)) and (stored_uri is None or stored_uri not in message)
