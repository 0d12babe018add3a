"""The checkpoint's own fields, type-checked once, before anything uses them.

A file decides what its metadata trees hold: an ``agent_attributes`` that is a list, a version
that is a tensor, an optimizer state without ``param_groups``, an RNG state of the wrong shape.
Every reader (:func:`~mettaformat.checkpoint_io.read_checkpoint`,
:func:`~mettaformat.anyformat.load_any`) passes its :class:`Checkpoint` through
:func:`check_checkpoint`, so that code using the fields (the model builder, ``load_for_training``,
the store, ``convert``, ``check_checkpoint_compatibility``) can rely on their types, and a
malformed file ends in a :class:`~mettaformat.errors.HeaderError` naming the field.

User metadata stays free-form (any object tree with string keys at the top).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import torch

from mettaformat.checkpoint import Checkpoint, TrainingState
from mettaformat.errors import HeaderError

__all__ = ["check_checkpoint", "check_training"]

_CONTAINER_VERSION: Final = re.compile(r"^\d{1,9}\.\d{1,9}$")


def _fail(field: str, expected: str, value: object) -> HeaderError:
    return HeaderError(f"expected {expected}, found {type(value).__name__}", path=field, region="checkpoint fields")


def _optional_str(field: str, value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise _fail(field, "a string", value)


def _str_keyed(field: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(field, "a map", value)
    for key in value:
        if not isinstance(key, str):
            raise _fail(f"{field} key {key!r}", "a string key", key)
    return value


def _version(field: str, value: object) -> None:
    # A version is a label or a number; a tensor or a container here would make comparisons raise.
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
        raise _fail(field, "a string or an integer", value)


def check_checkpoint(ckpt: Checkpoint) -> Checkpoint:
    """Check every field a reader filled in; return ``ckpt``.

    Raises:
        HeaderError: a field of the wrong type (its ``path`` names the field).
    """
    for name in ("model_type", "name", "uri"):
        _optional_str(name, getattr(ckpt, name))
    _str_keyed("metadata", ckpt.metadata)
    _str_keyed("agent_attributes", ckpt.agent_attributes)
    _str_keyed("provenance", ckpt.provenance)
    for key, value in _str_keyed("versions", ckpt.versions).items():
        _version(f"versions.{key}", value)
    if isinstance(ckpt.versions.get("checkpoint_format"), str):
        raise _fail("versions.checkpoint_format", "an integer", ckpt.versions["checkpoint_format"])
    container = ckpt.provenance.get("container_version")
    if container is not None and not (isinstance(container, str) and _CONTAINER_VERSION.match(container)):
        raise _fail("provenance.container_version", "'MAJOR.MINOR'", container)
    config = ckpt.provenance.get("config")
    if config is not None:
        _str_keyed("provenance.config", config)
    if ckpt.training is not None:
        check_training(ckpt.training)
    return ckpt


def check_training(training: TrainingState) -> TrainingState:
    """Check the optimizer, scheduler, counters and RNG trees of a training checkpoint.

    Raises:
        HeaderError: a tree of the wrong shape (its ``path`` names it).
    """
    if training.optimizer is not None:
        opt = _str_keyed("optimizer", training.optimizer)
        _check_map("optimizer.state", opt.get("state"))
        groups = opt.get("param_groups")
        if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
            raise _fail("optimizer.param_groups", "a list of maps", groups)
    if training.scheduler is not None:
        _str_keyed("scheduler", training.scheduler)
    _str_keyed("trainer_state", training.trainer_state)
    rng = _str_keyed("rng", training.rng)
    for key, check in _RNG_CHECKS.items():
        if key in rng:
            check(f"rng.{key}", rng[key])
    return training


def _check_map(field: str, value: object) -> None:
    if not isinstance(value, dict):  # optimizer state is keyed by parameter index (integers)
        raise _fail(field, "a map", value)


def _byte_tensor(field: str, value: object) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype != torch.uint8:
        raise _fail(field, "a 1-d uint8 tensor", value)


def _python_rng(field: str, value: object) -> None:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 3
        and type(value[0]) is int
        and isinstance(value[1], (list, tuple))
        and all(type(v) is int for v in value[1])
        and (value[2] is None or isinstance(value[2], float))
    )
    if not ok:
        raise _fail(field, "[version, [int...], gauss]", value)


def _cuda_rng(field: str, value: object) -> None:
    if not isinstance(value, list):
        raise _fail(field, "a list of uint8 tensors", value)
    for i, state in enumerate(value):
        _byte_tensor(f"{field}[{i}]", state)


def _numpy_rng(field: str, value: object) -> None:
    state = _str_keyed(field, value)
    ok = (
        isinstance(state.get("kind"), str)
        and isinstance(state.get("keys"), list)
        and all(type(k) is int for k in state["keys"])
        and all(type(state.get(k)) is int for k in ("pos", "has_gauss"))
        and isinstance(state.get("cached_gaussian"), float)
    )
    if not ok:
        raise _fail(field, "{kind, keys, pos, has_gauss, cached_gaussian}", value)


_RNG_CHECKS: Final[dict[str, Callable[[str, Any], None]]] = {
    "torch": _byte_tensor,
    "python": _python_rng,
    "cuda": _cuda_rng,
    "numpy": _numpy_rng,
}
