"""``mettaformat validate FILE...``: exit 1 if any file has a problem; each problem names its region."""

from __future__ import annotations

import argparse
from typing import Any

from mettaformat.cli._output import emit_json, progress_bar, sanitize


def add_parser(sub: Any) -> None:
    p = sub.add_parser("validate", help="check structure, index, padding and every checksum")
    p.add_argument("files", nargs="+", metavar="FILE", help="checkpoints to check (any format)")
    p.add_argument("--deep", action="store_true", help="also materialise tensors and report non-finite values")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mettaformat.validate import validate

    bar = progress_bar(len(args.files), "validate", quiet=args.quiet or len(args.files) < 2)
    reports = []
    for f in args.files:
        reports.append(validate(f, deep=args.deep))
        bar.update(1)
    bar.close()
    if args.json:
        emit_json([r.to_dict() for r in reports])
    else:
        for r in reports:
            status = "ok" if r.ok else f"{len(r.problems)} problem(s)"
            if r.ok and args.quiet:
                continue
            print(
                f"{sanitize(r.path)}: {r.format or 'unknown format'}"
                f"{f' ({r.shape})' if r.shape else ''}, {r.tensors_checked} tensors checked: {status}"
            )
            for p in r.problems:
                print(f"  {sanitize(p.region)}: {sanitize(p.message)}")
    return 0 if all(r.ok for r in reports) else 1
