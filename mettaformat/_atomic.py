"""Atomic file replacement: write a sibling temp file, then rename over the target.

A crash at any point leaves either the previous file or the complete new one at the target
path. The temp file lives in the target's directory because a rename is only atomic (and
only cheap) within one file system.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from mettaformat.errors import MettaFormatError, WriteError

__all__ = ["TEMP_SUFFIX", "atomic_fd", "fsync_dir", "is_temp_file"]

#: Suffix of in-progress files; readers never list them and the store cleans leftovers.
TEMP_SUFFIX: Final = ".mfmt-tmp"


def is_temp_file(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).endswith(TEMP_SUFFIX)


@contextmanager
def atomic_fd(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[int]:
    """Yield a file descriptor whose content replaces ``path`` when the block succeeds.

    Raises:
        WriteError: the temp file cannot be created, or an OSError happened while writing,
            syncing or renaming. The temp file is removed and ``path`` is untouched.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise WriteError(f"cannot create a temp file beside {target}: {e.strerror}") from e
    try:
        try:
            yield fd
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as e:
        # Never leave a partial temp file, and never retry an fsync after EIO (fsyncgate).
        tmp.unlink(missing_ok=True)
        if isinstance(e, MettaFormatError) or not isinstance(e, (OSError, ValueError, RuntimeError)):
            raise
        raise WriteError(f"saving {target} failed: {e}") from e
    fsync_dir(target.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not every platform lets a directory be opened
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; the rename itself is still atomic
    finally:
        os.close(fd)
