"""Writing to a URI: the file is built locally, then uploaded so that it appears whole or not at all.

S3 and GCS publish an object only when its upload completes (one PUT, or a multipart upload
that is completed at the end), so the file is uploaded straight to its final key. Other
writable filesystems get a temporary key (``*.mfmt-tmp``, which listings skip) that is then
moved over the final name. An upload that fails leaves the previous object untouched.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

from mettaformat._atomic import TEMP_SUFFIX
from mettaformat.errors import RemoteError
from mettaformat.remote.transport import call
from mettaformat.remote.uri import filesystem

__all__ = ["delete_object", "upload_atomically", "upload_file"]

#: Stores whose uploads are atomic at the final key.
_ATOMIC_PUT: Final = frozenset({"s3", "s3a", "gs", "gcs"})


def _protocols(fs: Any) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


@contextmanager
def upload_atomically(uri: str) -> Iterator[int]:
    """Yield a file descriptor of a local temp file; upload it to ``uri`` when the block succeeds.

    Raises:
        RemoteError subclasses naming the URI (nothing is left visible under ``uri`` or a temp key).
    """
    fs, path = filesystem(uri)
    if _protocols(fs) & {"http", "https"}:
        raise RemoteError("http(s) URLs are read-only; save to s3://, gs:// or a path", uri=uri)
    fd, local = tempfile.mkstemp(suffix=TEMP_SUFFIX)
    try:
        try:
            yield fd
        finally:
            os.close(fd)
        _publish(fs, path, local, uri)
    finally:
        os.unlink(local)


def upload_file(local: str | os.PathLike[str], uri: str) -> None:
    """Upload a finished local file to ``uri``, visible only once complete (as :func:`upload_atomically`)."""
    fs, path = filesystem(uri)
    if _protocols(fs) & {"http", "https"}:
        raise RemoteError("http(s) URLs are read-only; save to s3://, gs:// or a path", uri=uri)
    _publish(fs, path, os.fspath(local), uri)


def _publish(fs: Any, path: str, local: str, uri: str) -> None:
    if _protocols(fs) & _ATOMIC_PUT:
        call(lambda: fs.put_file(local, path), uri, "uploading")
        return
    head, _, name = path.rpartition("/")
    temp = f"{head}/.{name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}" if head else f".{name}{TEMP_SUFFIX}"
    try:
        call(lambda: fs.put_file(local, temp), uri, "uploading")
        call(lambda: fs.mv(temp, path), uri, "moving the upload into place")
    except (RemoteError, NotImplementedError) as e:
        try:
            fs.rm_file(temp)
        except Exception:  # best effort: the temp key may not exist
            pass
        if isinstance(e, NotImplementedError):
            raise RemoteError("this filesystem cannot be written to", uri=uri) from None
        raise


def delete_object(uri: str) -> None:
    """Delete one object (a missing one raises :class:`RemoteNotFoundError`)."""
    fs, path = filesystem(uri)
    call(lambda: fs.rm_file(path), uri, "deleting")
