"""Importing the package, the errors, the constants, the header parser and the CLI's parser never imports torch.

``mettaformat --version`` and ``--help`` must feel instant; torch alone takes seconds to import.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
import mettaformat, mettaformat.errors, mettaformat.constants, mettaformat.container.header
from mettaformat.cli.main import build_parser
parser = build_parser()
for command in {commands!r}:
    try:
        parser.parse_args([command, "--help"])
    except SystemExit:
        pass
mettaformat.MettaFormatError, mettaformat.__version__
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
"""


def _torch_modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_package_and_every_subcommand_parser_import_without_torch() -> None:
    from mettaformat.cli.main import build_parser

    commands = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert "inspect" in commands and "prune" in commands
    assert _torch_modules_after(_PROBE.format(commands=commands)) == []


def test_header_parser_runs_without_torch(tmp_path: pytest.TempPathFactory) -> None:
    import torch

    import mettaformat

    path = tmp_path / "m.mfmt"  # type: ignore[operator]
    mettaformat.save_file({"w": torch.ones(3, dtype=torch.bfloat16)}, path)
    code = (
        "import json, sys\n"
        "from mettaformat.constants import PREAMBLE_SIZE\n"
        "from mettaformat.container.header import parse_header\n"
        "from mettaformat.container.layout import Preamble\n"
        f"data = open({str(path)!r}, 'rb').read()\n"
        "pre = Preamble.unpack(data[:PREAMBLE_SIZE], len(data))\n"
        "h = parse_header(data[PREAMBLE_SIZE:PREAMBLE_SIZE + pre.header_length])\n"
        "assert h.sections[0].tensors[0].dtype == 'BF16'\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))\n"
    )
    assert _torch_modules_after(code) == []


def test_lazy_attributes_resolve_and_unknown_names_raise() -> None:
    import mettaformat

    for name in mettaformat.__all__:
        assert getattr(mettaformat, name) is not None
    with pytest.raises(AttributeError, match="no_such_name"):
        mettaformat.no_such_name  # noqa: B018


def test_inspect_of_a_container_runs_without_torch(tmp_path: pytest.TempPathFactory) -> None:
    import torch

    import mettaformat

    path = tmp_path / "m.mfmt"  # type: ignore[operator]
    mettaformat.save_file({"w": torch.ones(3, dtype=torch.bfloat16)}, path, metadata={"epoch": 3})
    code = (
        "import contextlib, io, json, sys\n"
        "from mettaformat.cli.main import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        f"    assert main(['inspect', {str(path)!r}]) == 0\n"
        "assert 'BF16' in out.getvalue() and 'epoch: 3' in out.getvalue(), out.getvalue()\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))))\n"
    )
    assert _torch_modules_after(code) == []


def test_submodules_stay_reachable_as_attributes_of_a_lazy_package() -> None:
    code = (
        "import mettaformat, mettaformat.store\n"
        "assert callable(mettaformat.convert.convert)\n"
        "assert mettaformat.legacy.import_legacy is not None\n"
        "assert mettaformat.store.retention is not None\n"
        "for missing in ('no_such_thing', '_private'):\n"
        "    try:\n"
        "        getattr(mettaformat, missing)\n"
        "    except AttributeError as e:\n"
        "        assert missing in str(e)\n"
        "    else:\n"
        "        raise SystemExit(f'{missing} resolved')\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
