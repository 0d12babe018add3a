"""``mettaformat diff A B``: what changed between two checkpoints (exit 0 identical, 1 different)."""

from __future__ import annotations

import argparse
from typing import Any

from mettaformat.cli._output import clip, emit_json, sanitize


def add_parser(sub: Any) -> None:
    p = sub.add_parser("diff", help="compare two checkpoints of any format")
    p.add_argument("a", metavar="A", help="the first checkpoint (any format)")
    p.add_argument("b", metavar="B", help="the second checkpoint (any format)")
    p.add_argument("--atol", type=float, default=0.0, help="absolute tolerance per element (default: 0, exact)")
    p.add_argument("--rtol", type=float, default=0.0, help="relative tolerance per element (default: 0, exact)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mettaformat.diff import diff_checkpoints

    d = diff_checkpoints(args.a, args.b, atol=args.atol, rtol=args.rtol)
    if args.json:
        emit_json(d.to_dict())
        return 0 if d.identical else 1
    if d.identical:
        print(f"identical: {d.unchanged} tensors and the metadata match")
        return 0
    for name in d.added:
        print(f"+ {sanitize(name)}")
    for name in d.removed:
        print(f"- {sanitize(name)}")
    for c in d.changed:
        extra = f", max abs diff {c.max_abs_diff:.6g}" if c.max_abs_diff is not None else ""
        print(f"~ {sanitize(c.name)}: {c.kind}: {sanitize(c.detail)}{extra}")
    for key, (va, vb) in d.metadata.items():
        print(f"metadata {sanitize(key)}: {clip(sanitize(repr(va)), 80)} -> {clip(sanitize(repr(vb)), 80)}")
    if not args.quiet:
        print(
            f"{len(d.added)} added, {len(d.removed)} removed, {len(d.changed)} changed, {d.unchanged} unchanged, "
            f"{len(d.metadata)} metadata differences"
        )
    return 1
