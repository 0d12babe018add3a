"""PolicyCache: Metta's own cache tests (docs/legacy-formats.md section 8, item 2)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mettaformat.store import PolicyCache


class Record:
    def __init__(self, name: str) -> None:
        self.name = name


@pytest.mark.parametrize("size", [0, -1])
def test_cache_size_must_be_positive(size: int) -> None:
    with pytest.raises(ValueError, match="Cache size must be positive"):
        PolicyCache(size)


def test_put_get_identity_missing_and_update() -> None:
    cache: PolicyCache[str, Record] = PolicyCache(3)
    r1 = Record("r1")
    cache.put("path1", r1)
    assert cache.get("path1") is r1
    assert cache.get("nope") is None
    r1b = Record("r1b")
    cache.put("path1", r1b)
    assert cache.get("path1") is r1b and len(cache) == 1


def test_lru_eviction_of_the_oldest() -> None:
    cache: PolicyCache[str, Record] = PolicyCache(3)
    records = {f"m{i}": Record(f"m{i}") for i in range(1, 5)}
    for key, rec in records.items():
        cache.put(key, rec)
    assert cache.get("m1") is None
    assert [cache.get(k) for k in ("m2", "m3", "m4")] == [records["m2"], records["m3"], records["m4"]]


def test_get_refreshes_recency() -> None:
    cache: PolicyCache[str, Record] = PolicyCache(3)
    for i in (1, 2, 3):
        cache.put(f"m{i}", Record(f"m{i}"))
    cache.get("m1")
    cache.get("m3")
    cache.put("m4", Record("m4"))
    assert "m2" not in cache
    assert all(k in cache for k in ("m1", "m3", "m4"))
    assert cache.keys() == ["m1", "m3", "m4"]


def test_concurrent_puts() -> None:
    cache: PolicyCache[str, Record] = PolicyCache(50)
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(100):
                cache.put(f"t{t}-{i}", Record(f"t{t}-{i}"))
        except BaseException as e:  # the test wants every failure
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == [] and len(cache) == 50


def test_concurrent_mixed_operations() -> None:
    cache: PolicyCache[str, Record] = PolicyCache(20)

    def worker(t: int) -> int:
        hits = 0
        for i in range(300):
            key = f"k{(t * 7 + i) % 40}"
            if i % 3 == 0:
                cache.put(key, Record(key))
            elif i % 3 == 1:
                rec = cache.get(key)
                hits += rec is not None and rec.name == key
            else:
                cache.pop(key) if i % 9 == 2 else cache.keys()
        return hits

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(worker, range(8)))
    assert len(cache) <= 20
