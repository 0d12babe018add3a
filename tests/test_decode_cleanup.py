"""A failed load leaves no decoding job running on the file's mapping.

If a zstd load raised while other frames were still being decoded, those jobs kept reading the
memory map after the error reached the caller; a caller that then rewrote or truncated the file
killed the process with SIGBUS. Run in a subprocess, so a SIGBUS fails the test instead of pytest.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import os, struct, sys, time
    import torch
    import mettaformat
    from mettaformat.errors import MettaFormatError
    from tests import craft

    path = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(1 << 20, generator=g) * 0.02 for i in range(16)}  # 16 x 4 MiB
    mettaformat.save_file(tensors, path, compression="zstd")
    parts = craft.parse(open(path, "rb").read())
    offset = parts.section()["offset"]
    first = struct.unpack_from("<Q", parts.section()["frames"], 0)[0]
    second = struct.unpack_from("<Q", parts.section()["frames"], 16)[0]
    with open(path, "r+b") as f:  # flip a byte inside frame 1, the first tensor's first plane
        f.seek(offset + first + second // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    for attempt in range(3):
        try:
            mettaformat.load_file(path)
        except MettaFormatError:
            pass
        else:
            raise SystemExit("the damaged file loaded")
        os.truncate(path, 4096)
        time.sleep(0.05)
        mettaformat.save_file(tensors, path + ".tmp", compression="zstd")
        os.replace(path + ".tmp", path)
        with open(path, "r+b") as f:
            f.seek(offset + first + second // 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    print("survived")
""")


def test_failed_zstd_load_waits_for_its_decoders(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "damaged.mfmt")],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"exit {result.returncode} (-7 is SIGBUS): {result.stderr[-2000:]}"
    assert "survived" in result.stdout
