"""``mettaformat prune DIR``: delete the checkpoints no retention rule keeps.

A checkpoint survives when any rule keeps it (``--keep-last``, ``--keep-best``,
``--every-n-epochs``). Rules count per run (a folder may hold several), and copies of one
checkpoint in several formats count once. A base a kept delta checkpoint needs is kept, unless
``--materialize-dependants`` rewrites that delta as a standalone file first. On a terminal the
plan is shown and confirmed before anything is deleted (``--yes`` skips the question). Temp
files of crashed saves older than ``--temp-grace`` seconds are removed too. Exit codes: 0 done;
1 some files were left alone (unreadable, changed meanwhile, or not deletable); 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from mettaformat.cli._output import emit_json, human_bytes, sanitize, table
from mettaformat.store.maintenance import DEFAULT_TEMP_GRACE_S, PruneReport
from mettaformat.store.retention import AnyOf, BestN, EveryNEpochs, LatestN, RetentionPolicy


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # rejects negatives and NaN
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number of seconds")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prune", help="delete checkpoints outside the retention rules (keep-last/best/every)")
    p.add_argument("dir", metavar="DIR", help="a directory, glob or file:// URI")
    p.add_argument("--keep-last", metavar="N", type=int, default=0, help="keep the N newest")
    p.add_argument("--keep-best", metavar="N", type=int, default=0, help="keep the N best by --metric")
    p.add_argument("--metric", default="score", help="metric for --keep-best (default: score)")
    p.add_argument("--mode", choices=("max", "min"), default="max", help="best is max (default) or min")
    p.add_argument(
        "--drop-unscored", action="store_true", help="with --keep-best: do not keep checkpoints lacking the metric"
    )
    p.add_argument("--every-n-epochs", metavar="K", type=int, default=0, help="keep epochs that are multiples of K")
    p.add_argument(
        "--temp-grace",
        metavar="SECONDS",
        type=_seconds,
        default=DEFAULT_TEMP_GRACE_S,
        help=f"remove temp files older than this (default {DEFAULT_TEMP_GRACE_S:.0f})",
    )
    p.add_argument("--allow-delete-all", action="store_true", help="permit deleting every checkpoint")
    p.add_argument("--materialize-dependants", action="store_true",
                   help="rewrite kept delta checkpoints as standalone files so that their bases can be deleted "
                        "(default: such bases are kept)")
    p.add_argument("--dry-run", action="store_true", help="report only; delete nothing")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation on a terminal")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def build_policy(args: argparse.Namespace) -> RetentionPolicy | None:
    """The union of the rules given on the command line, or None when there is none."""
    rules: list[RetentionPolicy] = []
    if args.keep_last:
        rules.append(LatestN(args.keep_last))
    if args.keep_best:
        rules.append(BestN(args.keep_best, metric=args.metric, mode=args.mode, keep_unscored=not args.drop_unscored))
    if args.every_n_epochs:
        rules.append(EveryNEpochs(args.every_n_epochs))
    if not rules:
        return None
    return rules[0] if len(rules) == 1 else AnyOf(*rules)


def run(args: argparse.Namespace) -> int:
    if min(args.keep_last, args.keep_best, args.every_n_epochs) < 0:
        print("mettaformat prune: error: counts must be >= 0", file=sys.stderr)
        return 2
    policy = build_policy(args)
    if policy is None:
        print(
            "mettaformat prune: error: give at least one of --keep-last, --keep-best, --every-n-epochs",
            file=sys.stderr,
        )
        return 2
    from mettaformat.store import PolicyStore

    asked: list[bool] = []

    def confirm(plan: PruneReport) -> bool:
        _print_report(plan)
        asked.append(True)
        if not plan.deleted and not plan.temp_files_removed:
            return False
        answer = input(f"Delete {len(plan.deleted) + len(plan.temp_files_removed)} files? [y/N] ")
        return answer.strip().lower() in ("y", "yes")

    interactive = not (args.dry_run or args.yes or args.json) and sys.stdin.isatty() and sys.stdout.isatty()
    report = PolicyStore().prune(
        policy,
        args.dir,
        dry_run=args.dry_run,
        temp_grace_s=args.temp_grace,
        allow_delete_all=args.allow_delete_all,
        confirm=confirm if interactive else None,
        materialize_dependants=args.materialize_dependants,
    )
    if args.json:
        emit_json({"uri": args.dir, **report.to_dict()})
    elif asked and report.dry_run:
        print("nothing deleted")
    else:
        _print_report(report)
    return 1 if report.skipped else 0


def _print_report(report: PruneReport) -> None:
    verb = "would delete" if report.dry_run else "deleted"
    rows: list[list[Any]] = [
        ["keep", report.runs.get(r.path, ""), r.name, r.epoch, ", ".join(report.kept_by.get(r.path, ()))]
        for r in report.kept
    ]
    rows += [[verb, report.runs.get(r.path, ""), r.name, r.epoch, ""] for r in report.deleted]
    if rows:
        print(table(["action", "run", "name", "epoch", "kept by"], rows, align="lllr"))
    for path in report.materialized:
        print(f"{'would make' if report.dry_run else 'made'} standalone {sanitize(str(path))}")
    freed = human_bytes(report.bytes_freed)
    print(f"{report.policy}: kept {len(report.kept)}, {verb} {len(report.deleted)} ({freed})")
    for path in report.temp_files_removed:
        print(f"{'would remove' if report.dry_run else 'removed'} temp file {sanitize(str(path))}")
    for s in report.skipped:
        print(f"mettaformat prune: left alone: {sanitize(str(s.path))}: {sanitize(s.reason)}", file=sys.stderr)
