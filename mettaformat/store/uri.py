"""Where checkpoints are: URIs, scheme handlers and local file listing.

A URI is a plain path, ``file:///abs/path``, ``file://rel/path``, a directory or a glob. Other
schemes plug in through :func:`register_scheme`; a handler turns a URI into local files (a
remote handler downloads or mounts them first). Listing follows the hostile-input rules:

- only regular files are listed; symlinks met while scanning a directory or a glob are skipped
  (threat model FS1: a link may point at ``/dev/zero`` or a FIFO, and a link to a checkpoint would
  list it twice or let ``prune`` act on a file outside the directory);
- in-progress writes (``*.mfmt-tmp``, threat model FS2/WR5) and the store's index are never listed.

Framework-neutral (no torch).
"""

from __future__ import annotations

import glob
import os
import re
import stat
import threading
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Final, Protocol
from urllib.parse import unquote

from mettaformat._atomic import is_temp_file
from mettaformat.errors import StoreError

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "INDEX_FILE_NAME",
    "SchemeHandler",
    "check_file_name",
    "is_listable_name",
    "list_local",
    "local_path",
    "register_scheme",
    "registered_schemes",
    "resolve_uri",
    "split_scheme",
]

#: File names a directory scan lists (Metta wrote ``.pt``; the store writes ``.mfmt``).
CHECKPOINT_SUFFIXES: Final = (".mfmt", ".pt")
#: The store's per-directory index (see :mod:`mettaformat.store.index`).
INDEX_FILE_NAME: Final = ".mettaformat-index"

_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_GLOB_CHARS: Final = re.compile(r"[*?[]")


class SchemeHandler(Protocol):
    """Turns a URI of one scheme into local checkpoint files.

    ``list_files`` receives the whole URI (``s3://bucket/run/``) and returns the paths of local
    regular files holding its checkpoints, in any order. It raises :class:`StoreError` when the
    URI names nothing.
    """

    def list_files(self, uri: str) -> Sequence[Path]: ...


class _LocalFiles:
    """The handler for ``file://`` URIs."""

    def list_files(self, uri: str) -> Sequence[Path]:
        return list_local(local_path(uri))


_handlers: dict[str, SchemeHandler] = {"file": _LocalFiles()}
_lock = threading.Lock()


