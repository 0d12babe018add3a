"""The same object-storage behaviour on every backend run on loopback: S3 (moto) and GCS (an emulator).

Both go through fsspec, so these tests name no backend: what differs (conditional writes, which
only S3 has here) is asserted as the documented difference.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

import mettaformat as mf
from mettaformat.errors import RemoteChangedError, RemoteNotFoundError
from mettaformat.remote import transport
from mettaformat.remote.uri import filesystem

pytest.importorskip("aiohttp")

TENSORS = {f"layer{i}.weight": torch.randn(128, 256, generator=torch.Generator().manual_seed(i)) for i in range(4)}


def _moto() -> AbstractContextManager[str]:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from tests.remote_servers import moto_s3

    return moto_s3("stores")


def _gcs() -> AbstractContextManager[str]:
    for module in ("gcsfs", "gcp_storage_emulator"):  # not imported here: the fixture sets gcsfs up first
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (the dev extra installs it)")
    from tests.remote_servers import gcs_emulator

    return gcs_emulator("stores")


BACKENDS: dict[str, Callable[[], AbstractContextManager[str]]] = {"s3": _moto, "gs": _gcs}


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def bucket(request: pytest.FixtureRequest) -> Iterator[str]:
    with BACKENDS[request.param]() as uri:
        yield uri


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "BACKOFF_S", [0.001])


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("compression", ["raw", "zstd"])
def test_save_open_and_load(bucket: str, compression: str) -> None:
    uri = f"{bucket}/basic/{compression}.mfmt"
    mf.save_file(TENSORS, uri, metadata={"epoch": 1}, compression=compression)  # type: ignore[arg-type]
    before = transport.STATS.snapshot()
    with mf.open(uri) as ckpt:
        assert ckpt.metadata == {"epoch": 1}
        assert torch.equal(ckpt.get_tensor("layer2.weight"), TENSORS["layer2.weight"])
    assert transport.STATS.snapshot()[0] - before[0] <= 3  # size and version, the header, the tensor
    assert _same(mf.load_file(uri), TENSORS)
    with pytest.raises(RemoteNotFoundError, match=r"basic/absent\.mfmt"):
        mf.load_file(f"{bucket}/basic/absent.mfmt")


def test_object_replaced_after_open_is_an_error(bucket: str) -> None:
    uri = f"{bucket}/replace/model.mfmt"
    mf.save_file(TENSORS, uri)
    with mf.open(uri) as ckpt:
        mf.save_file({k: v + 1 for k, v in TENSORS.items()}, uri)
        with pytest.raises((RemoteChangedError, mf.errors.IntegrityError)):
            ckpt.get_tensor("layer3.weight")  # beyond the first read


def test_store_selects_saves_and_prunes(bucket: str) -> None:
    mf.register_model_type("stores_linear", lambda attrs, meta, cfg: torch.nn.Linear(2, 2), replace=True)
    prefix = f"{bucket}/store/"
    store = mf.PolicyStore(prefix)
    for epoch, score in enumerate([0.1, 0.9, 0.5, 0.7]):
        store.save(agent=torch.nn.Linear(2, 2), model_type="stores_linear", metadata={"epoch": epoch, "score": score})
    assert [r.epoch for r in store.select(n=2, metric="score").records] == [1, 3]
    assert [r.epoch for r in mf.PolicyStore(prefix).select(n=2, metric="score").records] == [1, 3]
    assert isinstance(store.policies(n=1, metric="score")[0], mf.MettaAgent)
    report = store.prune(mf.store.LatestN(2))
    assert sorted(r.epoch for r in report.deleted) == [0, 1]
    assert [r.epoch for r in mf.PolicyStore(prefix).records()] == [3, 2]


def test_conditional_index_writes_only_where_the_backend_has_them(bucket: str) -> None:
    from mettaformat.remote.transport import conditional_writes

    fs = filesystem(f"{bucket}/x")[0]
    assert conditional_writes(fs) == bucket.startswith("s3://")  # elsewhere every scan lists


def test_migrate_to_a_prefix(bucket: str, tmp_path: Path) -> None:
    from mettaformat.migrate import migrate

    torch.save({"model_state_dict": {"w": torch.ones(3)}, "metadata": {"epoch": 5}, "checkpoint_format_version": 2},
               tmp_path / "model_0005.pt")
    assert migrate(tmp_path, f"{bucket}/migrated/").ok
    assert mf.load_any(f"{bucket}/migrated/model_0005.mfmt").metadata["epoch"] == 5
