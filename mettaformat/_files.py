"""The two guards every path goes through: inputs are regular files, outputs are never inputs.

- :func:`open_regular` / :func:`read_regular`: every entry point that opens a path the user
  named goes through them. A FIFO, a character device (``/dev/zero``), a socket or a directory
  is refused at once with a :class:`~mettaformat.errors.FormatError`: opening is non-blocking
  (a FIFO without a writer would otherwise hang the open), and nothing is read before the file
  is known to be regular, so a device that never ends cannot exhaust memory.
- :func:`refuse_overwriting_input`: every command that writes calls it before writing, so that
  an output that is (or resolves to, through links or ``..``) one of its inputs is refused
  instead of replacing the data it was reading.
"""

from __future__ import annotations

import os
import stat
from typing import Final

from mettaformat.errors import FormatError, WriteError

__all__ = ["open_regular", "read_regular", "refuse_overwriting_input"]

_KINDS: Final = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "something else")


def open_regular(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading; return the descriptor (blocking mode) and its stat.

    Raises:
        FormatError: ``path`` is a directory, FIFO, device or socket.
        OSError: it cannot be opened.
    """
    # A directory opens fine read-only on POSIX; it is refused by the fstat below like a FIFO.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{os.fspath(path)} is {_kind(st.st_mode)}, not a regular file", region="file")
        os.set_blocking(fd, True)  # regular files ignore the flag; later reads are plain reads
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_regular(path: str | os.PathLike[str]) -> bytearray:
    """The whole content of the regular file ``path`` (its size as of opening it).

    Raises:
        FormatError: not a regular file, or it changed size while being read.
        OSError: it cannot be read.
    """
    fd, st = open_regular(path)
    try:
        buf = bytearray(st.st_size)
        view = memoryview(buf)
        done = 0
        while done < st.st_size:
            n = os.readv(fd, [view[done:]])
            if n == 0:
                break
            done += n
        if done != st.st_size or os.pread(fd, 1, st.st_size):
            raise FormatError(f"{os.fspath(path)} changed size while being read", region="file")
    finally:
        os.close(fd)
    return buf


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting_input(
    output: str | os.PathLike[str], *inputs: str | os.PathLike[str], command: str = "this command"
) -> None:
    """Refuse to write ``output`` when it is, or resolves to, one of ``inputs``.

    Raises:
        WriteError: the output would replace an input.
    """
    for source in inputs:
        if _same_file(output, source):
            raise WriteError(
                f"{command} never overwrites its input: refusing to overwrite the source {os.fspath(source)} "
                f"(the output {os.fspath(output)} is that file); write elsewhere"
            )
