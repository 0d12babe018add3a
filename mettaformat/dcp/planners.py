"""Planners that move non-tensor state as values, never as pickles.

torch's default planners turn every non-tensor item (step counters, RNG tuples, configs) into
bytes with ``torch.save`` and back with ``torch.load(weights_only=False)``: loading runs
whatever the bytes say. Here the storage layer asks the planner for the *object* and stores it
as an object tree, and on load hands the decoded value straight to the state dict. The two
planners below also refuse the pickle paths outright, so they stay safe even when paired with
another storage layer.
"""

from __future__ import annotations

import io
import itertools
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem, SavePlanner, WriteItem, WriteItemType

from mettaformat.errors import FormatError, WriteError

__all__ = ["MettaLoadPlanner", "MettaSavePlanner", "assign_object", "lookup_object"]


class MettaSavePlanner(DefaultSavePlanner):
    """:class:`~torch.distributed.checkpoint.DefaultSavePlanner` that never pickles.

    :class:`~mettaformat.dcp.MettaStorageWriter` reads non-tensor items through
    ``lookup_object``; any other storage layer asking for their bytes gets an error instead of a
    pickle.
    """

    def transform_object(self, write_item: WriteItem, object: Any) -> Any:  # noqa: A002 (torch's name)
        if write_item.type == WriteItemType.BYTE_IO:
            raise WriteError(
                f"non-tensor item {write_item.index.fqn!r} would be pickled; save with MettaStorageWriter"
            )
        return object


class MettaLoadPlanner(DefaultLoadPlanner):
    """:class:`~torch.distributed.checkpoint.DefaultLoadPlanner` that never unpickles.

    :class:`~mettaformat.dcp.MettaStorageReader` hands it decoded values (``load_object``);
    bytes from any other storage layer are refused instead of passed to ``torch.load``.
    """

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise FormatError(
            f"non-tensor item {read_item.dest_index.fqn!r} arrived as bytes (a pickle); "
            "it is not unpickled. Load with MettaStorageReader, or convert the checkpoint first",
            region="load planner",
        )

    def load_object(self, read_item: ReadItem, value: Any) -> None:
        """Put a decoded non-tensor value where the state dict being loaded expects it."""
        _assign(self, read_item, value)


def lookup_object(planner: SavePlanner, item: WriteItem) -> Any:
    """The Python object behind a non-tensor write item, without turning it into bytes."""
    if not isinstance(planner, DefaultSavePlanner):
        raise WriteError(
            f"planner {type(planner).__name__} is not a DefaultSavePlanner; non-tensor item "
            f"{item.index.fqn!r} can only be read from one without pickling it"
        )
    return planner.lookup_object(item.index)


def assign_object(planner: LoadPlanner, read_item: ReadItem, value: Any) -> None:
    """Deliver a decoded non-tensor value to ``planner``'s state dict, bypassing ``load_bytes``."""
    if isinstance(planner, MettaLoadPlanner):
        planner.load_object(read_item, value)
    elif isinstance(planner, DefaultLoadPlanner):
        _assign(planner, read_item, value)
    else:
        raise FormatError(
            f"planner {type(planner).__name__} is not a DefaultLoadPlanner; non-tensor item "
            f"{read_item.dest_index.fqn!r} is only delivered as a value, never as bytes to unpickle",
            region="load planner",
        )


def _assign(planner: DefaultLoadPlanner, read_item: ReadItem, value: Any) -> None:
    """What ``DefaultLoadPlanner.load_bytes`` does after its ``torch.load``."""
    fqn = read_item.dest_index.fqn
    if not planner.flatten_state_dict:
        planner.state_dict[fqn] = value
        return
    path = planner.mappings.get(fqn)
    if path is None:
        raise FormatError(f"checkpoint item {fqn!r} has no place in the state dict being loaded",
                          region="load planner")
    _set_path(planner.original_state_dict, path, value)


def _set_path(root: Any, path: tuple[Any, ...], value: Any) -> None:
    container = root
    for key, next_key in itertools.pairwise(path):
        if isinstance(container, dict):
            container = container.setdefault(key, [] if isinstance(next_key, int) else {})
        elif isinstance(container, list) and isinstance(key, int) and 0 <= key <= len(container):
            if key == len(container):
                container.append([] if isinstance(next_key, int) else {})
            container = container[key]
        else:
            raise FormatError(f"cannot follow key {key!r} of path {path!r:.120}", region="load planner")
    last = path[-1]
    if isinstance(container, list) and isinstance(last, int) and 0 <= last <= len(container):
        if last == len(container):
            container.append(value)
        else:
            container[last] = value
    elif isinstance(container, dict):
        container[last] = value
    else:
        raise FormatError(f"cannot set key {last!r} of path {path!r:.120}", region="load planner")


def check_tensor_target(target: torch.Tensor, shape: tuple[int, ...], fqn: str) -> None:
    if tuple(target.shape) != shape:
        raise FormatError(f"{fqn!r}: the state dict wants a {tuple(target.shape)} slice, the plan read {shape}",
                          region="load planner")
