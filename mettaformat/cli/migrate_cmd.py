"""``mettaformat migrate SRC [DST]``: legacy .pt checkpoints to .mfmt containers; exit 1 if any file fails."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from mettaformat.cli._output import emit_json, progress_bar, sanitize

if TYPE_CHECKING:
    from mettaformat.migrate import MigrationResult


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "migrate",
        help="migrate legacy .pt checkpoints (a file or a directory) to .mfmt containers",
        description="Each input is imported safely, brought to the current schema, and written as "
        "<name>.mfmt beside it (or under DST). Inputs are never modified, unless DST is the input "
        "itself, which is then backed up to <name>.backup first.",
    )
    p.add_argument("src", metavar="SRC", help="a checkpoint file or a directory of *.pt files")
    p.add_argument("dst", metavar="DST", nargs="?", help="output file, or output directory for a directory")
    p.add_argument("--no-backup", action="store_true", help="do not back up an input replaced in place")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-directories")
    p.add_argument("-n", "--dry-run", action="store_true", help="import and check every input, write nothing")
    p.add_argument(
        "--compression", choices=("raw", "zstd", "none"), default="raw",
        help="codec of the new containers (default: raw; 'none' is a deprecated spelling of raw)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(run=run)


class _Reporter:
    """One line per file; on a terminal a progress bar below them too."""

    def __init__(self, *, quiet: bool, silent: bool, dry_run: bool) -> None:
        self.quiet, self.silent, self.dry_run = quiet, silent, dry_run
        self.bar: Any = None

    def __call__(self, result: MigrationResult, index: int, total: int) -> None:
        if self.silent:
            return
        if self.bar is None and total > 1 and sys.stdout.isatty():
            self.bar = progress_bar(total, "migrate", quiet=self.quiet)
        line = sanitize(result.describe(dry_run=self.dry_run))
        if self.quiet and result.status != "failed":
            line = ""
        if self.bar is not None:
            if line:  # above the bar: the per-file log stays on screen
                self.bar.write(line)
            self.bar.update(1)
        elif line:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run(args: argparse.Namespace) -> int:
    from mettaformat.migrate import migrate

    quiet = bool(getattr(args, "quiet", False))
    reporter = _Reporter(quiet=quiet, silent=args.json, dry_run=args.dry_run)
    try:
        summary = migrate(
            args.src,
            args.dst,
            backup=not args.no_backup,
            recursive=args.recursive,
            dry_run=args.dry_run,
            compression=args.compression,
            progress=reporter,
        )
    finally:
        reporter.close()
    if args.json:
        emit_json(summary.to_dict())
    elif not quiet or not summary.ok:
        print(str(summary).splitlines()[0])
    return 0 if summary.ok else 1
