"""Range requests through fsspec: version pinning, retries with backoff, and errors that name the URI.

Every read of one object version is pinned to the ETag (or generation) seen when it was opened:
HTTP sends ``If-Match``, S3 sends ``IfMatch``; a server that answers "precondition failed" means
the object was replaced, which is a :class:`RemoteChangedError`, never a retry. Where the backend
cannot pin a read, the per-tensor checksums of the header read at open still reject bytes of
another version.

Transient failures (a dropped connection, a truncated or short reply, 5xx, 429, timeouts) are
retried with exponential backoff; reads are idempotent, so retrying is always safe. Anything
else becomes the matching :class:`RemoteError` subclass at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

from mettaformat.errors import (
    MettaFormatError,
    RemoteAccessError,
    RemoteChangedError,
    RemoteError,
    RemoteNotFoundError,
    RemoteTransferError,
)

__all__ = [
    "ATTEMPTS",
    "STATS",
    "ObjectVersion",
    "TransferStats",
    "call",
    "conditional_writes",
    "fetch_range",
    "fresh_info",
    "get_versioned",
    "put_if_unchanged",
    "stat_object",
    "translate",
]

#: Tries per request (the first included) before a transient failure is reported.
ATTEMPTS: Final = 4
#: Seconds before the first retry; doubled each time.
BACKOFF_S: list[float] = [0.05]

T = TypeVar("T")


class _Transient(Exception):
    """A failure worth retrying (internal)."""


class ObjectVersion:
    """What identifies the version of an object that a reader pinned at open: size and ETag."""

    __slots__ = ("etag", "size")

    def __init__(self, size: int, etag: str | None) -> None:
        self.size, self.etag = size, etag


def _status(e: BaseException) -> int | None:
    status = getattr(e, "status", None)  # aiohttp replies; not `code` (a parse error has code 400)
    if isinstance(status, int):
        return status
    response = getattr(e, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata") or {}
        code = meta.get("HTTPStatusCode")
        if isinstance(code, int):
            return code
        err = response.get("Error") or {}
        if err.get("Code") in ("PreconditionFailed", "412"):
            return 412
    return None


def _chain(e: BaseException) -> list[BaseException]:
    out, seen = [], set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        out.append(cur)
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return out


def translate(e: BaseException, uri: str, what: str) -> RemoteError | _Transient:
    """The :class:`RemoteError` for a backend exception, or :class:`_Transient` when a retry may help."""
    chain = _chain(e)
    for cause in chain:
        status = _status(cause)
        text = str(cause)
        if status == 412 or "PreconditionFailed" in text or "Precondition Failed" in text:
            return RemoteChangedError(f"the object changed while it was being read ({what})", uri=uri)
        if status == 409 and "ConditionalRequestConflict" in text:  # a concurrent conditional write won
            return RemoteChangedError(f"the object changed while it was being read ({what})", uri=uri)
        if status == 404 or isinstance(cause, FileNotFoundError):
            return RemoteNotFoundError(f"no such object ({what})", uri=uri)
        if status in (401, 403) or isinstance(cause, PermissionError):
            return RemoteAccessError(f"access denied ({what})", uri=uri)
        if status is not None and (status >= 500 or status == 429):
            return _Transient(f"server error {status}")
        if status is not None and status >= 400:
            return RemoteTransferError(f"server answered {status} ({what})", uri=uri)
    # Connection resets, payload errors, timeouts, botocore streaming errors: all transient.
    return _Transient(f"{type(e).__name__}: {e}")


class TransferStats:
    """Requests sent and range bytes received by this process (for benchmarks and diagnostics)."""

    def __init__(self) -> None:
        self.requests = self.bytes = 0
        self._lock = threading.Lock()

    def add(self, requests: int, nbytes: int) -> None:
        with self._lock:
            self.requests += requests
            self.bytes += nbytes

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.requests, self.bytes


#: Totals of every request made through :func:`call`.
STATS = TransferStats()


def call(fn: Callable[[], T], uri: str, what: str) -> T:
    """Run one request with retries; backend exceptions become :class:`RemoteError` naming ``uri``."""
    delay = BACKOFF_S[0]
    last = ""
    for attempt in range(ATTEMPTS):
        STATS.add(1, 0)
        try:
            return fn()
        except MettaFormatError:
            raise
        except (Exception, asyncio.CancelledError) as e:  # every backend error is translated
            outcome = translate(e, uri, what)
            if isinstance(outcome, RemoteError):
                raise outcome from e
            last = str(outcome)
        if attempt + 1 < ATTEMPTS:
            time.sleep(delay)
            delay *= 2
    raise RemoteTransferError(f"{what} failed after {ATTEMPTS} attempts: {last}", uri=uri)


def fresh_info(fs: Any, path: str, uri: str, what: str) -> dict[str, Any]:
    """The object's metadata from the server now: fsspec answers ``info`` from an earlier
    listing when it has one, which would hide a change made since by another process."""
    fs.invalidate_cache(path)
    info: dict[str, Any] = call(lambda: fs.info(path), uri, what)
    return info


def stat_object(fs: Any, path: str, uri: str) -> ObjectVersion:
    """Size and ETag (or generation) of the object, from one metadata request."""
    info = fresh_info(fs, path, uri, "reading its size")
    if info.get("type") == "directory":
        raise RemoteNotFoundError("is a directory, not an object", uri=uri)
    size = info.get("size")
    if not isinstance(size, int):
        raise RemoteTransferError("the server did not report the object's size", uri=uri)
    return ObjectVersion(size, version_tag(info))


def version_tag(info: dict[str, Any]) -> str | None:
    for key in ("ETag", "etag", "generation", "VersionId"):
        value = info.get(key)
        if value:
            return str(value)
    return None


def _pinned_read(fs: Any, path: str, start: int, end: int, etag: str | None) -> bytes:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if etag is not None and protocol in ("http", "https"):
        data: bytes = fs.cat_file(path, start=start, end=end, headers={"If-Match": etag})
        return data
    if etag is not None and protocol in ("s3", "s3a") and hasattr(fs, "_call_s3"):
        return _s3_pinned_read(fs, path, start, end, etag)
    data = fs.cat_file(path, start=start, end=end)
    return data


def _s3_pinned_read(fs: Any, path: str, start: int, end: int, etag: str) -> bytes:
    from fsspec.asyn import sync

    bucket, key, version = fs.split_path(path)

    async def get() -> bytes:
        extra = {"VersionId": version} if version else {}
        resp = await fs._call_s3(
            "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", IfMatch=etag, **extra
        )
        body = resp["Body"]
        try:
            data: bytes = await body.read()
        finally:
            body.close()
        return data

    result: bytes = sync(fs.loop, get)
    return result


def fetch_range(fs: Any, path: str, uri: str, start: int, end: int, version: ObjectVersion) -> bytes:
    """Bytes ``[start, end)`` of the pinned object version, retried; a short reply is a transient failure."""

    def once() -> bytes:
        data = _pinned_read(fs, path, start, end, version.etag)
        if len(data) != end - start:
            raise _Transient(f"reply of {len(data)} bytes for a {end - start}-byte range")
        STATS.add(0, len(data))
        return data

    return call(once, uri, f"bytes {start}-{end - 1}")


def _is_s3(fs: Any) -> bool:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    return bool(protocols & {"s3", "s3a"}) and hasattr(fs, "_call_s3")


def conditional_writes(fs: Any) -> bool:
    """Whether :func:`put_if_unchanged` is a real compare-and-swap on this filesystem (S3 only)."""
    return _is_s3(fs)


def get_versioned(fs: Any, path: str, uri: str, max_bytes: int) -> tuple[bytes, str | None] | None:
    """The whole object and its ETag (one GET on S3), or None when it does not exist.

    Raises:
        RemoteTransferError: the object is larger than ``max_bytes``.
        RemoteError: the read failed.
    """
    if not _is_s3(fs):
        try:
            version = stat_object(fs, path, uri)
        except RemoteNotFoundError:
            return None
        if version.size > max_bytes:
            raise RemoteTransferError(f"{version.size} bytes, above the {max_bytes}-byte limit", uri=uri)
        return fetch_range(fs, path, uri, 0, version.size, version) if version.size else b"", version.etag
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[bytes, str | None]:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        body = resp["Body"]
        try:
            if resp.get("ContentLength", 0) > max_bytes:
                raise RemoteTransferError(f"{resp['ContentLength']} bytes, above the {max_bytes}-byte limit", uri=uri)
            data: bytes = await body.read()
        finally:
            body.close()
        if len(data) != resp.get("ContentLength", len(data)):
            raise _Transient(f"reply of {len(data)} of {resp['ContentLength']} bytes")
        STATS.add(0, len(data))
        return data, resp.get("ETag")

    try:
        result: tuple[bytes, str | None] = call(lambda: sync(fs.loop, get), uri, "reading")
    except RemoteNotFoundError:
        return None
    return result


def put_if_unchanged(fs: Any, path: str, uri: str, data: bytes, etag: str | None) -> bool:
    """Write ``data`` only if the object still has ``etag`` (``None``: only if it does not exist).

    Returns False when another writer got there first. Only S3 checks the condition
    (:func:`conditional_writes`); elsewhere the write is a plain atomic upload.
    """
    if not _is_s3(fs):
        from mettaformat.container.codecs.base import pwrite_all
        from mettaformat.remote.upload import upload_atomically

        with upload_atomically(uri) as fd:
            pwrite_all(fd, data, 0)
        return True
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)
    condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}

    async def put() -> None:
        await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)

    try:
        call(lambda: sync(fs.loop, put), uri, "writing")
    except RemoteChangedError:
        return False
    except RemoteNotFoundError:  # If-Match on an object deleted meanwhile
        return False
    return True
