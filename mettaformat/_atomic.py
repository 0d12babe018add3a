"""Atomic file replacement: write a sibling temp file, then rename over the target.

A crash at any point leaves either the previous file or the complete new one at the target
path. The temp file lives in the target's directory because a rename is only atomic (and
only cheap) within one file system.

Without ``durable``, a large old version is swapped with the new file in one atomic exchange
(``renameat2(RENAME_EXCHANGE)``, Linux) and deleted in the background. A plain rename over an
existing file makes ext4 start writing the new file back inside the rename (its guard for
programs that never fsync) and frees the old blocks there too: a quarter second per 512 MiB
measured here, more than half of a save. Readers see the old file or the new one either way; only
``durable=True`` promises the new one survives a power loss. A process killed between the swap
and the deletion leaves the old version under a temp name, cleaned like any leftover.

A write may reuse an existing file the caller no longer needs (``reuse=``): it is renamed to the temp
name and overwritten in place instead of creating a new one. On file systems that discard freed
blocks online (ext4 ``discard``), writing fresh blocks and freeing old ones makes the next fsync wait
for the discards: 256 MiB took 1.6-1.9 s that way here, against 0.3 s overwriting existing blocks.
The reused file is claimed with a non-blocking exclusive ``flock``; a reader that maps it holds a
shared one, and then a new file is written instead.

A durable write keeps the disk busy while the file is being written (``sync_file_range``, Linux):
otherwise the kernel holds every page in memory until the fsync, which then waits for the whole
file instead of its last few milliseconds.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

try:
    import fcntl
except ImportError:  # not a POSIX system: files are never reused
    fcntl = None  # type: ignore[assignment]

from mettaformat._pool import shared_pool
from mettaformat.errors import MettaFormatError, WriteError

__all__ = ["TEMP_SUFFIX", "atomic_fd", "fsync_dir", "is_temp_file", "remove_file"]

#: Suffix of in-progress files; readers never list them and the store cleans leftovers.
TEMP_SUFFIX: Final = ".mfmt-tmp"
#: Old versions at least this large are released in the background.
_RELEASE_IN_BACKGROUND: Final = 64 << 20


def is_temp_file(path: str | os.PathLike[str]) -> bool:
    return os.fspath(path).endswith(TEMP_SUFFIX)


@contextmanager
def atomic_fd(
    path: str | os.PathLike[str],
    *,
    durable: bool = False,
    sync_dir: bool = True,
    reuse: str | os.PathLike[str] | None = None,
) -> Iterator[int]:
    """Yield a file descriptor whose content replaces ``path`` when the block succeeds.

    With ``durable``, the file is fsynced before the rename and the directory after it, so the new
    version survives a power loss; without, the replacement is atomic but not yet on disk.
    ``sync_dir=False`` leaves the directory to the caller, who writes several files into it and
    syncs it once (before anything that names them is committed).

    ``reuse`` names a file in the same directory whose content is no longer needed: when nobody
    holds a lock on it, it becomes the temp file and the block overwrites it from offset 0 (the
    caller truncates it to the new length); otherwise, or if it is gone, a new temp file is
    created. The claim's exclusive lock lasts until the file is closed, after the block.

    Raises:
        WriteError: the temp file cannot be created, or an OSError happened while writing,
            syncing or renaming. The temp file is removed and ``path`` is untouched.
    """
    from mettaformat.remote.uri import is_remote_uri  # local: remote imports this module

    if is_remote_uri(path):
        from mettaformat.remote.upload import upload_atomically

        with upload_atomically(os.fspath(path)) as fd:
            yield fd
        return
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")
    fd = _claim(Path(reuse), tmp) if reuse is not None else -1
    if fd < 0:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            raise WriteError(f"cannot create a temp file beside {target}: {e.strerror}") from e
    try:
        try:
            if durable:
                with _early_writeback(fd):
                    yield fd
                os.fsync(fd)
            else:
                yield fd
        finally:
            os.close(fd)
        if not durable and _large_regular_file(target) and _exchange(tmp, target):
            remove_file(tmp)  # now the old version
        else:
            os.replace(tmp, target)
    except BaseException as e:
        # Never leave a partial temp file, and never retry an fsync after EIO (fsyncgate).
        remove_file(tmp)
        if isinstance(e, MettaFormatError) or not isinstance(e, (OSError, ValueError, RuntimeError)):
            raise
        raise WriteError(f"saving {target} failed: {e}") from e
    if durable and sync_dir:
        fsync_dir(target.parent)


def _claim(old: Path, tmp: Path) -> int:
    """Open ``old`` for overwriting, lock it exclusively and rename it to ``tmp``; -1 (nothing
    changed) when it is missing, not a regular file, or locked by a reader."""
    if fcntl is None:
        return -1
    try:
        # O_NONBLOCK: opening a FIFO planted under that name fails instead of waiting for a reader
        fd = os.open(old, os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        st = os.fstat(fd)
        # still the file under that name (not replaced between open and lock), and an ordinary one
        if not stat.S_ISREG(st.st_mode) or not os.path.samestat(st, os.lstat(old)):
            raise OSError(errno.ESTALE, "replaced while being claimed")
        os.rename(old, tmp)
    except OSError:
        os.close(fd)
        return -1
    return fd


def remove_file(path: str | os.PathLike[str]) -> None:
    """Delete a file nobody needs any more; a large one in the background, since freeing its blocks
    can take longer than writing a small checkpoint (tens of milliseconds per 256 MiB, more with
    online discard). A missing file is fine: someone else removed it."""
    target = Path(path)
    if _large_regular_file(target):
        shared_pool().submit(target.unlink, missing_ok=True)
    else:
        target.unlink(missing_ok=True)


def _large_regular_file(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size >= _RELEASE_IN_BACKGROUND


_AT_FDCWD: Final = -100
_RENAME_EXCHANGE: Final = 2
_renameat2: Any = None
if sys.platform.startswith("linux"):
    try:
        _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names ``a`` and ``b``; False where the platform or file system cannot
    (then nothing happened)."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOENT, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


_SYNC_FILE_RANGE_WRITE: Final = 2  # start write-out of dirty pages; do not wait for it
#: How often a durable write hands the pages written so far to the disk.
_WRITEBACK_PERIOD_S: Final = 0.01
_sync_file_range: Any = None
if sys.platform.startswith("linux"):
    try:
        _sync_file_range = ctypes.CDLL(None, use_errno=True).sync_file_range
        _sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    except (OSError, AttributeError):
        _sync_file_range = None


@contextmanager
def _early_writeback(fd: int) -> Iterator[None]:
    """While the block writes ``fd``, start writing its dirty pages to disk every few milliseconds.

    Nothing here waits for the disk, and an error is raised at the end of the block (the fsync
    that follows would report it too)."""
    if _sync_file_range is None:
        yield
        return
    done = threading.Event()
    failed: list[int] = []

    def write_out() -> None:
        while not done.wait(_WRITEBACK_PERIOD_S):
            if _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE) != 0:
                failed.append(ctypes.get_errno())
                return

    thread = threading.Thread(target=write_out, name="mettaformat-writeback", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()  # before the caller closes fd
    if failed and failed[0] not in (errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP):
        raise OSError(failed[0], os.strerror(failed[0]))


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
