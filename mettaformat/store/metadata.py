"""``PolicyMetadata``: Metta's dict of policy metadata with four required counters.

Kept compatible with Metta's class (agent/src/metta/agent/policy_metadata.py, July 2025): a plain
``dict`` subclass, so it serialises like any dict, with attribute access and with the required
counters protected from deletion. The store writes it as a plain dict; nothing depends on the
subclass surviving a round trip.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

__all__ = ["REQUIRED_FIELDS", "PolicyMetadata"]

#: The counters every PolicyMetadata holds (Metta #1243).
REQUIRED_FIELDS: Final[frozenset[str]] = frozenset({"agent_step", "epoch", "generation", "train_time"})


class PolicyMetadata(dict[str, Any]):
    """Policy metadata: ``agent_step``, ``epoch``, ``generation``, ``train_time`` plus any keys.

    Args:
        agent_step: environment steps taken by the trainer so far.
        epoch: training epochs so far.
        generation: how many policies this one descends from.
        train_time: seconds of training so far.
        **kwargs: any other metadata (``score``, ``eval_scores``, ``action_names``...).

    Example:
        >>> md = PolicyMetadata(epoch=5, score=0.5)
        >>> md.epoch, md["score"]
        (5, 0.5)
    """

    _REQUIRED_FIELDS: ClassVar[frozenset[str]] = REQUIRED_FIELDS

    # Declared for type checkers; the values live in the dict.
    agent_step: int
    epoch: int
    generation: int
    train_time: float

    def __init__(
        self, agent_step: int = 0, epoch: int = 0, generation: int = 0, train_time: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(agent_step=agent_step, epoch=epoch, generation=generation, train_time=train_time, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyMetadata:
        """Build from a mapping that must hold every required field.

        Raises:
            ValueError: ``Missing required fields: ...`` (Metta's message), naming them sorted.
        """
        missing = sorted(REQUIRED_FIELDS - set(data))
        if missing:
            raise ValueError(f"Missing required fields: {', '.join(missing)}")
        return cls(**dict(data))

    # -- attribute access, mapped to keys ---------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}") from e

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError as e:
            if name in REQUIRED_FIELDS:
                raise AttributeError(f"Cannot delete required field: {name}") from e
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}") from e

    # -- required fields cannot be removed ----------------------------------------------------
    def __delitem__(self, key: str) -> None:
        if key in REQUIRED_FIELDS:
            raise KeyError(f"Cannot delete required field: {key}")
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:
        if key in REQUIRED_FIELDS:
            raise KeyError(f"Cannot pop required field: {key}")
        return super().pop(key, *default)

    def popitem(self) -> tuple[str, Any]:
        # dict.popitem takes the last key; refuse rather than silently drop a required one.
        for key in reversed(self):
            if key not in REQUIRED_FIELDS:
                return key, super().pop(key)
        raise KeyError("only required fields are left")

    def clear(self) -> None:
        for key in [k for k in self if k not in REQUIRED_FIELDS]:
            super().__delitem__(key)

    def __repr__(self) -> str:
        required = [f"{k}={self[k]!r}" for k in sorted(REQUIRED_FIELDS) if k in self]
        others = [f"{k}={v!r}" for k, v in self.items() if k not in REQUIRED_FIELDS]
        return f"PolicyMetadata({', '.join(required + others)})"