def register_scheme(scheme: str, handler: SchemeHandler, *, replace: bool = False) -> None:
    """Make ``scheme://...`` URIs resolve through ``handler``.

    Args:
        scheme: the scheme name (``"s3"``, ``"wandb"``); case-insensitive.
        handler: an object with ``list_files(uri) -> Sequence[Path]``.
        replace: allow replacing an existing handler (``file`` included).

    Raises:
        ValueError: an invalid scheme name, a handler without ``list_files``, or a scheme
            already registered without ``replace``.
    """
    if not isinstance(scheme, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ValueError(f"invalid URI scheme name {scheme!r}")
    if not callable(getattr(handler, "list_files", None)):
        raise ValueError("a scheme handler needs a list_files(uri) method")
    key = scheme.lower()
    with _lock:
        if key in _handlers and not replace:
            raise ValueError(f"URI scheme {key!r} is already registered (pass replace=True to override)")
        _handlers[key] = handler


def registered_schemes() -> list[str]:
    with _lock:
        return sorted(_handlers)


def split_scheme(uri: str) -> tuple[str | None, str]:
    """``("file", "/abs")`` for ``file:///abs``; ``(None, uri)`` for a plain path."""
    m = _SCHEME.match(uri)
    if m is None:
        return None, uri
    return m.group(1).lower(), uri[m.end() :]


def local_path(uri: str | os.PathLike[str]) -> Path:
    """The local path of a plain path or ``file://`` URI.

    ``file:///abs`` and ``file://localhost/abs`` are absolute; ``file://rel/path`` is relative
    to the working directory (Metta wrote such URIs). Percent-escapes are decoded, as in the
    URIs :meth:`pathlib.Path.as_uri` produces.

    Raises:
        StoreError: another scheme, or an empty path.
    """
    text = os.fspath(uri)
    scheme, rest = split_scheme(text)
    if scheme is not None:
        if scheme != "file":
            raise StoreError(f"{text!r} is not a local path or file:// URI")
        rest = unquote(rest)
        if rest.startswith("localhost/"):
            rest = rest[len("localhost") :]
    if not rest or "\0" in rest:
        raise StoreError(f"invalid path in {text!r}")
    return Path(rest)


def resolve_uri(uri: str | os.PathLike[str]) -> list[Path]:
    """The checkpoint files a URI names, through its scheme's handler.

    Raises:
        StoreError: an unknown scheme (the message lists the registered ones), or a path that
            does not exist.
    """
    text = os.fspath(uri)
    scheme, _ = split_scheme(text)
    if scheme is None:
        return list_local(Path(text))
    with _lock:
        handler = _handlers.get(scheme)
    if handler is None:
        raise StoreError(
            f"unknown URI scheme {scheme!r} in {text!r}; registered schemes: {', '.join(registered_schemes())} "
            "(add one with mettaformat.store.register_scheme)"
        )
    return list(handler.list_files(text))


def is_listable_name(name: str) -> bool:
    """A name a directory scan lists: a checkpoint suffix, not hidden, not a temp file or the index."""
    return (
        name.endswith(CHECKPOINT_SUFFIXES)
        and not name.startswith(".")
        and not is_temp_file(name)
        and name != INDEX_FILE_NAME
    )


def _is_regular_no_follow(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def list_local(path: Path) -> list[Path]:
    """Checkpoint files under a local path: a file, a directory (not recursive) or a glob.

    An explicitly named file may be a symlink to a regular file (its target is returned); a
    directory scan or a glob lists regular files only.

    Raises:
        StoreError: the path does not exist (and is not a glob), or names something other than
            a regular file or a directory (a FIFO, a device, a dangling link).
    """
    text = os.fspath(path)
    try:
        st = os.stat(text)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise StoreError(f"cannot access {text}: {e.strerror}") from e
    if st is None:
        if not _GLOB_CHARS.search(text):
            raise StoreError(f"No policy records found at {text}: no such file or directory")
        matches = sorted(glob.glob(text))
        return [
            Path(os.path.abspath(m))
            for m in matches
            if _is_regular_no_follow(m) and not is_temp_file(m) and os.path.basename(m) != INDEX_FILE_NAME
        ]
    if stat.S_ISDIR(st.st_mode):
        names: list[str] = []
        with os.scandir(text) as entries:
            for entry in entries:
                # is_file(follow_symlinks=False) is False for links, FIFOs and devices.
                if is_listable_name(entry.name) and entry.is_file(follow_symlinks=False):
                    names.append(entry.name)
        directory = Path(os.path.abspath(text))
        return [directory / name for name in sorted(names)]  # sorting strs, not Paths: same order, faster
    if stat.S_ISREG(st.st_mode):
        if is_temp_file(text):
            raise StoreError(f"{text} is an incomplete checkpoint (a write in progress or left by a crash)")
        return [Path(os.path.realpath(text))]
    raise StoreError(f"{text} is not a regular file or a directory")


def check_file_name(name: str) -> str:
    """Validate a checkpoint file name given to ``save``: one plain path component.

    Raises:
        StoreError: an empty name, separators, ``..``, a drive or absolute path, NUL, or a
            temp/index name.
    """
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (
        not name
        or "\0" in name
        or name in (".", "..")
        or len(posix.parts) != 1
        or len(windows.parts) != 1
        or windows.drive
        or posix.is_absolute()
        or windows.is_absolute()
    ):
        raise StoreError(f"invalid checkpoint name {name!r}: it must be a plain file name, without directories")
    if is_temp_file(name) or name == INDEX_FILE_NAME:
        raise StoreError(f"invalid checkpoint name {name!r}: reserved for the store's own files")
    return name
