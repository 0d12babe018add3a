"""Real servers on the loopback interface for the remote tests, the docs' examples and the benchmark.

- :class:`RangeServer`: a small aiohttp server for objects held in memory. It honours ``Range``,
  ``If-Match`` and ``ETag``, counts the requests and body bytes it serves, and injects faults
  (a dropped connection mid-reply, a truncated reply, 403, 500) on request.
- :func:`moto_s3`: moto's S3 in server mode on a free port, reached by s3fs over real HTTP.
- :func:`gcs_emulator`: a Google Cloud Storage emulator (``gcp-storage-emulator``) on a free
  port, reached by gcsfs over real HTTP (``STORAGE_EMULATOR_HOST``).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RangeServer", "free_port", "gcs_emulator", "moto_s3"]


def _wait_for_port(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the S3 server did not start on port {port}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class _Fault:
    kind: str  # "drop", "truncate", "403", "500", "replace"
    times: float  # how many requests it applies to
    replacement: bytes = b""


@dataclass
class RangeServer:
    objects: dict[str, bytes | Path] = field(default_factory=dict)  # in memory, or served from a file
    requests: int = 0
    bytes_sent: int = 0
    log: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, name, range)
    faults: dict[str, _Fault] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None

    # -- control ------------------------------------------------------------------------------------
    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = self.bytes_sent = 0
            self.log.clear()

    def fault(self, name: str, kind: str, times: float = float("inf"), replacement: bytes = b"") -> None:
        """Make the next ``times`` GETs of ``name`` fail as ``kind`` ("replace": swap the object
        for ``replacement`` just before serving)."""
        self.faults[name] = _Fault(kind, times, replacement)

    @staticmethod
    def etag(data: bytes | Path) -> str:
        if isinstance(data, Path):
            st = data.stat()
            return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'
        return '"' + hashlib.sha1(data).hexdigest()[:20] + '"'

    @staticmethod
    def _slice(data: bytes | Path, start: int, end: int) -> bytes:
        if isinstance(data, Path):
            with data.open("rb") as f:
                f.seek(start)
                return f.read(end - start)
        return data[start:end]

    # -- serving ------------------------------------------------------------------------------------
    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        name = request.match_info["name"]
        rng = request.headers.get("Range")
        with self._lock:
            self.requests += 1
            self.log.append((request.method, name, rng))
            fault = self.faults.get(name)
            if fault is not None and request.method == "GET" and fault.times > 0:
                fault.times -= 1
            else:
                fault = None
            if fault is not None and fault.kind == "replace":
                self.objects[name] = fault.replacement
                fault = None
        if fault is not None and fault.kind in ("403", "500"):
            return web.Response(status=int(fault.kind), text="refused")
        data = self.objects.get(name)
        if data is None:
            return web.Response(status=404, text="no such object")
        etag = self.etag(data)
        size = data.stat().st_size if isinstance(data, Path) else len(data)
        if request.headers.get("If-Match") not in (None, "*", etag):
            return web.Response(status=412, text="precondition failed")
        headers = {"ETag": etag, "Accept-Ranges": "bytes"}
        if request.method == "HEAD":
            return web.Response(headers={**headers, "Content-Length": str(size)})
        status, start, end = 200, 0, size
        if rng is not None:
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last) + 1 if last else size, size)
            if start >= size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        body = self._slice(data, start, end)
        if fault is not None and fault.kind == "drop":
            resp = web.StreamResponse(status=status, headers={**headers, "Content-Length": str(len(body))})
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            with self._lock:
                self.bytes_sent += len(body) // 2
            request.transport.close()
            return resp
        if fault is not None and fault.kind == "truncate":
            body = body[: len(body) // 2]  # a consistent but short reply
        with self._lock:
            self.bytes_sent += len(body)
        return web.Response(status=status, body=body, headers=headers)

    def start(self) -> RangeServer:
        from aiohttp import web

        ready = threading.Event()
        self.port = free_port()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_route("GET", "/{name:.*}", self._handle)
            app.router.add_route("HEAD", "/{name:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port)
            loop.run_until_complete(site.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="range-server", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the loopback HTTP server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


@contextmanager
def moto_s3(bucket: str = "policies", *, own_process: bool = False) -> Iterator[str]:
    """Start moto's S3 server on loopback; point s3fs at it (environment); yield ``s3://bucket``.

    ``own_process`` runs the server as a separate process (as a real one is: it then does not
    share this interpreter's lock with the client); the tests use a thread, which starts faster.
    """
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    port = free_port()
    server: Any
    if own_process:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(port)
    else:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
    )
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        fs = s3fs.S3FileSystem()
        fs.mkdir(bucket)
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        _restore_environment(saved)
        if own_process:
            server.terminate()
            server.wait(10)
        else:
            server.stop()


def _restore_environment(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_S3_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
)


@contextmanager
def gcs_emulator(bucket: str = "policies") -> Iterator[str]:
    """Start a GCS emulator on loopback; point gcsfs at it (environment); yield ``gs://bucket``."""
    # gcsfs's default class first asks a gRPC control API for the bucket's type, which the
    # emulator does not serve (a minute's timeout per bucket); the plain JSON API class does not.
    saved = {k: os.environ.get(k) for k in _GCS_ENV}
    os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
    import gcsfs
    from gcp_storage_emulator.server import create_server

    if gcsfs.GCSFileSystem.__name__ != "GCSFileSystem":
        raise RuntimeError("gcsfs was imported before the emulator fixture chose its plain filesystem class")
    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    gcsfs.GCSFileSystem.clear_instance_cache()
    try:
        yield f"gs://{bucket}"
    finally:
        gcsfs.GCSFileSystem.clear_instance_cache()
        _restore_environment(saved)
        server.stop()


_GCS_ENV = ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "STORAGE_EMULATOR_HOST")
