"""One shared thread pool for I/O and codec work.

Starting threads for every save or load cost about a millisecond, which dominated small
checkpoints. Threads are not inherited by a forked child, so the pool is dropped there and
rebuilt on first use. Work on a few MB runs in the calling thread instead (:func:`pool_for`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Final, TypeVar

__all__ = ["PARALLEL_MIN_BYTES", "pool_for", "shared_pool", "usable_cores"]

_T = TypeVar("_T")

#: Work on fewer bytes than this runs in the calling thread: handing it to the pool costs a thread's
#: wake-up, which on a virtual machine whose other core sleeps took 10-50 ms in about one call of ten
#: (500 interleaved verified loads of a 2.3 MB zstd policy each way, pool against calling thread:
#: median 3.3 / 3.2 ms, 90th percentile 9.1 / 4.7 ms, mean 5.1 / 3.8 ms), more than decoding a few MB
#: takes on one core.
PARALLEL_MIN_BYTES: Final = 4 << 20

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset),
    rather than every core of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 2


def shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="mettaformat")
        return _pool


class _InCaller(Executor):
    """Runs each job at once in the submitting thread (the pool's interface, none of its wake-ups)."""

    def submit(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> Future[_T]:
        future: Future[_T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # delivered by result(), as the pool delivers it
            future.set_exception(e)
        return future


_IN_CALLER: Final = _InCaller()


def pool_for(nbytes: int) -> Executor:
    """Where work on ``nbytes`` runs: the shared pool, or the calling thread below ``PARALLEL_MIN_BYTES``."""
    return shared_pool() if nbytes >= PARALLEL_MIN_BYTES else _IN_CALLER


def _forget_after_fork() -> None:
    global _pool, _lock
    _pool = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)
