"""Which paths are remote, and the fsspec filesystem that serves a URI.

A plain path or a ``file://`` URI is local (read through the memory-mapped path). Any other
``scheme://`` URI is served by fsspec: ``s3://`` through s3fs, ``gs://`` through gcsfs,
``http(s)://`` through aiohttp, and any other protocol fsspec has installed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

from mettaformat.errors import RemoteUnavailableError

__all__ = ["filesystem", "fsspec_knows", "is_remote_uri", "join_uri", "local_file", "size_of"]

_SCHEME: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
#: The extra that installs each scheme's fsspec backend.
_EXTRAS: Final = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "http": "http", "https": "http"}


def is_remote_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` with any scheme but ``file``."""
    if not isinstance(path, str):
        return False
    m = _SCHEME.match(path)
    return m is not None and m.group(1).lower() != "file"


def fsspec_knows(uri: str) -> bool:
    """True for a remote URI whose scheme fsspec implements (or could, once fsspec is installed)."""
    if not is_remote_uri(uri):
        return False
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:
        return True  # reading it will then say which package to install
    scheme = uri.split("://", 1)[0].lower()
    return scheme in known_implementations or scheme in registry


def local_file(path: str | os.PathLike[str]) -> Path:
    """The local path of a plain path or a ``file://`` URI (``file:///abs``, ``file://localhost/abs``)."""
    text = os.fspath(path)
    if text[:7].lower() == "file://":
        text = unquote(text[7:])
        if text.startswith("localhost/"):
            text = text[len("localhost") :]
    return Path(text)


def filesystem(uri: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path within it)`` for ``uri``; instances are shared (fsspec caches them).

    Options for the backend come from fsspec's configuration (``FSSPEC_S3_ENDPOINT_URL``...)
    and the backend's own environment (``AWS_*`` for s3fs).

    Raises:
        RemoteUnavailableError: fsspec or the scheme's backend is not installed.
    """
    scheme = uri.split("://", 1)[0].lower()
    extra = _EXTRAS.get(scheme)
    hint = f" (pip install 'mettaformat[{extra}]')" if extra else ""
    try:
        import fsspec.core
    except ImportError:
        raise RemoteUnavailableError(f"reading {scheme}:// URIs needs fsspec{hint}", uri=uri) from None
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise RemoteUnavailableError(f"no fsspec backend for {scheme}://{hint}: {e}", uri=uri) from None
    return fs, path


def join_uri(base: str, name: str) -> str:
    """``base`` (a "directory" URI) joined with one file name."""
    return base.rstrip("/") + "/" + name


def size_of(path: str | os.PathLike[str]) -> int:
    """The size of a local file, or of a remote object (one metadata request)."""
    if is_remote_uri(path):
        from mettaformat.remote.transport import stat_object

        fs, fs_path = filesystem(os.fspath(path))
        return stat_object(fs, fs_path, os.fspath(path)).size
    return os.path.getsize(path)
