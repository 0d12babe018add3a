"""Distributed checkpoints through ``torch.distributed.checkpoint`` (DCP), with no pickle.

``MettaStorageWriter``/``MettaStorageReader`` plug into ``dcp.save``, ``dcp.load`` and
``dcp.async_save``: each rank writes one container of its shards, the coordinator commits a
msgpack index last, and a checkpoint saved on N ranks loads on M. Non-tensor state is stored
as object trees, never pickled. This module imports ``torch.distributed``; the rest of
mettaformat does not need it.
"""

from __future__ import annotations

from mettaformat.dcp.index import INDEX_NAME
from mettaformat.dcp.planners import MettaLoadPlanner, MettaSavePlanner
from mettaformat.dcp.reader import MettaStorageReader
from mettaformat.dcp.writer import MettaStorageWriter

__all__ = ["INDEX_NAME", "MettaLoadPlanner", "MettaSavePlanner", "MettaStorageReader", "MettaStorageWriter"]
