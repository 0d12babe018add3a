"""Checksum verification: parallel hashing, hashing fused with reads and decodes, the memo of
verified files. Every fast path is compared with the plain one-shot checksum."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest
import torch

import mettaformat
from mettaformat.container import verify
from mettaformat.container.layout import checksum
from mettaformat.errors import IntegrityError
from tests import craft


@pytest.fixture(autouse=True)
def _fresh_memo() -> None:
    verify.forget_verified()


def _random_bytes(n: int, seed: int) -> bytearray:
    return bytearray(random.Random(seed).randbytes(n))


@pytest.mark.parametrize("sizes", [[0], [1, 2, 3], [5 << 20, 1, 3 << 20, 0, 7], [64 << 10] * 50])
def test_hash_views_match_one_shot_checksums(sizes: list[int]) -> None:
    data = _random_bytes(sum(sizes), 1)
    views, position = [], 0
    for n in sizes:
        views.append(memoryview(data)[position : position + n])
        position += n
    assert verify.hash_views(views) == [checksum(v) for v in views]


@pytest.mark.parametrize("parts", [1, 2, 3, 8])
def test_balanced_runs_cover_every_index_once_in_order(parts: int) -> None:
    rng = random.Random(parts)
    for _ in range(50):
        sizes = [rng.choice([0, 1, 100, 10_000]) for _ in range(rng.randint(0, 30))]
        runs = verify._balanced_runs(sizes, parts)
        assert [i for r in runs for i in r] == list(range(len(sizes)))
        assert len(runs) <= parts and all(len(r) for r in runs)


def test_read_and_hash_fills_the_buffer_and_hashes_each_span(tmp_path: Path) -> None:
    data = bytes(_random_bytes(9 << 20, 2))
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 100 + data)
    # gaps before, between and after the spans, a span crossing chunk boundaries, an empty span
    spans = [(10, 3 << 20), (3 << 20, 3 << 20), (3 << 20, (5 << 20) + 7), ((6 << 20), (9 << 20) - 5)]
    target = bytearray(len(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        got, digests = verify.read_and_hash(fd, memoryview(target), 100, spans, hash_=True)
        assert got == len(data) and bytes(target) == data
        assert digests == [checksum(data[b:e]) for b, e in spans]
        # a file that ends early: the count says so
        short = bytearray(len(data) + 10)
        got, _ = verify.read_and_hash(fd, memoryview(short), 100, [(0, len(short))], hash_=True)
        assert got == len(data)
        got, digests = verify.read_and_hash(fd, memoryview(short), 100, [(0, 5)], hash_=False)
        assert got == len(data) and digests == []
    finally:
        os.close(fd)


def test_ordered_hasher_gives_the_one_shot_digest_in_any_completion_order() -> None:
    data = _random_bytes(1 << 20, 3)
    lengths = [100_000] * 10 + [len(data) - 1_000_000]
    for seed in range(20):
        hasher = verify.OrderedHasher(memoryview(data), lengths)
        jobs = hasher.wrap([lambda: None] * len(lengths))
        order = list(range(len(jobs)))
        random.Random(seed).shuffle(order)
        threads = [threading.Thread(target=jobs[i]) for i in order]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert hasher.intdigest() == checksum(data)
    unfinished = verify.OrderedHasher(memoryview(data), [10, len(data) - 10])
    unfinished.wrap([lambda: None, lambda: None])[1]()
    with pytest.raises(RuntimeError):
        unfinished.intdigest()


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(300, 200, generator=g)
    return {"w": w, "tied": w, "b": torch.randn(300, generator=g), "i": torch.arange(50_000, dtype=torch.int64),
            "h": torch.randn(1000, generator=g).half(), "e": torch.empty(0, 3)}


@pytest.mark.parametrize("compression", ["raw", "zstd"])
@pytest.mark.parametrize("mmap", [True, False])
def test_verified_loads_equal_unverified_ones(tmp_path: Path, compression: str, mmap: bool) -> None:
    state = _state()
    path = tmp_path / "m.mfmt"
    mettaformat.save_file(state, path, compression=compression)  # type: ignore[arg-type]
    a = mettaformat.load_file(path, verify=True, mmap=mmap)
    b = mettaformat.load_file(path, verify=False, mmap=mmap)
    assert a.keys() == b.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(a[k], v) and torch.equal(b[k], v)


def _with_wrong_checksum(path: Path, name: str) -> None:
    parts = craft.parse(path.read_bytes())
    parts.tensor(name)["checksum"] = (craft.xxh(b"not it")).to_bytes(8, "little")
    path.write_bytes(craft.build(parts))


@pytest.mark.parametrize("compression", ["raw", "zstd"])
@pytest.mark.parametrize("mmap", [True, False])
def test_every_load_path_names_a_tensor_whose_checksum_differs(tmp_path: Path, compression: str, mmap: bool) -> None:
    path = tmp_path / "m.mfmt"
    mettaformat.save_file(_state(), path, compression=compression)  # type: ignore[arg-type]
    _with_wrong_checksum(path, "b")
    with pytest.raises(IntegrityError, match="'b'"):
        mettaformat.load_file(path, mmap=mmap)
    with mettaformat.open(path) as f:
        assert f.get_tensor("w").shape == (300, 200)
        with pytest.raises(IntegrityError, match="'b'"):
            f.get_tensor("b")
    assert mettaformat.load_file(path, verify=False, mmap=mmap)["b"].shape == (300,)


def test_zstd_verification_hashes_frames_as_they_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor of many frames is verified through the ordered hasher, never by a second pass."""
    from mettaformat.container import reader

    path = tmp_path / "z.mfmt"
    from mettaformat.codecs import ZstdCodec

    big = torch.randn(1 << 20)
    mettaformat.save_file({"big": big, "small": torch.ones(3)}, path, compression=ZstdCodec(frame_size=64 << 10))
    calls: list[int] = []
    real = reader.checksum
    monkeypatch.setattr(reader, "checksum", lambda data: calls.append(len(data)) or real(data))
    assert torch.equal(mettaformat.load_file(path)["big"], big)
    assert max(calls, default=0) < big.numel() * 4  # only headers were hashed in one piece


