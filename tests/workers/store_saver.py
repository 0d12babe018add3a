"""One of several processes saving into the same PolicyStore directory at the same time.

usage: python -m tests.workers.store_saver DIR WORKER_ID COUNT

Creates DIR/ready-<ID> once imported, waits for DIR/go (which the test creates when every
worker is ready, so that they start together), then saves COUNT checkpoints
named ``w<ID>_<i>.mfmt``, listing the directory after every other save so that both index
writers (save and listing) race with the other process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import mettaformat
from mettaformat.store import PolicyStore
from tests.workers.store_helpers import MODEL_TYPE, TinyNet


def main(directory: Path, worker: int, count: int) -> None:
    (directory / f"ready-{worker}").touch()  # imports done: the test starts everyone at once
    deadline = time.monotonic() + 120
    while not (directory / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the go file")
        time.sleep(0.005)
    store = PolicyStore(directory)
    start = time.time()
    for i in range(count):
        torch.manual_seed(worker * 1000 + i)
        agent = mettaformat.MettaAgent(TinyNet(), model_type=MODEL_TYPE)
        store.save(name=f"w{worker}_{i:03d}.mfmt", agent=agent, metadata={"epoch": i, "worker": worker, "score": i})
        if i % 2:
            store.records()
    print(f"worker {worker}: saved {count} start={start:.6f} end={time.time():.6f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
