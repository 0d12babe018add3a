"""Training state: capture and restore optimizer, scheduler, counters and every RNG, without pickle.

RNG states are what make a resumed run bit-exact: torch's CPU generator (a uint8 tensor), each
CUDA device's generator, numpy's global MT19937 state (when numpy is installed) and Python's
``random`` state, all as plain object trees.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from mettaformat.checkpoint import TrainingState

__all__ = ["capture_rng", "capture_training_state", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def restore_rng(state: dict[str, Any]) -> list[str]:
    """Restore what ``state`` holds; return the generators that could not be restored here."""
    missing: list[str] = []
    if "torch" in state:
        torch.set_rng_state(state["torch"].to("cpu", torch.uint8))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
            torch.cuda.set_rng_state_all([s.to("cpu", torch.uint8) for s in state["cuda"]])
        else:
            missing.append("cuda")
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            missing.append("numpy")
        else:
            n = state["numpy"]
            np.random.set_state(
                (n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
            )
    return missing


def capture_training_state(
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    trainer_state: dict[str, Any] | None = None,
) -> TrainingState:
    return TrainingState(
        optimizer=optimizer.state_dict() if optimizer is not None else None,
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        trainer_state=dict(trainer_state or {}),
        rng=capture_rng(),
    )
