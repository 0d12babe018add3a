"""``mettaformat completion bash|zsh``: a shell completion script, generated from the parser itself."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("completion", help="print a shell completion script (eval it in your shell rc)")
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete for")
    p.set_defaults(run=run)


def _commands(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    for action in parser._actions:  # argparse has no public API for walking subparsers
        if isinstance(action, argparse._SubParsersAction):
            return {name: [o for a in sub._actions for o in a.option_strings] for name, sub in action.choices.items()}
    return {}


def bash_script(parser: argparse.ArgumentParser) -> str:
    commands = _commands(parser)
    cases = "\n".join(f'        {name}) opts="{" ".join(opts)}" ;;' for name, opts in commands.items())
    globals_ = " ".join(o for a in parser._actions for o in a.option_strings)
    return f"""_mettaformat() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} cmd=${{COMP_WORDS[1]}} opts
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{" ".join(commands)} {globals_}" -- "$cur")); return
    fi
    case "$cmd" in
{cases}
    esac
    if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    else COMPREPLY=($(compgen -f -- "$cur")); fi
}}
complete -o filenames -F _mettaformat mettaformat
"""


def run(args: argparse.Namespace) -> int:
    from mettaformat.cli.main import build_parser

    script = bash_script(build_parser())
    if args.shell == "zsh":
        script = "autoload -U +X bashcompinit && bashcompinit\n" + script
    print(script, end="")
    return 0
