"""Checkpoints in object storage and over HTTP, read lazily by range (through fsspec).

Every function that takes a path also takes a URI: ``mettaformat.open("s3://bucket/run/model.mfmt")``
reads the preamble and header in one range request, then each tensor's own byte range when it
is asked for; ``load_file`` fetches ranges in parallel straight into the tensors. Writes upload
a complete file before it becomes visible under its final name. See ``docs/guide.md``.
"""

from __future__ import annotations

from mettaformat.remote.cache import RangeCache, default_cache, use_cache
from mettaformat.remote.source import RemoteSource
from mettaformat.remote.uri import is_remote_uri

__all__ = ["RangeCache", "RemoteSource", "default_cache", "is_remote_uri", "use_cache"]
