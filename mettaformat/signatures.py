"""Which checkpoint format a file is, from its first bytes, without importing torch.

The first bytes decide, and only one parser ever sees a file (no fall-through from one parser
to the next, which is how format confusion attacks work):

- ``MFMT_MAGIC``: a mettaformat container;
- ``PK\\x03\\x04`` or the pickled torch legacy magic: a legacy torch checkpoint, imported by the
  safe importer (nothing in it is executed);
- a little-endian length followed by ``{``: a ``.safetensors`` file;
- a directory with a DCP commit file (ours or torch's ``.metadata``): a distributed checkpoint.
"""

from __future__ import annotations

import os
import struct
from typing import Final, Literal

from mettaformat._files import open_regular
from mettaformat.constants import MAX_STREAM_HEADER_SIZE, MFMT_MAGIC
from mettaformat.errors import FormatError
from mettaformat.remote.uri import is_remote_uri

__all__ = ["FormatName", "format_of", "sniff_format"]

FormatName = Literal["mettaformat", "torch-zip", "torch-legacy-stream", "safetensors", "dcp", "torch-dcp"]
_SNIFF_BYTES: Final = 64


def sniff_format(path: str | os.PathLike[str]) -> FormatName:
    """Name the format of ``path`` from its first bytes.

    Raises:
        FormatError: no known signature matches.
    """
    if is_remote_uri(path):
        from mettaformat.remote.formats import sniff_remote

        return sniff_remote(os.fspath(path))
    if os.path.isdir(path):  # a distributed checkpoint directory (ours or torch's)
        from mettaformat.dcp.consolidate import sniff_dcp

        dcp_kind = sniff_dcp(path)
        if dcp_kind is not None:
            return dcp_kind
    fd, st = open_regular(path)
    try:
        head = os.pread(fd, _SNIFF_BYTES, 0)
        size = st.st_size
    finally:
        os.close(fd)
    return format_of(head, size, path)


def format_of(head: bytes, size: int, path: str | os.PathLike[str]) -> FormatName:
    """Name the format of a file of ``size`` bytes starting with ``head`` (its first 64 bytes or all)."""
    if head.startswith(MFMT_MAGIC):
        return "mettaformat"
    from mettaformat.legacy import sniff as sniff_legacy  # imports torch: containers do without

    legacy = sniff_legacy(head)
    if legacy is not None:
        return legacy
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack_from("<Q", head)
        if 2 <= n <= MAX_STREAM_HEADER_SIZE and n + 8 <= size:
            return "safetensors"
    raise FormatError(
        f"{path}: not a checkpoint format mettaformat knows (first bytes {head[:8]!r})", region="signature", offset=0
    )
