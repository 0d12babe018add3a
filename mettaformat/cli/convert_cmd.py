"""``mettaformat convert SRC DST [--to FORMAT]``: any checkpoint format to another; reports what is not carried."""

from __future__ import annotations

import argparse
from typing import Any

from mettaformat.cli._output import emit_json, human_bytes, sanitize
from mettaformat.constants import CONVERT_TARGETS
from mettaformat.errors import WriteError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert between mfmt, legacy v1/v2 .pt, state-dict .pt, safetensors and DCP directories",
        description="Read SRC as stored (no schema migrations) and write DST. Anything the target "
        "format cannot carry is listed; --strict refuses instead.",
    )
    p.add_argument("src", metavar="SRC", help="the checkpoint to read (any format)")
    p.add_argument("dst", metavar="DST", help="the file to write; must not be SRC")
    p.add_argument(
        "--to",
        choices=CONVERT_TARGETS,
        help="target format (default: from DST's suffix, .mfmt or .safetensors; required for .pt and dcp, "
        "a distributed checkpoint directory)",
    )
    p.add_argument("--compression", choices=("raw", "zstd", "none"), default="raw", help="mfmt and dcp only")
    p.add_argument("--strict", action="store_true", help="fail if the target cannot carry everything")
    p.add_argument(
        "--allow-objects",
        action="store_true",
        help="v2 only: pickle recorded objects (gym spaces...) in metadata; the file then needs weights_only=False",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mettaformat.convert import convert, target_for_path

    to = args.to or target_for_path(args.dst)
    if to is None:
        raise WriteError(f"cannot tell the target format from {args.dst!r}; pass --to {{{','.join(CONVERT_TARGETS)}}}")
    report = convert(
        args.src, args.dst, to=to, compression=args.compression, strict=args.strict, allow_objects=args.allow_objects
    )
    if args.json:
        emit_json(report.to_dict())
        return 0
    if not getattr(args, "quiet", False):
        print(
            f"{sanitize(report.src)} ({report.source_format}{f', {report.shape}' if report.shape else ''}) -> "
            f"{sanitize(report.dst)} ({to}): {report.tensors} tensors, "
            f"{human_bytes(report.bytes_in)} -> {human_bytes(report.bytes_out)}"
        )
        for note in report.notes if getattr(args, "verbose", False) else ():
            print(f"  note: {sanitize(note)}")
    for item in report.not_carried:
        print(f"  not carried: {sanitize(item)}")
    return 0
