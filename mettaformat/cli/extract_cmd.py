"""``mettaformat extract FILE OUT.safetensors``: the weights as a plain safetensors file."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mettaformat.cli._output import emit_json, human_bytes, sanitize


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "extract",
        help="write a section as a standalone .safetensors file",
        description="Copy a section's tensors as stored into a .safetensors file; the user metadata goes "
        "into its __metadata__ (as convert --to safetensors does). Trees and other sections are listed "
        "as not carried.",
    )
    p.add_argument("file", metavar="FILE", help="the .mfmt container to read")
    p.add_argument("out", metavar="OUT", help="the .safetensors file to write; must not be FILE")
    p.add_argument("--section", default="model", help="section to extract (default: model)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mettaformat.container.extract import extract_safetensors

    report = extract_safetensors(args.file, args.out, section=args.section)
    if args.json:
        emit_json(
            {
                "out": args.out,
                "tensors": report.tensors,
                "bytes": report.bytes_written,
                "aliases": report.aliases,
                "not_carried": report.dropped,
                "notes": report.notes,
            }
        )
        return 0
    if not args.quiet:
        print(f"wrote {sanitize(args.out)}: {report.tensors} tensors, {human_bytes(report.bytes_written)}")
    # Nothing is lost silently: say what a safetensors file cannot carry.
    for alias, target in report.aliases.items():
        print(
            f"note: tied tensor {sanitize(alias)!r} is stored once as {sanitize(target)!r} "
            "(listed in __metadata__['mettaformat.aliases'])",
            file=sys.stderr,
        )
    for what in report.dropped:
        print(f"note: not carried: {sanitize(what)}", file=sys.stderr)
    for note in report.notes:
        print(f"note: {sanitize(note)}", file=sys.stderr)
    return 0
