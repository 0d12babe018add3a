"""PolicyStore: save, list, select, load and prune policy checkpoints.

- :class:`PolicyStore`: the store (``save``, ``policy``, ``policies``, ``select``, ``records``,
  ``prune``, ``clean_temp_files``).
- :class:`PolicyRecord`, :class:`Selection`, :class:`Exclusion`: what listing and selecting return.
- :class:`LatestN`, :class:`BestN`, :class:`EveryNEpochs`, :class:`AnyOf`: retention policies.
- :class:`PolicyCache`: the thread-safe LRU of loaded policies.
- :class:`PolicyMetadata`: Metta's metadata dict with required counters.
- :func:`register_scheme`: plug in a URI scheme (``s3://``...).

Module map: ``store`` (the class), ``catalog`` (reading records), ``index`` (the on-disk index),
``selectors``, ``retention``, ``maintenance`` (deletion), ``pruning`` (carrying out a prune),
``saving`` (what a save writes and where), ``deltas`` (delta bases), ``remote_store`` (object
storage), ``cache``, ``uri``, ``record``, ``metadata``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mettaformat._lazy import lazy_attributes
from mettaformat.store.cache import PolicyCache
from mettaformat.store.maintenance import PruneReport, SkippedFile
from mettaformat.store.metadata import PolicyMetadata
from mettaformat.store.record import PolicyRecord
from mettaformat.store.retention import AnyOf, BestN, EveryNEpochs, LatestN, RetentionPolicy
from mettaformat.store.selectors import Exclusion, Mode, Selection, SelectorName
from mettaformat.store.uri import INDEX_FILE_NAME, SchemeHandler, register_scheme, registered_schemes

if TYPE_CHECKING:
    from mettaformat.store.catalog import ScanResult
    from mettaformat.store.store import PolicyStore, PolicyStoreWarning

# The retention rules, records and selectors need no torch; the store itself loads policies and
# does, so it is imported on first use (``mettaformat prune --help`` stays instant).
_LAZY: dict[str, str] = {
    "PolicyStore": "mettaformat.store.store",
    "PolicyStoreWarning": "mettaformat.store.store",
    "ScanResult": "mettaformat.store.catalog",
}


__getattr__ = lazy_attributes(__name__, _LAZY, globals())


__all__ = [
    "INDEX_FILE_NAME",
    "AnyOf",
    "BestN",
    "EveryNEpochs",
    "Exclusion",
    "LatestN",
    "Mode",
    "PolicyCache",
    "PolicyMetadata",
    "PolicyRecord",
    "PolicyStore",
    "PolicyStoreWarning",
    "PruneReport",
    "RetentionPolicy",
    "ScanResult",
    "SchemeHandler",
    "Selection",
    "SelectorName",
    "SkippedFile",
    "register_scheme",
    "registered_schemes",
]
