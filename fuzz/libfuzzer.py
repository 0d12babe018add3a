"""atheris entry point: ``python -m fuzz.libfuzzer TARGET [libFuzzer flags] [CORPUS_DIR...]``."""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["mettaformat"]):
    import mettaformat
    import mettaformat.container.codecs.zstd
    import mettaformat.container.header
    import mettaformat.legacy
    import mettaformat.legacy.unpickler  # noqa: F401

from fuzz.targets import TARGETS


def main() -> None:
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
