"""Our own pickle virtual machine: interprets pickle opcodes as data, never as code.

Nothing here calls :mod:`pickle`'s unpickler, imports a module named in the data or calls a
callable from it. ``GLOBAL``/``STACK_GLOBAL`` are resolved by :mod:`.allowlist` to inert
values; everything else becomes a :class:`~mettaformat.container.tree.LegacyObject`.

Safety properties (HOSTILE.md 1.6, rows F3-F19):

* every length field is compared with the bytes left before anything is sliced;
* the memo is a dict with a slot cap, and ``GET`` pushes references, never copies;
* the work done is linear in the input: each opcode consumes a byte, and the few opcodes that
  copy containers charge a work budget;
* tuples have bounded nesting, because CPython hashes tuples recursively in C;
* any inconsistency (underflow, missing MARK, bad FRAME, data after STOP) is a
  :class:`~mettaformat.errors.LegacyFormatError` naming the region and offset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NoReturn

from mettaformat.errors import LegacyFormatError, LegacyLimitError, MettaFormatError
from mettaformat.legacy import allowlist
from mettaformat.legacy.limits import DEFAULT_LIMITS, LegacyLimits
from mettaformat.legacy.opcodes import bind_handlers
from mettaformat.legacy.vmloop import run_unframed

__all__ = ["PersistentLoad", "PickleVM", "unpickle"]

PersistentLoad = Callable[[tuple[Any, ...]], Any]

_MAX_LINE: Final = 1 << 16


class PickleVM:
    """Interprets one pickle stream held in a buffer.

    Attributes:
        pos: offset just after the last opcode run (after ``STOP`` once :meth:`run` returns).
        globals_seen: every ``(module, name)`` the stream named, as spelled.
        region: the region named in errors (``"data.pkl"``, ``"legacy stream pickle 4"``).
    """

    def __init__(
        self,
        data: bytes | bytearray,
        *,
        start: int = 0,
        end: int | None = None,
        region: str = "data.pkl",
        offset_base: int = 0,
        persistent_load: PersistentLoad | None = None,
        limits: LegacyLimits = DEFAULT_LIMITS,
    ) -> None:
        """Prepare to interpret ``data[start:end]``.

        Args:
            data: the buffer holding the pickle (not copied).
            start: offset of the first opcode.
            end: offset the stream may not read past (default: end of ``data``).
            region: region named in errors.
            offset_base: added to offsets in errors (where ``data`` sits in the file).
            persistent_load: resolves ``BINPERSID`` ids; without it they are rejected.
            limits: resource caps.

        Raises:
            LegacyLimitError: if the stream is longer than ``limits.max_pickle_bytes``.
        """
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else min(end, len(data))
        self.region = region
        self.offset_base = offset_base
        self.limits = limits
        self.globals_seen: set[tuple[str, str]] = set()
        self.op_pos = start
        if self.end - start > limits.max_pickle_bytes:
            raise LegacyLimitError("pickle bytes", self.end - start, limits.max_pickle_bytes, region=region)
        self.persistent_load = persistent_load
        # One stack; MARK records its height in ``marks`` (cheaper than CPython's list swap, and
        # lets opcode closures bind ``stack`` once).
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self._objects = 0
        self._work = 0
        self._max_work = limits.max_work + (self.end - start)
        self.frame_end = -1
        self.proto = 0
        self.result: Any = None
        self._deep_tuples: dict[int, tuple[int, tuple[Any, ...]]] = {}
        self._globals: dict[tuple[str, str], Any] = {}
        self._dispatch: list[Callable[[], bool | None]] = []

    def _bind(self) -> list[Callable[[], bool | None]]:
        # The handlers close over this VM: they are made for a run and dropped after it, so
        # that the VM (and through its memo the whole graph) is not kept alive by a cycle.
        dispatch: list[Callable[[], bool | None]] = [self._unknown] * 256
        for code, handler in bind_handlers(self).items():
            dispatch[code] = handler
        return dispatch

    # -- context used by allowlist handlers -------------------------------------------------
    @property
    def offset(self) -> int:
        """Absolute offset of the opcode being run."""
        return self.offset_base + self.op_pos

    def fail(self, message: str) -> NoReturn:
        """Raise a :class:`LegacyFormatError` at the current opcode."""
        raise LegacyFormatError(message, region=self.region, offset=self.offset)

    def charge(self, n: int) -> None:
        """Account for ``n`` element copies; raise once the work budget is spent (F11)."""
        self._work += n
        if self._work > self._max_work:
            raise LegacyLimitError(
                "pickle work units", self._work, self._max_work, region=self.region, offset=self.offset
            )

    def count_object(self) -> None:
        """Account for one container or record created (F11)."""
        self._objects += 1
        if self._objects > self.limits.max_objects:
            raise LegacyLimitError(
                "pickle objects", self._objects, self.limits.max_objects, region=self.region, offset=self.offset
            )

    def make_tuple(self, items: list[Any] | tuple[Any, ...]) -> tuple[Any, ...]:
        """Build a tuple, refusing nesting deeper than ``limits.max_tuple_depth``."""
        t = tuple(items)
        depth = 0
        deep = self._deep_tuples
        for x in t:
            if type(x) is tuple:
                known = deep.get(id(x))
                d = 1 if known is None else known[0]
                if d > depth:
                    depth = d
        if depth:
            depth += 1
            if depth > self.limits.max_tuple_depth:
                raise LegacyLimitError(
                    "tuple nesting", depth, self.limits.max_tuple_depth, region=self.region, offset=self.offset
                )
            # Keeping the tuple referenced keeps its id unique for later lookups.
            deep[id(t)] = (depth, t)
        return t

    # -- driver -----------------------------------------------------------------------------
    def run(self, *, allow_trailing: bool = False) -> Any:
        """Interpret opcodes up to ``STOP`` and return the pickled value.

        Args:
            allow_trailing: accept bytes after ``STOP`` (legacy streams hold several pickles).

        Returns:
            The value: plain Python data, tensors, dtypes, devices, sizes and LegacyObjects.

        Raises:
            LegacyFormatError: malformed stream (F13-F19).
            LegacyLimitError: a resource cap was hit (F10, F11).
            LegacyUnsupportedError: unsupported tensor kinds or pickle features (F25).
            UnsafeContentError: opcodes that can only serve to run code (F8).
        """
        self._dispatch = self._bind()
        try:
            # Unframed streams (torch's protocol 2) run in the fast loop; the first FRAME hands
            # the rest of the stream to the generic loop below.
            if self.frame_end >= 0 or not run_unframed(self):
                self._run_framed()
        except MettaFormatError:
            raise
        except (IndexError, KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
            # Bad input reaching Python-level operations (unhashable keys, wrong container
            # types, bad encodings) must surface as a format error, never as a bare exception.
            raise LegacyFormatError(
                f"malformed pickle: {type(e).__name__}: {e}", region=self.region, offset=self.offset
            ) from e
        finally:
            self._dispatch = []
        if not allow_trailing and self.pos != self.end:
            self.fail(f"{self.end - self.pos} bytes after STOP")
        return self.result

    def _run_framed(self) -> None:
        data = self.data
        end = self.end
        dispatch = self._dispatch
        while True:
            pos = self.pos
            if pos >= end:
                self.fail("pickle ends without STOP")
            self.op_pos = pos
            self.pos = pos + 1
            if dispatch[data[pos]]():
                return

    # -- reading (used by opcode handlers) ------------------------------------------------
    def read(self, n: int) -> bytes | bytearray:
        """Consume ``n`` bytes, checking the length against what is left first (F16, F15)."""
        p = self._consume(n)
        return self.data[p : p + n]

    def _consume(self, n: int) -> int:
        p = self.pos
        q = p + n
        if n < 0 or q > self.end:
            self.fail(f"length {n} exceeds the {self.end - p} bytes left")
        fe = self.frame_end
        if fe >= 0 and q > fe:
            # An opcode that starts inside a frame must end inside it (CPython #154848 class).
            if self.op_pos < fe:
                self.fail("an opcode crosses the end of its FRAME")
            self.frame_end = -1
        self.pos = q
        return p

    def readline(self) -> bytes:
        """Consume a protocol-0 text argument up to and including its newline."""
        p = self.pos
        i = self.data.find(b"\n", p, min(self.end, p + _MAX_LINE))
        if i < 0:
            self.fail("unterminated text argument")
        self._consume(i + 1 - p)
        return bytes(self.data[p:i])

    def _unknown(self) -> bool | None:
        self.fail(f"unknown opcode 0x{self.data[self.op_pos]:02x}")

    # -- globals ----------------------------------------------------------------------------
    def resolve_global(self, module: str, name: str) -> Any:
        """Map a class path to an inert value; the strings are never imported (F1-F4)."""
        key = (module, name)
        self.globals_seen.add(key)
        value = self._globals.get(key)
        if value is None:
            value = allowlist.resolve_global(module, name)
            self._globals[key] = value
        return value


def unpickle(
    data: bytes | bytearray,
    *,
    region: str = "data.pkl",
    persistent_load: PersistentLoad | None = None,
    limits: LegacyLimits = DEFAULT_LIMITS,
) -> tuple[Any, set[tuple[str, str]]]:
    """Interpret a whole buffer as exactly one pickle.

    Args:
        data: the pickle bytes; nothing may follow ``STOP`` (F18).
        region: region named in errors.
        persistent_load: resolves ``BINPERSID`` ids (storages).
        limits: resource caps.

    Returns:
        ``(value, globals_seen)``.

    Raises:
        LegacyFormatError: malformed stream.
        LegacyLimitError: a resource cap was hit.
        LegacyUnsupportedError: unsupported tensor kinds or pickle features.
        UnsafeContentError: opcodes that can only serve to run code.
    """
    vm = PickleVM(data, region=region, persistent_load=persistent_load, limits=limits)
    return vm.run(), vm.globals_seen
