"""Codecs for ``save_file(compression=...)``: the built-ins, and registering third-party ones.

``spec/codecs/README.md`` is the contract a codec implements; ``docs/api.md`` §1 shows a toy one.
"""

from __future__ import annotations

from mettaformat.container.codecs import (
    ENTRY_POINT_GROUP,
    Codec,
    RawCodec,
    ZstdCodec,
    available_codecs,
    register_codec,
    unregister_codec,
)

__all__ = ["ENTRY_POINT_GROUP", "Codec", "RawCodec", "ZstdCodec", "available_codecs", "register_codec",
           "unregister_codec"]
