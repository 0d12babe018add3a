"""``mettaformat ls DIR``: the checkpoints of a directory (or glob), from headers and the index; a
``base`` column, shown when some file is a delta, names the checkpoint each one is rebuilt from.

Exit codes: 0 listed; 1 some files could not be read (they are named on stderr / in the JSON).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mettaformat.cli._output import emit_json, human_bytes, sanitize, table
from mettaformat.store.record import PolicyRecord
from mettaformat.store.selectors import latest_first, lookup_metric, rank_by_metric


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ls", help="list the policy checkpoints in a directory (headers only)")
    p.add_argument("dir", help="a directory, file, glob or file:// URI")
    p.add_argument("--sort", metavar="METRIC", help="order by this metadata metric (default: newest first)")
    p.add_argument("--mode", choices=("max", "min"), default="max", help="with --sort: best is max (default) or min")
    p.add_argument("--top", metavar="N", type=int, help="show only the first N (with --sort: the N best)")
    p.add_argument("--metric", default="score", help="metric column when not sorting (default: score)")
    p.add_argument("--no-index", action="store_true", help="neither read nor write the directory index")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def _metric_text(record: PolicyRecord, metric: str) -> str:
    value, reason, _ = lookup_metric(record.metadata, metric)
    if value is not None:
        return f"{value:.6g}"
    return "nan" if reason == "nan_metric" else "-"


def _base_text(record: PolicyRecord, *, full: bool = False) -> str | None:
    """The checkpoint a delta file needs (its name when it lies in the same folder), None for a full one."""
    base = record.base
    if base is None:
        return None
    return str(base) if full or base.parent != record.path.parent else base.name


def run(args: argparse.Namespace) -> int:
    if args.top is not None and args.top < 1:
        print("mettaformat ls: error: --top must be at least 1", file=sys.stderr)
        return 2
    from mettaformat.store import PolicyStore

    store = PolicyStore(use_index=not args.no_index)
    scan = store.scan(args.dir)
    metric = args.sort or args.metric
    if args.sort:
        ranked, unscored = rank_by_metric(scan.records, args.sort, args.mode)
        rows = ranked[: args.top] if args.top else ranked + [e.record for e in unscored if e.record is not None]
    else:
        rows = latest_first(scan.records)[: args.top] if args.top else latest_first(scan.records)
    if args.json:
        emit_json(
            {
                "uri": args.dir,
                "sort": args.sort,
                "mode": args.mode,
                "metric": metric,
                "count": len(scan.records),
                "checkpoints": [
                    {
                        "name": r.name,
                        "path": str(r.path),
                        "epoch": r.epoch,
                        "agent_step": r.agent_step,
                        "metric": lookup_metric(r.metadata, metric)[0],
                        "size": r.size,
                        "mtime_ns": r.mtime_ns,
                        "format": r.format,
                        "model_type": r.model_type,
                        "base": _base_text(r, full=True),
                        "metadata": dict(r.metadata),
                    }
                    for r in rows
                ],
                "unreadable": [{"path": str(e.path), "reason": e.detail} for e in scan.unreadable],
            }
        )
    else:
        bases = [_base_text(r) for r in rows]
        shown_base = any(b is not None for b in bases)  # the column appears when some file is a delta
        print(
            table(
                ["name", "epoch", "step", metric, "size"] + (["base"] if shown_base else []),
                [[r.name, r.epoch, r.agent_step, _metric_text(r, metric), human_bytes(r.size)]
                 + ([b or "-"] if shown_base else []) for r, b in zip(rows, bases, strict=True)],
                align="lrrrrl" if shown_base else "lrrrr",
            )
        )
        shown = f"{len(rows)} of {len(scan.records)}" if len(rows) != len(scan.records) else f"{len(rows)}"
        print(f"{shown} checkpoint{'s' if len(scan.records) != 1 else ''}")
        for e in scan.unreadable:
            print(f"mettaformat ls: unreadable: {sanitize(str(e.path))}: {sanitize(e.detail)}", file=sys.stderr)
    return 1 if scan.unreadable else 0
