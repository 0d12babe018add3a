"""``mettaformat repair FILE OUT``: write what is recoverable; report what was lost."""

from __future__ import annotations

import argparse
from typing import Any

from mettaformat.cli._output import emit_json, sanitize


def add_parser(sub: Any) -> None:
    p = sub.add_parser("repair", help="recover a damaged container into a new file")
    p.add_argument("file", metavar="FILE", help="the damaged .mfmt container (left untouched)")
    p.add_argument("out", metavar="OUT", help="the repaired container to write; must not be FILE")
    p.add_argument("--zero", action="store_true", help="zero-fill damaged tensors instead of dropping them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mettaformat.repair import repair

    report = repair(args.file, args.out, zero=args.zero)
    if args.json:
        emit_json(report.to_dict())
    else:
        print(
            f"wrote {sanitize(report.output)} (index from the {report.index_from}): "
            f"{len(report.recovered)} tensors recovered, {len(report.lost)} lost, "
            f"{len(report.zero_filled)} zero-filled"
        )
        for name in report.lost:
            print(f"  lost: {sanitize(name)}")
        for name in report.zero_filled:
            print(f"  zero-filled: {sanitize(name)}")
        for note in report.notes:
            print(f"  note: {sanitize(note)}")
    return 0 if not (report.lost or report.zero_filled) else 1
