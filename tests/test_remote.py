"""Remote checkpoints against real servers on loopback: a counting Range HTTP server and moto's S3."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import mettaformat as mf
from mettaformat.errors import (
    IntegrityError,
    RemoteAccessError,
    RemoteChangedError,
    RemoteError,
    RemoteNotFoundError,
    RemoteTransferError,
)
from mettaformat.remote import RangeCache, cache, transport
from mettaformat.remote import store as remote_store
from mettaformat.remote.source import FIRST_READ, RemoteSource

pytest.importorskip("aiohttp")
pytest.importorskip("s3fs")
pytest.importorskip("moto")

from tests.remote_servers import RangeServer, moto_s3

TENSORS = {f"layer{i}.weight": torch.randn(64, 1024, generator=torch.Generator().manual_seed(i)) for i in range(6)}
TENSOR_BYTES = 64 * 1024 * 4


@pytest.fixture(scope="module")
def http() -> Iterator[RangeServer]:
    server = RangeServer().start()
    server.objects["raw.mfmt"] = mf.save(TENSORS, metadata={"epoch": 7, "score": 0.5})
    server.objects["zstd.mfmt"] = mf.save(TENSORS, metadata={"epoch": 8}, compression="zstd")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "BACKOFF_S", [0.001])


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    with moto_s3() as bucket:
        yield bucket


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- lazy reads ---------------------------------------------------------------------------------------
def test_open_reads_only_the_header(http: RangeServer) -> None:
    http.reset_counts()
    with mf.open(http.url("raw.mfmt")) as ckpt:
        assert ckpt.metadata == {"epoch": 7, "score": 0.5}
        assert ckpt.keys() == list(TENSORS)
        assert http.requests <= 2  # size/ETag, then one range read that covers the header
        assert http.bytes_sent <= FIRST_READ < len(http.objects["raw.mfmt"])


def test_get_tensor_fetches_its_own_range_and_verifies_it(http: RangeServer) -> None:
    with mf.open(http.url("raw.mfmt")) as ckpt:
        http.reset_counts()
        assert torch.equal(ckpt.get_tensor("layer4.weight"), TENSORS["layer4.weight"])
        assert http.requests == 1 and http.bytes_sent == TENSOR_BYTES
    data = bytearray(http.objects["raw.mfmt"])
    with mf.open(http.url("raw.mfmt")) as ckpt:  # damage the tensor after open: the checksum catches it
        entry = ckpt.header.section("model").by_name()["layer5.weight"]
        at = ckpt.header.section("model").offset + ckpt.header.section("model").stream_header_length + entry.begin
        data[at + 100] ^= 0xFF
        http.objects["raw.mfmt"], original = bytes(data), http.objects["raw.mfmt"]
        try:
            with pytest.raises((IntegrityError, RemoteChangedError)):
                ckpt.get_tensor("layer5.weight")
        finally:
            http.objects["raw.mfmt"] = original


@pytest.mark.parametrize("name", ["raw.mfmt", "zstd.mfmt"])
def test_whole_load_over_http(http: RangeServer, name: str) -> None:
    http.reset_counts()
    assert _same(mf.load_file(http.url(name)), TENSORS)
    assert http.bytes_sent <= len(http.objects[name]) + FIRST_READ


def test_zstd_tensor_decodes_only_its_frames(http: RangeServer) -> None:
    with mf.open(http.url("zstd.mfmt")) as ckpt:
        http.reset_counts()
        assert torch.equal(ckpt.get_tensor("layer2.weight"), TENSORS["layer2.weight"])
        # all the frames of this tensor (one per byte plane and chunk) in one range, nothing else
        reader = ckpt._readers["model"]
        entry = ckpt.header.section("model").by_name()["layer2.weight"]
        first, end = reader.tensor_frames["layer2.weight"]
        assert end - first > 1
        start, stop = reader.stored_range(entry)
        assert http.log == [("GET", "zstd.mfmt", f"bytes={start}-{stop - 1}")]
        assert http.bytes_sent == stop - start < TENSOR_BYTES
        assert len(ckpt._src._regions[0]) == 1  # only the first read stays held; the frames were dropped


def test_large_range_is_split_into_parallel_pieces(http: RangeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from mettaformat.remote import source

    monkeypatch.setattr(source, "PIECE", 64 << 10)
    http.reset_counts()
    assert _same(mf.load_file(http.url("raw.mfmt")), TENSORS)
    pieces = [r for m, n, r in http.log if m == "GET" and n == "raw.mfmt"]
    assert len(pieces) >= (len(http.objects["raw.mfmt"]) - FIRST_READ) // (64 << 10)  # the first read is reused


def test_legacy_pickle_and_safetensors_over_http(http: RangeServer) -> None:
    import safetensors.torch

    buf = io.BytesIO()
    torch.save(TENSORS, buf)
    http.objects["legacy.pt"] = buf.getvalue()
    http.objects["plain.safetensors"] = safetensors.torch.save(TENSORS, metadata={"note": "x"})
    assert _same(dict(mf.load_any(http.url("legacy.pt")).tensors), TENSORS)
    ckpt = mf.load_any(http.url("plain.safetensors"))
    assert _same(dict(ckpt.tensors), TENSORS) and ckpt.metadata == {"note": "x"}
    assert mf.load_any(http.url("raw.mfmt")).uri == http.url("raw.mfmt")


# -- faults -------------------------------------------------------------------------------------------
def test_missing_and_forbidden_objects(http: RangeServer) -> None:
    with pytest.raises(RemoteNotFoundError, match=r"nothing\.mfmt"):
        mf.open(http.url("nothing.mfmt"))
    http.objects["secret.mfmt"] = http.objects["raw.mfmt"]
    http.fault("secret.mfmt", "403")
    try:
        with pytest.raises(RemoteAccessError, match=r"secret\.mfmt"):
            mf.load_file(http.url("secret.mfmt"))
    finally:
        http.faults.clear()


@pytest.mark.parametrize("kind", ["drop", "truncate", "500"])
def test_transient_fault_is_retried(http: RangeServer, kind: str) -> None:
    http.fault("raw.mfmt", kind, times=1)
    try:
        http.reset_counts()
        assert _same(mf.load_file(http.url("raw.mfmt")), TENSORS)
        assert http.faults["raw.mfmt"].times == 0  # the fault happened, and a retry succeeded
    finally:
        http.faults.clear()


@pytest.mark.parametrize("kind", ["drop", "truncate"])
def test_persistent_fault_is_an_error_naming_the_uri(http: RangeServer, kind: str) -> None:
    with mf.open(http.url("raw.mfmt")) as ckpt:
        http.fault("raw.mfmt", kind)
        try:
            with pytest.raises(RemoteTransferError, match=r"raw\.mfmt.*attempts"):
                ckpt.get_tensor("layer1.weight")
            with pytest.raises(RemoteTransferError, match=r"raw\.mfmt"):
                ckpt.load_section()
        finally:
            http.faults.clear()


def test_object_replaced_during_a_read_is_an_error(http: RangeServer) -> None:
    other = {k: v + 1 for k, v in TENSORS.items()}
    http.objects["moving.mfmt"] = http.objects["raw.mfmt"]
    with mf.open(http.url("moving.mfmt")) as ckpt:
        http.fault("moving.mfmt", "replace", times=1, replacement=mf.save(other, metadata={"epoch": 9}))
        with pytest.raises(RemoteChangedError, match=r"moving\.mfmt.*changed"):
            ckpt.load_section()
        with pytest.raises(RemoteChangedError):
            ckpt.get_tensor("layer0.weight")
    assert _same(mf.load_file(http.url("moving.mfmt")), other)  # a fresh open reads the new version


def test_http_is_not_writable(http: RangeServer) -> None:
    with pytest.raises(RemoteError, match=r"new\.mfmt"):
        mf.save_file(TENSORS, http.url("new.mfmt"))
    assert "new.mfmt" not in http.objects


# -- cache --------------------------------------------------------------------------------------------
def test_cache_serves_repeated_reads(http: RangeServer, tmp_path: Path) -> None:
    store = RangeCache(tmp_path / "cache", max_bytes=1 << 30)
    for _ in range(2):
        http.reset_counts()
        source = RemoteSource(http.url("raw.mfmt"), cache=store)
        with mf.open(source) as ckpt:
            assert torch.equal(ckpt.get_tensor("layer3.weight"), TENSORS["layer3.weight"])
    assert http.requests == 1 and http.bytes_sent == 0  # only the ETag check went to the server
    assert store.hits == 2
    small = RangeCache(tmp_path / "small", max_bytes=300_000)
    for name in TENSORS:
        with mf.open(RemoteSource(http.url("raw.mfmt"), cache=small)) as ckpt:
            ckpt.get_tensor(name)
    assert small.size() <= 300_000


def test_cache_from_environment(http: RangeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MF_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setattr(cache, "_configured", None)
    mf.load_file(http.url("zstd.mfmt"))
    http.reset_counts()
    assert _same(mf.load_file(http.url("zstd.mfmt")), TENSORS)
    assert http.bytes_sent == 0


# -- S3 -----------------------------------------------------------------------------------------------
def test_s3_save_open_load(s3: str) -> None:
    uri = f"{s3}/basic/model.mfmt"
    mf.save_file(TENSORS, uri, metadata={"epoch": 1}, compression="zstd")
    with mf.open(uri) as ckpt:
        assert ckpt.metadata == {"epoch": 1}
        assert torch.equal(ckpt.get_tensor("layer0.weight"), TENSORS["layer0.weight"])
    assert _same(mf.load_file(uri), TENSORS)
    with pytest.raises(RemoteNotFoundError, match=r"absent\.mfmt"):
        mf.load_file(f"{s3}/basic/absent.mfmt")


def test_failed_save_leaves_nothing_visible(s3: str) -> None:
    import s3fs

    with pytest.raises(mf.MettaFormatError):
        mf.save_file({"bad": torch.zeros(2).to_sparse()}, f"{s3}/failed/model.mfmt")
    assert not s3fs.S3FileSystem().exists(f"{s3}/failed/model.mfmt")


def test_s3_object_replaced_after_open(s3: str) -> None:
    uri = f"{s3}/replace/model.mfmt"
    mf.save_file(TENSORS, uri)
    with mf.open(uri) as ckpt:
        mf.save_file({k: v * 2 for k, v in TENSORS.items()}, uri)
        with pytest.raises(RemoteChangedError, match=r"replace/model\.mfmt"):
            ckpt.get_tensor("layer0.weight")


def test_store_over_s3_selects_from_headers(s3: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    small = {"w": torch.zeros(256)}
    scores = [math.sin(i) for i in range(120)]
    fs.pipe(
        {
            f"{s3}/run/model_{i:04d}.mfmt": mf.save(small, metadata={"epoch": i, "agent_step": i, "score": s})
            for i, s in enumerate(scores)
        }
    )
    store = mf.PolicyStore(f"{s3}/run/")
    before = transport.STATS.snapshot()
    selection = store.select(n=5, metric="score")
    after = transport.STATS.snapshot()
    best = sorted(range(120), key=lambda i: -scores[i])[:5]
    assert [r.epoch for r in selection.records] == best
    assert selection.records[0].uri == f"{s3}/run/model_{best[0]:04d}.mfmt"
    assert after[1] - before[1] <= 120 * 16 * 1024  # one small header read per object, no weights
    remote_store._memo.clear()  # as in a fresh process: the index written by the first scan serves it
    before = transport.STATS.snapshot()
    assert [r.epoch for r in store.select(n=5, metric="score").records] == best
    requests = transport.STATS.snapshot()[0] - before[0]
    assert requests == 1 + 5  # the index object, and a HEAD of each selected object; no listing
    # Listing again: the index entries still match the listed ETags, so no header is read.
    before = transport.STATS.snapshot()
    assert len(store.scan(refresh=True).records) == 120
    assert transport.STATS.snapshot()[0] - before[0] <= 3  # the index, the listing, the index written back
    # A re-saved object's index entry no longer matches its ETag: its header is read again.
    fs.pipe(f"{s3}/run/model_0119.mfmt", mf.save(small, metadata={"epoch": 119, "agent_step": 119, "score": 9.0}))
    remote_store._memo.clear()
    assert mf.PolicyStore(f"{s3}/run/", index_max_age_s=0).select(n=1, metric="score").records[0].epoch == 119
    report = store.prune(mf.store.LatestN(10))
    assert len(report.deleted) == 110
    assert len([p for p in fs.ls(f"{s3}/run/") if p.endswith(".mfmt")]) == 10
    # The prune updated the index: a reader trusting it sees the 10 that are left.
    assert sorted(r.epoch for r in store.records()) == list(range(110, 120))


def _fill(fs: object, prefix: str, scores: dict[int, float]) -> None:
    small = {"w": torch.zeros(16)}
    fs.pipe({f"{prefix}model_{i:04d}.mfmt": mf.save(small, metadata={"epoch": i, "score": s})  # type: ignore[attr-defined]
             for i, s in scores.items()})


def test_recent_index_is_used_without_listing_within_its_contract(s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    from mettaformat.remote import index as remote_index

    fs = s3fs.S3FileSystem()
    prefix = f"{s3}/contract/"
    _fill(fs, prefix, {i: float(i) for i in range(10)})
    store = mf.PolicyStore(prefix)
    assert store.select(n=1, metric="score").records[0].epoch == 9  # lists, writes the index
    # Written by another tool: not in the index, so not seen while the listing is recent...
    _fill(fs, prefix, {10: 100.0})
    assert store.select(n=1, metric="score").records[0].epoch == 9
    # ...but at once on refresh, with index_max_age_s=0, or once the listing is old enough.
    assert store.scan(refresh=True).records[-1].epoch == 10
    fs.rm(f"{prefix}model_0010.mfmt")
    _fill(fs, prefix, {11: 200.0})
    assert mf.PolicyStore(prefix, index_max_age_s=0).select(n=1, metric="score").records[0].epoch == 11
    fs.rm(f"{prefix}model_0011.mfmt")
    _fill(fs, prefix, {12: 300.0})
    later = remote_index.time.time() + 2 * remote_index.DEFAULT_MAX_AGE_S
    monkeypatch.setattr(remote_index.time, "time", lambda: later)
    assert store.select(n=1, metric="score").records[0].epoch == 12


def test_selected_object_deleted_or_replaced_outside_the_store_is_noticed(s3: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # another tool: the store's cached listing does not see it
    prefix = f"{s3}/stale/"
    _fill(fs, prefix, {i: float(i) for i in range(10)})
    store = mf.PolicyStore(prefix)
    assert [r.epoch for r in store.select(n=2, metric="score").records] == [9, 8]
    fs.rm(f"{prefix}model_0009.mfmt")  # deleted by another tool: the selection is redone from a listing
    assert [r.epoch for r in store.select(n=2, metric="score").records] == [8, 7]
    _fill(fs, prefix, {8: -1.0})  # replaced by another tool with a worse score
    assert [r.epoch for r in store.select(n=2, metric="score").records] == [7, 6]


def test_store_saves_keep_the_index_current(s3: str) -> None:
    mf.register_model_type("index_linear", lambda attrs, meta, cfg: torch.nn.Linear(2, 2), replace=True)
    prefix = f"{s3}/saves/"
    writer, reader = mf.PolicyStore(prefix), mf.PolicyStore(prefix)
    writer.save(agent=torch.nn.Linear(2, 2), model_type="index_linear", metadata={"epoch": 1, "score": 1.0})
    assert [r.epoch for r in reader.records()] == [1]  # lists and writes the index
    for epoch in (2, 3):
        writer.save(agent=torch.nn.Linear(2, 2), model_type="index_linear", metadata={"epoch": epoch, "score": 0.5})
    remote_store._memo.clear()
    before = transport.STATS.snapshot()
    assert [r.epoch for r in reader.records()] == [3, 2, 1]  # from the index alone
    assert transport.STATS.snapshot()[0] - before[0] == 1


def test_index_writes_are_compare_and_swap(s3: str) -> None:
    import s3fs

    from mettaformat.remote.index import index_uri, read_remote_index, update_remote_index
    from mettaformat.remote.transport import put_if_unchanged
    from mettaformat.remote.uri import filesystem

    prefix = f"{s3}/cas/"
    _fill(s3fs.S3FileSystem(), prefix, {1: 1.0, 2: 2.0})
    mf.PolicyStore(prefix).records()  # writes the index
    fs, path = filesystem(index_uri(prefix))
    first = read_remote_index(prefix)
    first.listed_at = 1.0  # other content, so another ETag
    assert put_if_unchanged(fs, path, index_uri(prefix), first.encode(), first.etag)
    assert not put_if_unchanged(fs, path, index_uri(prefix), b"lost", first.etag)  # its ETag moved on
    assert not put_if_unchanged(fs, path, index_uri(prefix), b"lost", None)  # exists already
    assert read_remote_index(prefix).listed_at == 1.0
    update_remote_index(prefix, remove=["model_0001.mfmt"])  # re-reads the current version
    assert sorted(read_remote_index(prefix).entries) == ["model_0002.mfmt"]


def test_store_save_and_load_over_s3(s3: str) -> None:
    mf.register_model_type("remote_linear", lambda attrs, meta, cfg: torch.nn.Linear(4, 2), replace=True)
    store = mf.PolicyStore(f"{s3}/agents/")
    record = store.save(agent=torch.nn.Linear(4, 2), model_type="remote_linear", metadata={"epoch": 3, "score": 1.5})
    assert record.uri == f"{s3}/agents/model_0003.mfmt" and record.metadata["score"] == 1.5
    with pytest.raises(mf.errors.StoreError, match="already exists"):
        store.save(agent=torch.nn.Linear(4, 2), model_type="remote_linear", metadata={"epoch": 3})
    agent = store.policy()
    assert isinstance(agent, mf.MettaAgent) and agent.metadata["epoch"] == 3
    direct = mf.MettaAgent.load(record.uri)
    assert torch.equal(direct.model.weight, agent.model.weight)


def test_cli_ls_accepts_a_uri(s3: str, capsys: pytest.CaptureFixture[str]) -> None:
    from mettaformat.cli.main import main

    mf.save_file(TENSORS, f"{s3}/cli/model_0001.mfmt", metadata={"epoch": 1, "score": 2.0})
    assert main(["ls", f"{s3}/cli/"]) == 0
    assert "model_0001.mfmt" in capsys.readouterr().out


def test_cli_reads_and_prunes_uris(http: RangeServer, s3: str, capsys: pytest.CaptureFixture[str]) -> None:
    from mettaformat.cli.main import main

    assert main(["inspect", http.url("raw.mfmt")]) == 0
    assert "layer5.weight" in capsys.readouterr().out
    assert main(["validate", "--deep", http.url("zstd.mfmt")]) == 0
    assert main(["inspect", http.url("gone.mfmt")]) != 0
    assert "gone.mfmt" in capsys.readouterr().err
    for epoch in (1, 2, 3):
        mf.save_file(TENSORS, f"{s3}/prune/model_{epoch:04d}.mfmt", metadata={"epoch": epoch})
    assert main(["prune", f"{s3}/prune/", "--keep-last", "1"]) == 0
    assert [r.name for r in mf.PolicyStore().records(f"{s3}/prune/")] == ["model_0003.mfmt"]


def test_convert_to_and_from_a_uri(http: RangeServer, s3: str, tmp_path: Path) -> None:
    from mettaformat.convert import convert

    report = convert(http.url("zstd.mfmt"), f"{s3}/converted/model.mfmt")
    assert report.bytes_in == len(http.objects["zstd.mfmt"]) and report.bytes_out > 0
    assert _same(mf.load_file(f"{s3}/converted/model.mfmt"), TENSORS)
    convert(f"{s3}/converted/model.mfmt", tmp_path / "local.safetensors")
    assert _same(dict(mf.load_any(tmp_path / "local.safetensors").tensors), TENSORS)
    with pytest.raises(mf.MettaFormatError, match="only mfmt"):
        convert(http.url("raw.mfmt"), f"{s3}/converted/model.safetensors")


# -- differential: the same rules for local and remote bytes ------------------------------------------
VECTORS = sorted((Path(__file__).resolve().parents[1] / "spec" / "vectors").glob("*.mfmt"))


def _outcome(path: str) -> tuple[str, object]:
    """What a full read gives: the tensors and metadata, or the error class."""
    try:
        with mf.open(path) as ckpt:
            tensors = ckpt.load_section("model", copy=True)
            return "ok", ({k: v.clone() for k, v in tensors.items()}, ckpt.metadata)
    except mf.MettaFormatError as e:
        return "error", type(e).__name__
    except Exception as e:  # a crash must be caught by the comparison too, not end the test
        return "crash", type(e).__name__


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.name)
def test_remote_read_matches_local_read(http: RangeServer, path: Path) -> None:
    for vector in VECTORS:  # every vector, so that a delta finds its base beside it as it does locally
        http.objects[f"vectors/{vector.name}"] = vector
    local, remote = _outcome(str(path)), _outcome(http.url(f"vectors/{path.name}"))
    assert local[0] == remote[0] != "crash", (local, remote)
    if local[0] == "ok":
        (lt, lm), (rt, rm) = local[1], remote[1]  # type: ignore[misc]
        assert repr(lm) == repr(rm) and _same(lt, rt)  # repr: NaN in metadata is not equal to itself
    else:
        assert local[1] == remote[1]


def test_cache_shared_by_concurrent_writers(tmp_path: Path) -> None:
    """Writers racing on one directory (as several processes do): entries are whole or absent."""
    from concurrent.futures import ThreadPoolExecutor

    directory = tmp_path / "shared"
    caches = [RangeCache(directory, max_bytes=64 << 10) for _ in range(4)]  # separate instances, one directory

    def work(i: int) -> None:
        c = caches[i % 4]
        for j in range(50):
            data = bytes([j % 251]) * (1000 + j)
            c.put("s3://b/k", f"e{j % 7}", j, j + len(data), data)
            got = c.get("s3://b/k", f"e{(j + i) % 7}", j, j + len(data))
            assert got is None or got == data

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(16)))
    caches[0].evict()
    assert caches[0].size() <= 64 << 10
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# -- migrating and converting to a URI ----------------------------------------------------------------
def _legacy(path: Path, epoch: int) -> Path:
    torch.save({"model_state_dict": {"w": torch.full((3,), float(epoch))}, "metadata": {"epoch": epoch},
                "checkpoint_format_version": 2}, path)
    return path


def test_migrate_to_a_prefix(s3: str, tmp_path: Path) -> None:
    from mettaformat.migrate import migrate

    (tmp_path / "sub").mkdir()
    _legacy(tmp_path / "model_0001.pt", 1)
    _legacy(tmp_path / "sub" / "model_0002.pt", 2)
    summary = migrate(tmp_path, f"{s3}/migrated/", recursive=True)
    assert summary.migrated == 2 and summary.ok
    assert [r.dst for r in summary.results] == [f"{s3}/migrated/model_0001.mfmt", f"{s3}/migrated/sub/model_0002.mfmt"]
    ckpt = mf.load_any(f"{s3}/migrated/sub/model_0002.mfmt")
    assert torch.equal(ckpt.tensors["w"], torch.full((3,), 2.0)) and ckpt.metadata["epoch"] == 2
    assert ckpt.provenance["migrated_from"]["path"] == str(tmp_path / "sub" / "model_0002.pt")
    again = migrate(tmp_path, f"{s3}/migrated/", recursive=True)  # the uploads are newer than the inputs
    assert [r.status for r in again.results] == ["skipped", "skipped"]
    one = migrate(tmp_path / "model_0001.pt", f"{s3}/renamed/first.mfmt")
    assert one.results[0].dst == f"{s3}/renamed/first.mfmt" and one.ok


def test_failed_migrate_or_convert_upload_leaves_nothing_visible(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import s3fs

    from mettaformat.convert import convert
    from mettaformat.migrate import migrate

    src = _legacy(tmp_path / "model_0003.pt", 3)
    fs = s3fs.S3FileSystem()

    def broken_upload(lpath: str, rpath: str, **kwargs: object) -> None:
        raise ConnectionResetError("connection reset by peer")

    from mettaformat.remote.uri import filesystem

    monkeypatch.setattr(filesystem(f"{s3}/broken/x.mfmt")[0], "put_file", broken_upload)  # the shared instance
    result = migrate(src, f"{s3}/broken/").results[0]
    assert result.status == "failed" and "broken/model_0003.mfmt" in result.reason
    with pytest.raises(RemoteError, match=r"broken/converted\.mfmt"):
        convert(src, f"{s3}/broken/converted.mfmt")
    monkeypatch.undo()
    fs.invalidate_cache()
    assert not fs.exists(f"{s3}/broken/") or fs.ls(f"{s3}/broken/") == []  # no object, no temp key


def test_cli_migrates_to_a_uri(s3: str, tmp_path: Path) -> None:
    from mettaformat.cli.main import main

    _legacy(tmp_path / "model_0004.pt", 4)
    assert main(["migrate", str(tmp_path), f"{s3}/cli-migrated/"]) == 0
    assert mf.load_any(f"{s3}/cli-migrated/model_0004.mfmt").metadata["epoch"] == 4
