"""threat model AR1-AR13: hostile zip (and tar/gzip) containers around legacy pickles."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from mettaformat.errors import MettaFormatError
from mettaformat.legacy import (
    LegacyFormatError,
    LegacyLimitError,
    LegacyLimits,
    LegacyUnsupportedError,
    import_legacy,
    import_legacy_bytes,
    sniff,
)
from tests.legacy_helpers import craft as C
from tests.legacy_helpers.canary import canary

FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)
PKL = C.state_dict_pickle(w=C.tensor(C.storage_pid()))


def _entries(prefix: str = "archive") -> list[C.Entry]:
    return [
        C.Entry(f"{prefix}/data.pkl", PKL),
        C.Entry(f"{prefix}/data/0", FLOATS),
        C.Entry(f"{prefix}/version", b"3\n"),
    ]


def _zip(entries: list[C.Entry]) -> bytes:
    return C.build_zip(C.ZipSpec(entries))


def test_baseline_crafted_zip_imports() -> None:
    assert import_legacy_bytes(_zip(_entries())).tensors["w"].tolist() == [1, 2, 3, 4]


def test_AR1_two_prefixes_and_decoy_data_pkl(tmp_path: Path) -> None:
    with canary(tmp_path) as c:
        decoy = C.PROTO2 + C.call(C.glob("os", "system"), C.uni(c.shell)) + C.STOP
        with pytest.raises(LegacyFormatError, match="two prefixes"):
            import_legacy_bytes(_zip([*_entries(), C.Entry("other/data.pkl", decoy)]))
        with pytest.raises(LegacyFormatError, match="two prefixes"):
            import_legacy_bytes(_zip([*_entries(), C.Entry("archive2/version", b"3\n")]))
        with pytest.raises(LegacyFormatError, match="not inside a top-level folder"):
            import_legacy_bytes(_zip([C.Entry("data.pkl", PKL)]))


@pytest.mark.parametrize(
    "name",
    ["archive/../data.pkl", "/archive/x", "archive\\x", "C:/archive/x", "archive/a\x00b", "archive//x", "archive/./x"],
)
def test_AR2_unsafe_names(name: str) -> None:
    with pytest.raises(LegacyFormatError):
        import_legacy_bytes(_zip([*_entries(), C.Entry(name, b"")]))


def test_AR3_duplicate_names() -> None:
    with pytest.raises(LegacyFormatError, match="duplicate"):
        import_legacy_bytes(_zip([*_entries(), C.Entry("archive/data/0", FLOATS[::-1])]))


def test_AR4_local_name_mismatch_and_odd_flags() -> None:
    entries = _entries()
    entries[1].local_name = "archive/data/1"
    with pytest.raises(LegacyFormatError, match="disagrees"):
        import_legacy_bytes(_zip(entries))
    entries = _entries()
    entries[1].flags = 0x40
    with pytest.raises(LegacyFormatError, match="flag"):
        import_legacy_bytes(_zip(entries))


def test_AR5_overlapping_entries() -> None:
    # The second entry's local header lies inside the first entry's data ("quoted overlap").
    inner = C.build_zip(C.ZipSpec([C.Entry("archive/data/1", FLOATS)]))
    inner_local = inner[: 30 + len("archive/data/1") + len(FLOATS)]
    entries = [C.Entry("archive/data.pkl", PKL), C.Entry("archive/version", b"3\n" + inner_local)]
    raw = bytearray(_zip(entries))
    # Point a third central-directory entry at the embedded local header.
    start = raw.index(inner_local)
    spec = [*entries, C.Entry("archive/data/1", FLOATS, header_offset=start)]
    raw = bytearray(_zip(spec))
    with pytest.raises(LegacyFormatError, match="overlap"):
        import_legacy_bytes(bytes(raw))


def test_AR6_compressed_members_rejected() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", PKL)
        zf.writestr("archive/data/0", bytes(1 << 20))  # 1 MiB of zeros: a 1000:1 ratio
    with pytest.raises(LegacyUnsupportedError, match="compressed"):
        import_legacy_bytes(buf.getvalue())


def test_AR7_entry_count_cap() -> None:
    entries = _entries() + [C.Entry(f"archive/.data/x{i}", b"") for i in range(20)]
    assert import_legacy_bytes(_zip(entries)).tensors
    with pytest.raises(LegacyLimitError):
        import_legacy_bytes(_zip(entries), limits=LegacyLimits(max_zip_entries=10))


def test_AR8_symlink_entries() -> None:
    entries = _entries()
    entries[1].external_attr = 0o120777 << 16
    with pytest.raises(LegacyFormatError, match="symbolic link"):
        import_legacy_bytes(_zip(entries))


@pytest.mark.parametrize("cut", [22, 40, 200])
def test_AR9_truncated_or_missing_central_directory(cut: int) -> None:
    raw = _zip(_entries())
    with pytest.raises(LegacyFormatError):
        import_legacy_bytes(raw[:-cut])


def test_AR10_crc_policy() -> None:
    entries = _entries()
    entries[1].crc = 0x12345678
    with pytest.raises(LegacyFormatError, match="CRC"):
        import_legacy_bytes(_zip(entries))
    entries[1].crc = 0  # CRC not written (torch's set_crc32_options(False)): accepted
    assert import_legacy_bytes(_zip(entries)).tensors["w"].tolist() == [1, 2, 3, 4]


def test_AR11_encrypted_and_inconsistent_sizes() -> None:
    entries = _entries()
    entries[1].flags = 0x1
    with pytest.raises(LegacyFormatError, match="encrypted"):
        import_legacy_bytes(_zip(entries))
    entries = _entries()
    entries[1].size = 0xFFFFFFF0  # sizes pointing far past the end of the file
    with pytest.raises(LegacyFormatError):
        import_legacy_bytes(_zip(entries))


def test_AR12_wrapped_archives_not_unwrapped(tmp_path: Path) -> None:
    raw = _zip(_entries())
    for wrapped in (gzip.compress(raw), b"7z\xbc\xaf\x27\x1c" + raw, b"\x28\xb5\x2f\xfd" + raw):
        assert sniff(wrapped[:64]) is None
        with pytest.raises(LegacyUnsupportedError, match="never"):
            import_legacy_bytes(wrapped)
    with pytest.raises(LegacyFormatError, match="not a torch checkpoint"):
        import_legacy_bytes(b"hello world")
    path = tmp_path / "x.pt.gz"
    path.write_bytes(gzip.compress(raw))
    with pytest.raises(MettaFormatError):
        import_legacy(path)


def test_AR13_tar_rejected(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        link = tarfile.TarInfo("storages")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
        info = tarfile.TarInfo("../pickle")
        info.size = len(PKL)
        tf.addfile(info, io.BytesIO(PKL))
    with canary(tmp_path):
        with pytest.raises(LegacyUnsupportedError, match="tar"):
            import_legacy_bytes(buf.getvalue())
    assert not (tmp_path / "pickle").exists()


def _real_and_decoy() -> tuple[bytes, bytes]:
    real = C.torch_zip(C.state_dict_pickle(w=C.tensor(C.storage_pid())), {"0": bytes(16)})
    decoy = C.torch_zip(C.state_dict_pickle(w=C.tensor(C.storage_pid())), {"0": b"\x01" * 16}, prefix="decoy")
    return real, decoy


def test_decoy_archive_appended_is_refused() -> None:
    real, decoy = _real_and_decoy()
    assert import_legacy_bytes(real).tensors["w"].abs().sum() == 0
    with pytest.raises(LegacyFormatError, match=r"decoy|disagree|after the end"):
        import_legacy_bytes(real + decoy)


def test_decoy_archive_in_the_end_record_comment_is_refused() -> None:
    real, decoy = _real_and_decoy()
    eocd = real.rindex(b"PK\x05\x06")
    with_comment = real[: eocd + 20] + struct.pack("<H", len(decoy)) + decoy
    with pytest.raises(LegacyFormatError, match=r"decoy|disagree|after the end"):
        import_legacy_bytes(with_comment)


def test_decoy_end_record_pointing_at_the_real_directory_is_refused() -> None:
    # An end record whose offsets are torch's (absolute) but whose position makes zipfile shift them.
    real, _ = _real_and_decoy()
    eocd = real.rindex(b"PK\x05\x06")
    shifted = real[:eocd] + b"\x00" * 64 + real[eocd:]
    with pytest.raises(LegacyFormatError, match=r"decoy|disagree"):
        import_legacy_bytes(shifted)
