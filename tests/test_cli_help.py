"""Every subcommand and argument explains itself, and the README's CLI section lists every command."""

from __future__ import annotations

import argparse
from pathlib import Path

from mettaformat.cli.main import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_subcommand_and_every_argument_has_help() -> None:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helped = {a.dest: a.help for a in action._choices_actions}
    for command, parser in _subcommands().items():
        assert helped.get(command), f"{command} has no help line"
        for arg in parser._actions:
            if isinstance(arg, argparse._HelpAction):
                continue
            name = "/".join(arg.option_strings) or arg.dest
            assert arg.help and arg.help != argparse.SUPPRESS, f"mettaformat {command} {name} has no help text"


def test_readme_cli_section_lists_every_command() -> None:
    text = README.read_text()
    section = text[text.index("## Command line") :]
    section = section[: section.index("\n## ", 1)]
    for command in _subcommands():
        assert f"mettaformat {command} " in section, f"README's CLI section lacks {command}"
