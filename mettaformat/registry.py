"""Model builders: how ``MettaAgent.load`` turns a checkpoint back into a live ``nn.Module``.

A checkpoint records its ``model_type``; a builder registered under that name receives the
agent attributes, the metadata and the model config, and returns an ``nn.Module`` whose
``state_dict`` keys match the checkpoint's. Builders are code the user registers: nothing
named inside a file is ever imported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["ModelBuilder", "get_model_builder", "register_model_type", "registered_model_types"]

#: builder(agent_attributes, metadata, config) -> nn.Module
ModelBuilder = Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], nn.Module]

_builders: dict[str, ModelBuilder] = {}
_lock = threading.Lock()


def register_model_type(name: str, builder: ModelBuilder, *, replace: bool = False) -> None:
    """Register ``builder`` for checkpoints whose ``model_type`` is ``name``.

    Args:
        name: the model type (``"brain"``, ``"pytorch"`` or your own).
        builder: called as ``builder(agent_attributes, metadata, config)``; returns an ``nn.Module``.
        replace: allow replacing an existing registration.

    Raises:
        ValueError: ``name`` is already registered and ``replace`` is False.

    Example:
        >>> mettaformat.register_model_type("mlp", lambda attrs, meta, cfg: MLP(**cfg))
    """
    if not isinstance(name, str) or not name:
        raise ValueError("model type must be a non-empty string")
    with _lock:
        if name in _builders and not replace and _builders[name] is not builder:
            raise ValueError(f"model type {name!r} is already registered (pass replace=True to override)")
        _builders[name] = builder


def get_model_builder(name: str | None) -> ModelBuilder | None:
    with _lock:
        return _builders.get(name) if name is not None else None


def registered_model_types() -> list[str]:
    with _lock:
        return sorted(_builders)
