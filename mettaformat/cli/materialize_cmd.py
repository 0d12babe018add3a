"""``mettaformat materialize FILE OUT``: a delta checkpoint as a standalone file."""

from __future__ import annotations

import argparse
from typing import Any

from mettaformat.cli._output import emit_json, human_bytes, sanitize


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "materialize",
        help="write a delta checkpoint as a standalone file",
        description="Rebuild every tensor of a delta checkpoint from its chain of bases and write a file "
        "that no longer needs them (metadata and trees kept). A standalone FILE is copied as is.",
    )
    p.add_argument("file", metavar="FILE", help="the .mfmt container to read")
    p.add_argument("out", metavar="OUT", help="the standalone container to write; must not be FILE or a base")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mettaformat.container.materialize import materialize

    report = materialize(args.file, args.out)
    if args.json:
        emit_json({"out": args.out, "chain": report.chain, "tensors": report.tensors, "bytes": report.bytes_written})
    elif not args.quiet:
        rebuilt = f", rebuilt from {len(report.chain)} base(s)" if report.chain else ""
        print(f"wrote {sanitize(args.out)}: {report.tensors} tensors, {human_bytes(report.bytes_written)}{rebuilt}")
    return 0
