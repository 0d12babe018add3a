"""``mettaformat bench [FILE...]``: size and load time of your checkpoints in each format.

Without files it uses a synthetic 64 MiB fp32 state dict. The full suite is ``./dev bench``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mettaformat.cli._output import emit_json, sanitize

if TYPE_CHECKING:
    import torch


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="compare size and load time across formats for your checkpoints")
    p.add_argument(
        "files", nargs="*", metavar="FILE", help="checkpoints to measure (default: a synthetic 64 MiB state dict)"
    )
    p.add_argument("--repeat", type=_positive, default=7, help="timed runs per measurement (median reported)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from mettaformat.anyformat import load_any
    from mettaformat.bench import compare_formats, markdown_table

    inputs: list[tuple[str, dict[str, torch.Tensor]]] = []
    for f in args.files:
        inputs.append((f, {k: v.contiguous() for k, v in load_any(f, migrate=False).tensors.items()}))
    if not inputs:
        g = torch.Generator().manual_seed(0)
        inputs.append(
            ("synthetic 64 MiB fp32", {f"layer{i}.weight": torch.randn(256, 256, generator=g) for i in range(256)})
        )
    report = []
    for name, weights in inputs:
        raw = sum(t.numel() * t.element_size() for t in weights.values())
        with tempfile.TemporaryDirectory() as tmp:
            results = compare_formats(weights, Path(tmp), repeat=args.repeat)
        report.append({"input": name, "raw_bytes": raw, "results": [r.__dict__ for r in results]})
        if not args.json:
            print(f"\n{sanitize(name)}: {len(weights)} tensors, {raw / 2**20:.2f} MiB")
            print(markdown_table(results, raw))
    if args.json:
        emit_json(report)
    return 0
