"""An opened container's checked structure: preamble, header and trailer tail, without torch.

Opening reads three small regions: the preamble, the header and the trailer tail (a remote
object reads the tail later, when something needs it, so that opening costs one request), and
checks that they agree with each other and with the file's size. Tools that only describe a
file (``mettaformat inspect``) stop here and never pay for importing torch;
:class:`~mettaformat.container.reader.LazyCheckpoint` builds tensor reading on top.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

from mettaformat.constants import MFMT_DEFAULT_ALIGNMENT, MFMT_VERSION_MINOR, PREAMBLE_SIZE, TRAILER_TAIL_SIZE
from mettaformat.container.header import parse_header, parse_header_metadata
from mettaformat.container.layout import Preamble, TrailerTail, checksum
from mettaformat.container.source import ByteSource, open_source
from mettaformat.container.tree import decode_tree
from mettaformat.errors import HeaderError, IntegrityError, LayoutError, naming_file

__all__ = ["CHECKPOINT_KEY", "MAX_PADDING", "ContainerFile", "names_file", "read_metadata", "split_metadata"]

#: Zero padding allowed between regions (alignment plus the header's reserved space).
MAX_PADDING: Final = 1 << 20
#: The reserved metadata key holding the checkpoint's own fields.
CHECKPOINT_KEY: Final = "mettaformat.checkpoint"

_Self = TypeVar("_Self", bound="ContainerFile")
_P = ParamSpec("_P")
_R = TypeVar("_R")


def names_file(method: Callable[Concatenate[_Self, _P], _R]) -> Callable[Concatenate[_Self, _P], _R]:
    """Errors raised while reading an open container name its path (and suggest repair)."""

    @functools.wraps(method)
    def wrapper(self: _Self, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with naming_file(self.path, container=True):
            return method(self, *args, **kwargs)

    return wrapper


class ContainerFile:
    """An open container whose preamble, header and region layout have been checked.

    Raises (at construction):
        LayoutError, IntegrityError, HeaderError: the regions read do not describe a valid
            container (the error names the file).
    """

    def __init__(self, path: str | os.PathLike[str] | ByteSource) -> None:
        self._src = open_source(path)
        #: the local file, or the URI of a remote object
        self.path: Path | str = getattr(self._src, "path", self._src.name)
        try:
            with naming_file(self.path, container=True):
                self._open()
        except BaseException:
            self._src.close()
            raise

    @property
    def _fd(self) -> int:
        """The local file's descriptor (-1 once closed, and for remote objects)."""
        return self._src.fd

    def _pread(self, length: int, offset: int, region: str) -> bytes:
        return self._src.read(offset, length, region)

    def _open(self) -> None:
        self.file_size = size = self._src.size
        self._identity = self._src.identity()
        preamble = Preamble.unpack(self._pread(min(size, PREAMBLE_SIZE), 0, "preamble"), size)
        self.preamble = preamble
        self._tail: TrailerTail | None = None
        if self._src.has(size - TRAILER_TAIL_SIZE, TRAILER_TAIL_SIZE):
            self._tail = TrailerTail.unpack(self._pread(TRAILER_TAIL_SIZE, size - TRAILER_TAIL_SIZE, "trailer"), size)
        header_bytes = self._pread(preamble.header_length, PREAMBLE_SIZE, "header")
        _check_header_checksum(preamble, header_bytes)
        self.header = parse_header(header_bytes)
        _check_file_length(self.header.file_length, size)
        self._check_regions(PREAMBLE_SIZE + preamble.header_length)
        if preamble.minor > MFMT_VERSION_MINOR:
            warnings.warn(
                f"{self.path} uses format 3.{preamble.minor}, newer than this reader's "
                f"3.{MFMT_VERSION_MINOR}; fields added since are ignored",
                stacklevel=4,  # the code that constructed the LazyCheckpoint
            )

    def _check_regions(self, header_end: int) -> None:
        """Sections are aligned, ordered, non-overlapping, and separated only by bounded padding."""
        position = header_end
        for s in sorted(self.header.sections, key=lambda s: s.offset):
            region = f"section {s.name!r}"
            if s.offset % MFMT_DEFAULT_ALIGNMENT:
                raise LayoutError(f"offset {s.offset} is not aligned to {MFMT_DEFAULT_ALIGNMENT}", region=region)
            if s.offset < position:
                raise LayoutError(f"starts at {s.offset}, inside the previous region (ends {position})", region=region)
            if s.offset - position > MAX_PADDING:
                raise LayoutError(f"{s.offset - position} bytes of padding before it", region=region)
            position = s.end
        self._data_end = position
        if self._tail is not None:
            self._check_tail(self._tail)

    def _check_tail(self, tail: TrailerTail) -> None:
        if not 0 <= tail.index_offset - self._data_end <= MAX_PADDING:
            raise LayoutError(
                f"trailer index at {tail.index_offset} does not follow the data (ends {self._data_end})",
                region="trailer",
            )

    @property
    def tail(self) -> TrailerTail:
        """The trailer tail (read on first use where reading it at open would cost a request)."""
        if self._tail is None:
            size = self.file_size
            tail = TrailerTail.unpack(self._pread(TRAILER_TAIL_SIZE, size - TRAILER_TAIL_SIZE, "trailer"), size)
            self._check_tail(tail)
            self._tail = tail
        return self._tail

    def __enter__(self: _Self) -> _Self:  # the subclass, for `with LazyCheckpoint(...) as ckpt`
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the file. Tensors already returned stay valid (they keep the mapping alive)."""
        self._src.close()

    @property
    @names_file
    def metadata(self) -> dict[str, Any]:
        """The checkpoint metadata (a decoded object tree)."""
        return _decoded_metadata(self.header.metadata)

    @property
    def sections(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.header.sections)

    def keys(self, section: str = "model") -> list[str]:
        """Tensor names of ``section`` in the order they were saved (aliases included)."""
        s = self.header.section(section)
        return list(s.order) if s is not None else []

    @property
    def tree_names(self) -> tuple[str, ...]:
        return tuple(self.header.trees)


def _check_header_checksum(preamble: Preamble, header: bytes) -> None:
    if checksum(header) != preamble.header_checksum:
        raise IntegrityError("header checksum mismatch", region="header", offset=PREAMBLE_SIZE)


def _check_file_length(declared: int, size: int) -> None:
    if declared != size:
        raise LayoutError(f"header says the file has {declared} bytes, it has {size}", region="header")


def _decoded_metadata(tagged: Any) -> dict[str, Any]:
    value = decode_tree(tagged, path="header.metadata")
    return value if isinstance(value, dict) else {}


def read_metadata(fd: int, size: int, head: bytes) -> tuple[Preamble, dict[str, Any]]:
    """The preamble and decoded metadata of the container open at ``fd`` (``size`` bytes; ``head``:
    its first bytes, already read), from the preamble and header alone. The header checksum, its
    msgpack rules and the file length are checked; the sections and their tensor index are not read
    (listing checkpoints by metadata needs neither; reading tensors opens a :class:`ContainerFile`).

    Raises:
        LayoutError, IntegrityError, HeaderError: the file is not a valid container header.
    """
    preamble = Preamble.unpack(head[:PREAMBLE_SIZE], size)
    end = PREAMBLE_SIZE + preamble.header_length
    header = head[PREAMBLE_SIZE:end]
    if len(header) < preamble.header_length:
        header = os.pread(fd, preamble.header_length, PREAMBLE_SIZE)
        if len(header) != preamble.header_length:
            raise LayoutError(f"file ended inside the {preamble.header_length}-byte header", region="header")
    _check_header_checksum(preamble, header)
    file_length, tagged = parse_header_metadata(header)
    _check_file_length(file_length, size)
    return preamble, _decoded_metadata(tagged)


def split_metadata(metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(user metadata, the checkpoint's own fields) of a container's decoded metadata."""
    user = dict(metadata)
    own = user.pop(CHECKPOINT_KEY, None)
    if own is not None and not isinstance(own, dict):
        raise HeaderError(f"{CHECKPOINT_KEY} must be a map", path=f"header.metadata.{CHECKPOINT_KEY}")
    return user, own or {}
