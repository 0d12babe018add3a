"""The whole exception tree of mettaformat, and nothing else.

Every failure the library reports is a :class:`MettaFormatError`. Subclasses carry
structured attributes (``region``, ``offset``, ``name``, ``limit``) so that callers and
tools such as ``mettaformat validate`` can say *where* a file is damaged without parsing
messages.

::

    MettaFormatError
    ├── FormatError (ValueError)            the bytes are not a valid checkpoint
    │   ├── BadMagicError                   not a mettaformat file at all
    │   ├── UnsupportedVersionError         a format version this reader does not support
    │   ├── HeaderError                     the msgpack header is malformed or violates the schema
    │   ├── LayoutError                     offsets, lengths, alignment, truncation
    │   ├── LimitExceededError              a size or count above a named limit
    │   ├── UnknownCodecError               a codec this reader does not implement
    │   └── CodecError                      a compressed frame that does not decode as declared
    ├── IntegrityError (ValueError)         a checksum does not match
    ├── TensorNotFoundError (KeyError)      no tensor of that name
    ├── WriteError                          saving failed; the previous file is untouched
    ├── LegacyImportError                   a legacy torch pickle could not be imported safely
    │   ├── LegacyFormatError (FormatError) a broken zip, pickle stream or storage record
    │   ├── LegacyLimitError (LimitExceededError)  a legacy file over a LegacyLimits cap
    │   ├── LegacyUnsupportedError (UnsupportedVersionError)  TorchScript, torch.package, sparse...
    │   └── UnsafeContentError              the pickle asks for something we never do
    ├── ModelReconstructionError            no registered builder can rebuild the model
    ├── CompatibilityError                  a checkpoint this runtime must refuse
    ├── StoreError                          PolicyStore failures (missing policies, bad URIs)
    └── RemoteError                         object storage / HTTP failures; ``uri`` names the object
        ├── RemoteNotFoundError (FileNotFoundError)  no object at the URI (404)
        ├── RemoteAccessError (PermissionError)      access denied (403, 401)
        ├── RemoteChangedError              the object was replaced while it was being read
        ├── RemoteTransferError             connection dropped, truncated or failed reply (after retries)
        └── RemoteUnavailableError          no fsspec backend installed for the URI's scheme
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "BadMagicError",
    "CodecError",
    "CompatibilityError",
    "FormatError",
    "HeaderError",
    "IntegrityError",
    "LayoutError",
    "LegacyFormatError",
    "LegacyImportError",
    "LegacyLimitError",
    "LegacyUnsupportedError",
    "LimitExceededError",
    "MettaFormatError",
    "ModelReconstructionError",
    "RemoteAccessError",
    "RemoteChangedError",
    "RemoteError",
    "RemoteNotFoundError",
    "RemoteTransferError",
    "RemoteUnavailableError",
    "StoreError",
    "TensorNotFoundError",
    "UnknownCodecError",
    "UnsafeContentError",
    "UnsupportedVersionError",
    "WriteError",
]


class MettaFormatError(Exception):
    """Root of every error raised by mettaformat.

    Attributes:
        region: the part of the file concerned (``"preamble"``, ``"header"``,
            ``"section model"``, ``"tensor 'fc.weight'"``, ``"data.pkl"``...), if known.
        offset: the absolute byte offset concerned, if known.
        file: the path the caller passed, once an entry point has named it (see
            :func:`naming_file`); the message then starts with it.
    """

    file: str | None = None

    def __init__(self, message: str, *, region: str | None = None, offset: int | None = None) -> None:
        self.message = message
        self.region = region
        self.offset = offset
        where = []
        if region is not None:
            where.append(region)
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


    def name_file(self, path: str | os.PathLike[str], *, hint: str | None = None) -> None:
        """Say which file this error is about (once; the innermost entry point wins)."""
        if self.file is not None:
            return
        self.file = os.fspath(path)
        text = str(self)
        if not text.startswith(self.file):
            text = f"{self.file}: {text}"
        if hint:
            text = f"{text}; {hint}"
        self.args = (text,)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@contextmanager
def naming_file(path: str | os.PathLike[str], *, container: bool = False) -> Iterator[None]:
    """Entry points that open a path wrap their work in this: any error then names that path.

    Args:
        container: the file is a container; structural damage and checksum failures then
            suggest ``mettaformat repair``, which recovers what the checksums still vouch for.
    """
    try:
        yield
    except MettaFormatError as e:
        repairable = container and isinstance(e, (LayoutError, IntegrityError, CodecError))
        hint = f"`mettaformat repair {os.fspath(path)} OUT.mfmt` may recover the intact tensors" if repairable else None
        e.name_file(path, hint=hint)
        raise


class FormatError(MettaFormatError, ValueError):
    """The bytes are not a valid mettaformat (or legacy) checkpoint."""


class BadMagicError(FormatError):
    """The file does not start with the mettaformat magic."""


class UnsupportedVersionError(FormatError):
    """The file's format version (or a required feature) is not supported by this reader.

    Attributes:
        found: the version found in the file, as ``(major, minor)`` or a legacy integer.
        supported: a description of what this reader supports.
    """

    def __init__(
        self,
        message: str,
        *,
        found: object = None,
        supported: object = None,
        region: str | None = None,
        offset: int | None = None,
    ) -> None:
        self.found = found
        self.supported = supported
        super().__init__(message, region=region, offset=offset)


class HeaderError(FormatError):
    """The msgpack header is malformed or violates the schema.

    Attributes:
        path: the dotted field path inside the header (``"sections[0].tensors[3].shape"``).
    """

    def __init__(self, message: str, *, path: str | None = None, region: str | None = "header") -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message, region=region)


class LayoutError(FormatError):
    """Offsets, lengths or alignment are inconsistent, or the file is truncated or extended."""


class LimitExceededError(FormatError):
    """A declared size or count exceeds a named limit.

    Attributes:
        value: the declared value.
        limit: the limit it exceeded.
    """

    def __init__(
        self, what: str, value: int, limit: int, *, region: str | None = None, offset: int | None = None
    ) -> None:
        self.value = value
        self.limit = limit
        super().__init__(f"{what} {value} exceeds the limit {limit}", region=region, offset=offset)


class UnknownCodecError(FormatError):
    """A section uses a codec this reader does not implement."""


class CodecError(FormatError):
    """A compressed frame is malformed or does not decode to what the index declares."""


class IntegrityError(MettaFormatError, ValueError):
    """Stored bytes do not match their checksum."""


class TensorNotFoundError(MettaFormatError, KeyError):
    """No tensor of that name exists in the checkpoint.

    Attributes:
        name: the name that was asked for.
    """

    def __init__(self, name: str, *, region: str | None = None) -> None:
        self.name = name
        super().__init__(f"no tensor named {name!r}", region=region)

    def __str__(self) -> str:  # KeyError would repr() the message
        return MettaFormatError.__str__(self)


class BaseCheckpointError(MettaFormatError):
    """The base a delta checkpoint needs is missing, is not the file it was written against, is itself
    damaged, or the chain of bases is circular or too long. The message names both files.

    ``region`` is ``"base"`` (missing or damaged), ``"base identity"`` (a different file than the one the
    delta was written against) or ``"base chain"`` (a cycle, or too many bases).

    Attributes:
        base: the base path as resolved (or as written when it could not be found).
    """

    def __init__(self, message: str, *, base: str | None = None, region: str = "base") -> None:
        self.base = base
        super().__init__(message, region=region)


class WriteError(MettaFormatError):
    """A save failed. The target path still holds its previous content (or nothing)."""


class LegacyImportError(MettaFormatError):
    """A legacy torch checkpoint could not be imported."""


class LegacyFormatError(LegacyImportError, FormatError):
    """A legacy file is malformed: a broken zip, pickle stream or storage record.

    Both a :class:`LegacyImportError` (what ``import_legacy`` promises) and a :class:`FormatError`
    (what malformed bytes are everywhere else).
    """


class LegacyLimitError(LegacyImportError, LimitExceededError):
    """A legacy file exceeds one of the ``LegacyLimits`` caps."""


class LegacyUnsupportedError(LegacyImportError, UnsupportedVersionError):
    """A well-formed legacy file uses something the importer does not support.

    Examples: TorchScript archives, torch.package archives, tar-era files, sparse or quantized tensors.
    """


class UnsafeContentError(LegacyImportError):
    """A legacy pickle asks for something the importer never does (run code, nested pickles...)."""


class ModelReconstructionError(MettaFormatError):
    """No registered model builder can rebuild the model stored in a checkpoint."""


class CompatibilityError(MettaFormatError):
    """The checkpoint is incompatible with this runtime and must not be loaded."""


class StoreError(MettaFormatError):
    """A PolicyStore operation failed (no policies found, bad URI, unknown selector)."""


class RemoteError(MettaFormatError):
    """Reading or writing a remote object (``s3://``, ``gs://``, ``http(s)://``...) failed.

    Attributes:
        uri: the object concerned.
    """

    def __init__(self, message: str, *, uri: str, region: str | None = None, offset: int | None = None) -> None:
        self.uri = uri
        super().__init__(f"{uri}: {message}", region=region, offset=offset)


class RemoteNotFoundError(RemoteError, FileNotFoundError):
    """No object exists at the URI."""


class RemoteAccessError(RemoteError, PermissionError):
    """The server refused access to the object (missing or wrong credentials)."""


class RemoteChangedError(RemoteError):
    """The object changed (its ETag or generation differs) while it was being read."""


class RemoteTransferError(RemoteError):
    """The transfer failed after retries: connection dropped, truncated reply, server error."""


class RemoteUnavailableError(RemoteError):
    """No fsspec implementation is installed for the URI's scheme (``pip install mettaformat[s3]``)."""
