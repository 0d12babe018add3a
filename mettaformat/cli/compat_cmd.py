"""``mettaformat compat FILE``: can this runtime load it? Exit 0 full, 1 partial, 2 incompatible/unknown."""

from __future__ import annotations

import argparse
from typing import Any

from mettaformat.cli._output import emit_json, sanitize


def add_parser(sub: Any) -> None:
    p = sub.add_parser("compat", help="check whether a checkpoint is compatible with this runtime")
    p.add_argument("file", metavar="FILE", help="the checkpoint to check (any format)")
    p.add_argument("--observation-space", help="runtime observation space version, e.g. v1")
    p.add_argument("--action-space", help="runtime action space version")
    p.add_argument("--layer", help="runtime layer architecture version")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from mettaformat.compat import RuntimeVersions, check_checkpoint_compatibility

    runtime = RuntimeVersions(
        observation_space=args.observation_space, action_space=args.action_space, layer=args.layer
    )
    report = check_checkpoint_compatibility(args.file, runtime)
    if args.json:
        emit_json({"file": args.file, **report.to_dict()})
    else:
        # Rendered item by item: a newline inside a hostile file name must stay escaped.
        lines = [f"Compatibility Level: {report.level.value}"]
        for title, items in (
            ("Errors", report.errors),
            ("Warnings", report.warnings),
            ("Recommendations", report.recommendations),
        ):
            if items:
                lines += [f"\n{title}:", *(f"  - {sanitize(item)}" for item in items)]
        print("\n".join(lines))
    return report.exit_code
