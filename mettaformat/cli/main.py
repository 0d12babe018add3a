"""Entry point of the ``mettaformat`` command.

Exit codes: 0 success; 1 the command ran and found a problem (or failed on bad input);
2 usage error. Errors print one line; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import traceback
from collections.abc import Sequence

from mettaformat import __version__
from mettaformat.cli import (
    bench_cmd,
    compat_cmd,
    completion_cmd,
    convert_cmd,
    diff_cmd,
    extract_cmd,
    inspect_cmd,
    ls_cmd,
    materialize_cmd,
    migrate_cmd,
    prune_cmd,
    repair_cmd,
    validate_cmd,
)
from mettaformat.cli._output import sanitize
from mettaformat.errors import MettaFormatError

COMMANDS = (
    inspect_cmd,
    convert_cmd,
    migrate_cmd,
    validate_cmd,
    repair_cmd,
    compat_cmd,
    ls_cmd,
    prune_cmd,
    extract_cmd,
    materialize_cmd,
    diff_cmd,
    bench_cmd,
    completion_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mettaformat", description="Safe, fast checkpoints for RL policies.")
    parser.add_argument("--version", action="version", version=f"mettaformat {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="print less")
    parser.add_argument("-v", "--verbose", action="store_true", help="print more")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    # The common flags work after the subcommand too (mettaformat inspect -q FILE); SUPPRESS keeps the
    # top-level value when they are not repeated there.
    for subparser in sub.choices.values():
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        subparser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="print less")
        subparser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="print more")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except BrokenPipeError:  # output piped into head & co.: stop quietly
        # Point stdout at /dev/null so the interpreter's final flush does not complain again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        return 0
    except (MettaFormatError, OSError) as e:
        if args.debug:
            traceback.print_exc()
        print(f"mettaformat {args.command}: error: {sanitize(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
