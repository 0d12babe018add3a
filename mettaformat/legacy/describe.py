"""Short, bounded descriptions of values from a pickle, for error messages.

A value in a hostile pickle can be a tuple holding the same tuple many times over, or a string
of a gigabyte: ``repr`` of it would take time and memory exponential in (or far larger than)
the input. :func:`describe` looks at no more than a few elements at each of two levels.
"""

from __future__ import annotations

from typing import Any, Final

__all__ = ["describe"]

_ITEMS: Final = 4
_CHARS: Final = 40


def describe(value: Any, *, depth: int = 2) -> str:
    """A description of ``value`` of at most a few hundred characters, whatever it holds."""
    t = type(value)
    if value is None or t is bool or t is float:
        return repr(value)
    if t is int:
        return repr(value) if value.bit_length() <= 64 else f"<int of {value.bit_length()} bits>"
    if t in (str, bytes, bytearray):
        text = repr(value[:_CHARS])
        return text + f"... ({len(value)} long)" if len(value) > _CHARS else text
    if t in (tuple, list):
        if depth <= 0:
            return f"<{t.__name__} of {len(value)}>"
        inner = ", ".join(describe(x, depth=depth - 1) for x in value[:_ITEMS])
        more = f", ... ({len(value)} items)" if len(value) > _ITEMS else ""
        return f"({inner}{more})" if t is tuple else f"[{inner}{more}]"
    class_path = getattr(value, "class_path", None)
    if type(class_path) is str:
        return f"<{class_path[:_CHARS * 2]}>"
    return f"<{t.__name__}>"
