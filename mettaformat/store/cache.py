"""``PolicyCache``: a thread-safe LRU of loaded policies.

Metta's ``PolicyCache`` (#1270): an ``OrderedDict`` under an ``RLock``, ``get`` moves the entry
to the most-recent end, ``put`` evicts from the other end. The store keys it by the file's path
*and* signature (mtime, size, inode), so a checkpoint replaced on disk is never served stale.
Framework-neutral: it holds any value.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

__all__ = ["DEFAULT_CACHE_SIZE", "PolicyCache"]

#: Metta's default ``policy_cache_size``.
DEFAULT_CACHE_SIZE: Final = 10

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

logger = logging.getLogger(__name__)


class PolicyCache(Generic[K, V]):
    """A bounded, thread-safe, least-recently-used cache.

    Args:
        max_size: how many entries to hold.

    Raises:
        ValueError: ``Cache size must be positive`` when ``max_size`` <= 0 (Metta's message).

    Example:
        >>> cache: PolicyCache[str, object] = PolicyCache(max_size=3)
        >>> cache.put("a", policy); cache.get("a") is policy
        True
    """

    def __init__(self, max_size: int = DEFAULT_CACHE_SIZE) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= 0:
            raise ValueError("Cache size must be positive")
        self.max_size = max_size
        self._entries: OrderedDict[K, V] = OrderedDict()
        # Re-entrant: a subclass or callback may call back into the cache while holding it.
        self._lock = threading.RLock()

    def get(self, key: K) -> V | None:
        """The value for ``key`` (now the most recently used), or None."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: K, value: V) -> None:
        """Store ``value`` as the most recently used entry, evicting the least recently used."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
            self._entries[key] = value
            while len(self._entries) > self.max_size:
                evicted, _ = self._entries.popitem(last=False)
                logger.debug("Evicted policy from cache: %s", evicted)

    def pop(self, key: K) -> V | None:
        """Remove ``key`` and return its value, or None."""
        with self._lock:
            return self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def keys(self) -> list[K]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
