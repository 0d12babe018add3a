"""Codecs: a section's ``codec.name`` selects how its stream is stored (``registry.py`` finds the class)."""

from __future__ import annotations

from mettaformat.container.codecs.base import Codec, SectionReader, WrittenStream
from mettaformat.container.codecs.raw import RawCodec
from mettaformat.container.codecs.registry import (
    ENTRY_POINT_GROUP,
    _register_builtin,
    available_codecs,
    codec_class,
    get_codec,
    register_codec,
    resolve_codec,
    unregister_codec,
)
from mettaformat.container.codecs.zstd import ZstdCodec

__all__ = ["ENTRY_POINT_GROUP", "Codec", "RawCodec", "SectionReader", "WrittenStream", "ZstdCodec",
           "available_codecs", "codec_class", "get_codec", "register_codec", "resolve_codec", "unregister_codec"]

_register_builtin(RawCodec)
_register_builtin(ZstdCodec)
