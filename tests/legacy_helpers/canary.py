"""A canary that proves a hostile input ran nothing: a side-effect module and a marker file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CANARY_MODULE = "mf_canary_side_effect"


@dataclass(frozen=True)
class Canary:
    marker: Path

    @property
    def shell(self) -> str:
        return f"touch {self.marker}"

    @property
    def python(self) -> str:
        return f"open({str(self.marker)!r}, 'w').write('ran')"


@contextmanager
def canary(tmp_path: Path) -> Iterator[Canary]:
    """Provide a marker path and an importable module that would create it; check afterwards.

    Asserts on exit that the marker does not exist and that ``sys.modules`` is unchanged.
    """
    marker = tmp_path / "canary_ran"
    mod_dir = tmp_path / "canary_mods"
    mod_dir.mkdir(exist_ok=True)
    (mod_dir / f"{CANARY_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "class Evil:\n"
        "    def __setstate__(self, state):\n"
        f"        open({str(marker)!r}, 'w').write('setstate')\n"
        "def boom(*a):\n"
        f"    open({str(marker)!r}, 'w').write('called')\n"
    )
    sys.path.insert(0, str(mod_dir))
    before = set(sys.modules)
    try:
        yield Canary(marker)
    finally:
        sys.path.remove(str(mod_dir))
        # Codec modules are stdlib lookups for the fixed set of text codecs the VM allows.
        added = {m for m in set(sys.modules) - before if not m.startswith("encodings.")}
        assert not marker.exists(), f"hostile payload ran: {marker.read_text()}"
        assert not added, f"modules imported during import: {sorted(added)}"
