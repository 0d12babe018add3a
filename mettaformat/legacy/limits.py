"""Resource limits for legacy imports, checked before anything is allocated."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_LIMITS", "LegacyLimits"]


@dataclass(frozen=True, kw_only=True)
class LegacyLimits:
    """Caps that bound the memory and time an import may use, whatever the input.

    The pickle VM does work linear in the input length by construction (every opcode consumes
    at least one byte); these caps bound the constant factors (objects per byte, memo size) and
    the operations that are not O(1) per opcode (copying containers, BUILD merges).

    Attributes:
        max_pickle_bytes: size of one pickle stream (``data.pkl``).
        max_memo: distinct memo slots (CPython gh-115952 grew a C array to the index instead).
        max_objects: containers and records created by the VM.
        max_work: element copies done by REDUCE/BUILD, on top of one per input byte.
        max_tuple_depth: nesting of tuples; CPython hashes tuples recursively without a
            recursion check, so a deep tuple used as a dict key would crash the interpreter.
        max_zip_entries: members in a torch zip archive.
        max_expanded_bytes: logical bytes of a tensor view larger than its storage
            (zero strides or overlapping views), which consumers may later materialise.
        max_traversal: nodes visited when walking an object graph (module trees, tensors).
    """

    max_pickle_bytes: int = 1 << 30
    max_memo: int = 4_000_000
    max_objects: int = 4_000_000
    max_work: int = 50_000_000
    max_tuple_depth: int = 200
    max_zip_entries: int = 500_000
    max_expanded_bytes: int = 1 << 30
    max_traversal: int = 5_000_000


DEFAULT_LIMITS = LegacyLimits()