def test_a_file_verified_once_is_not_hashed_again_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verify, "RACY_WINDOW_NS", 0)  # as for a file written long ago
    path = tmp_path / "m.mfmt"
    mettaformat.save_file(_state(), path)
    hashed: list[int] = []
    real = verify.hash_views
    monkeypatch.setattr(
        "mettaformat.container.section_load.hash_views", lambda views: hashed.append(len(views)) or real(views)
    )
    mettaformat.load_file(path)
    assert hashed == [5]  # tied names share one entry
    mettaformat.load_file(path)
    assert hashed == [5, 0]
    with mettaformat.open(path) as f:  # a lazy read of a verified tensor is not hashed either
        f.get_tensor("w")
    assert hashed == [5, 0]
    verify.forget_verified()
    mettaformat.load_file(path)
    assert hashed == [5, 0, 5]
    # the file changes (its identity changes with it): verified again, and the damage is found
    _with_wrong_checksum(path, "b")
    with pytest.raises(IntegrityError, match="'b'"):
        mettaformat.load_file(path)


def _saved_long_ago(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A saved file whose modification time is far in the past, with no racy window: a later write
    surely moves its timestamps, so the memo of verified files sees every change."""
    monkeypatch.setattr(verify, "RACY_WINDOW_NS", 0)
    path = tmp_path / "m.mfmt"
    mettaformat.save_file(_state(), path)
    os.utime(path, (1, 1))
    return path


def test_a_verified_load_checks_the_structure_once_while_the_file_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mettaformat.container import structure

    path = _saved_long_ago(tmp_path, monkeypatch)
    checked: list[Path] = []
    real = structure.check_structure
    monkeypatch.setattr("mettaformat.container.reader.check_structure",
                        lambda ckpt: checked.append(ckpt.path) or real(ckpt))
    mettaformat.load_file(path)
    mettaformat.load_file(path, mmap=False)
    assert len(checked) == 1
    with mettaformat.open(path) as f:  # asked for explicitly, it is always checked
        f.verify_structure()
    assert len(checked) == 2
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF  # the trailer index, which only the structure check reads
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        mettaformat.load_file(path)
    assert len(checked) == 3


def test_a_file_changed_just_before_its_verification_is_not_remembered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "m.mfmt"
    mettaformat.save_file(_state(), path)  # just written: a change now might not show in its timestamps
    mettaformat.load_file(path)
    identity = verify.file_identity(os.stat(path))
    assert not verify.is_verified(identity, ("model", "w"))
    monkeypatch.setattr(verify, "RACY_WINDOW_NS", 0)
    mettaformat.load_file(path)
    assert verify.is_verified(identity, ("model", "w"))
    assert not verify.is_verified(identity, ("other", "w"))


def test_a_remembered_file_changed_in_place_while_open_is_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _saved_long_ago(tmp_path, monkeypatch)
    mettaformat.load_file(path)  # remembered as verified
    with mettaformat.open(path) as f:
        span = craft.parse(path.read_bytes()).tensor_span("b")
        offset = craft.parse(path.read_bytes()).section()["offset"] + span[0]
        with open(path, "r+b") as g:  # same size, new bytes: the timestamps change
            g.seek(offset)
            g.write(b"\xff" * 8)
        with pytest.raises(IntegrityError, match="'b'"):
            f.get_tensor("b")
