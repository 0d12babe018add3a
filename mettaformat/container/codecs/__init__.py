"""Codec registry: a section's ``codec.name`` selects how its stream is stored."""

from __future__ import annotations

from typing import Any

from mettaformat.container.codecs.base import Codec, SectionReader, WrittenStream
from mettaformat.container.codecs.raw import RawCodec
from mettaformat.container.codecs.zstd import ZstdCodec
from mettaformat.errors import UnknownCodecError

__all__ = ["Codec", "RawCodec", "SectionReader", "WrittenStream", "ZstdCodec", "get_codec", "register_codec"]

_REGISTRY: dict[str, type[Any]] = {"raw": RawCodec, "zstd": ZstdCodec}


def register_codec(name: str, cls: type[Any]) -> None:
    """Make a codec class available to readers under ``name``."""
    _REGISTRY[name] = cls


def get_codec(name: str, *, region: str | None = None) -> Codec:
    """A reader-side instance of the codec called ``name``.

    Raises:
        UnknownCodecError: no codec of that name is registered.
    """
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise UnknownCodecError(
            f"unknown codec {name!r}; this reader knows {', '.join(sorted(_REGISTRY))}", region=region
        ) from None
    codec: Codec = cls()
    return codec
