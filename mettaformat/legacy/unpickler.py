"""Our own pickle virtual machine: interprets pickle opcodes as data, never as code.

Nothing here calls :mod:`pickle`'s unpickler, imports a module named in the data or calls a
callable from it. ``GLOBAL``/``STACK_GLOBAL`` are resolved by :mod:`.allowlist` to inert
values; everything else becomes a :class:`~mettaformat.container.tree.LegacyObject`.

The machine is one loop (:mod:`.vmloop`): the opcodes torch writes run inline there, the
rest through the table in :mod:`.opcodes`. This class holds the state both share and the
checks every opcode goes through:

* every length field is compared with the bytes left (in the stream, and in the current
  ``FRAME``) before anything is sliced;
* the memo is a dict with a slot cap, and ``GET`` pushes references, never copies;
* the work done is bounded by the input: each opcode consumes a byte, and every allocation or
  copy beyond what the consumed bytes account for is charged to a work budget (:meth:`charge`);
* tuples have bounded nesting, and hashing a tuple (as a dict key or set member) is charged
  by its size, because CPython hashes tuples recursively and without caching;
* any inconsistency (underflow, missing MARK, bad FRAME, data after STOP) is a
  :class:`~mettaformat.errors.LegacyFormatError` naming the region and offset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from mettaformat.errors import LegacyFormatError, LegacyLimitError, MettaFormatError
from mettaformat.legacy import allowlist
from mettaformat.legacy.limits import DEFAULT_LIMITS, LegacyLimits

__all__ = ["PersistentLoad", "PickleVM", "unpickle"]

PersistentLoad = Callable[[tuple[Any, ...]], Any]


class PickleVM:
    """Interprets one pickle stream held in a buffer.

    Attributes:
        pos: offset just after the last opcode run (after ``STOP`` once :meth:`run` returns).
        limit: offset no argument may be read past: the end of the current ``FRAME``, else ``end``.
        globals_seen: every ``(module, name)`` the stream named, as spelled.
        ordered_dicts: ids of the plain dicts that stand for ``OrderedDict`` instances (only those
            may receive, and drop, instance state from ``BUILD``).
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
        self.limit = self.end
        self.region = region
        self.offset_base = offset_base
        self.limits = limits
        self.globals_seen: set[tuple[str, str]] = set()
        self.ordered_dicts: set[int] = set()
        self.op_pos = start
        if self.end - start > limits.max_pickle_bytes:
            raise LegacyLimitError("pickle bytes", self.end - start, limits.max_pickle_bytes, region=region)
        self.persistent_load = persistent_load
        # One stack; MARK records its height in ``marks`` (the loop keeps the innermost as its
        # pop floor in a local).
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.memo: dict[int, Any] = {}
        self.objects = 0
        self._work = 0
        self._max_work = limits.max_work + (self.end - start)
        self.frame_end = -1
        self.proto = 0
        self.result: Any = None
        # id -> (nesting depth, element count of the whole tree, the tuple) for tuples of tuples.
        self._deep_tuples: dict[int, tuple[int, int, tuple[Any, ...]]] = {}
        self._globals: dict[tuple[str, str], Any] = {}

    # -- context used by opcode and allowlist handlers -----------------------------------------
    @property
    def offset(self) -> int:
        """Absolute offset of the opcode being run."""
        return self.offset_base + self.op_pos

    def fail(self, message: str) -> NoReturn:
        """Raise a :class:`LegacyFormatError` at the current opcode."""
        raise LegacyFormatError(message, region=self.region, offset=self.offset)

    def over(self, what: str, value: int, cap: int) -> NoReturn:
        """Raise a :class:`LegacyLimitError` at the current opcode."""
        raise LegacyLimitError(what, value, cap, region=self.region, offset=self.offset)

    def underflow(self) -> NoReturn:
        self.fail("stack underflow")

    def no_mark(self) -> NoReturn:
        self.fail("opcode needs a MARK but none is open")

    def missing(self, idx: int) -> NoReturn:
        self.fail(f"memo slot {idx} was never written")

    def too_many(self, count: int) -> NoReturn:
        self.objects = count
        self.over("pickle objects", count, self.limits.max_objects)

    def memo_full(self) -> NoReturn:
        self.over("memo slots", len(self.memo), self.limits.max_memo)

    def charge(self, n: int) -> None:
        """Account for ``n`` element copies or allocations; raise once the work budget is spent."""
        self._work += n
        if self._work > self._max_work:
            self.over("pickle work units", self._work, self._max_work)

    def count_object(self) -> None:
        """Account for one container or record created."""
        self.objects += 1
        if self.objects > self.limits.max_objects:
            self.too_many(self.objects)

    def make_tuple(self, items: list[Any] | tuple[Any, ...]) -> tuple[Any, ...]:
        """Build a tuple, refusing nesting deeper than ``limits.max_tuple_depth``."""
        t = tuple(items)
        depth = 0
        size = len(t)
        deep = self._deep_tuples
        for x in t:
            if type(x) is tuple:
                known = deep.get(id(x))
                d, n = (1, len(x)) if known is None else known[:2]
                size += n
                if d > depth:
                    depth = d
        if depth:
            depth += 1
            if depth > self.limits.max_tuple_depth:
                self.over("tuple nesting", depth, self.limits.max_tuple_depth)
            # Keeping the tuple referenced keeps its id unique for later lookups.
            deep[id(t)] = (depth, size, t)
        return t

    def charge_hash(self, key: Any) -> None:
        """Charge hashing ``key``: a tuple's hash visits its whole tree, every time (no cache)."""
        if type(key) is tuple:
            known = self._deep_tuples.get(id(key))
            self.charge(len(key) if known is None else known[1])

    def charge_keys(self, keys: Any) -> None:
        """:meth:`charge_hash` for every key of an iterable about to be hashed."""
        for k in keys:
            if type(k) is tuple:
                self.charge_hash(k)

    # -- reading (used by the table handlers) ---------------------------------------------------
    def need(self, n: int) -> int:
        """Consume ``n`` argument bytes and return where they start, after checking they exist."""
        p = self.pos
        q = p + n
        if n < 0 or q > self.limit:
            self.short(p, n)
        self.pos = q
        return p

    def short(self, p: int, n: int) -> NoReturn:
        """Fail for an argument of ``n`` bytes at ``p`` that does not fit before :attr:`limit`."""
        if 0 <= n and p + n <= self.end:
            self.fail("an opcode crosses the end of its FRAME")
        self.fail(f"length {n} exceeds the {self.end - p} bytes left")

    def read(self, n: int) -> memoryview:
        """Consume ``n`` bytes and return a view of them."""
        p = self.need(n)
        return memoryview(self.data)[p : p + n]

    def readline(self) -> bytes:
        """Consume a protocol-0 text argument up to and including its newline."""
        p = self.pos
        # Unbounded length is fine: a line is consumed once, or the search fails and so does the run.
        i = self.data.find(b"\n", p, self.limit)
        if i < 0:
            self.fail("unterminated text argument")
        self.pos = i + 1
        return bytes(self.data[p:i])

    def pop(self) -> Any:
        """Pop one value above the innermost MARK."""
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            self.underflow()
        return self.stack.pop()

    def top(self) -> Any:
        """The value on top of the stack, above the innermost MARK."""
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            self.underflow()
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        """Pop everything above the innermost MARK, and the MARK."""
        if not self.marks:
            self.no_mark()
        m = self.marks.pop()
        items = self.stack[m:]
        del self.stack[m:]
        return items

    def memo_put(self, idx: int, value: Any) -> None:
        """Store ``value`` in memo slot ``idx``, within the slot cap."""
        self.memo[idx] = value
        if len(self.memo) > self.limits.max_memo:
            self.memo_full()

    def memo_get(self, idx: int) -> Any:
        """The value in memo slot ``idx``."""
        value = self.memo.get(idx, self.memo)  # the memo itself is the "missing" sentinel
        if value is self.memo:
            self.missing(idx)
        return value

    # -- driver ---------------------------------------------------------------------------------
    def run(self, *, allow_trailing: bool = False) -> Any:
        """Interpret opcodes up to ``STOP`` and return the pickled value.

        Args:
            allow_trailing: accept bytes after ``STOP`` (legacy streams hold several pickles).

        Returns:
            The value: plain Python data, tensors, dtypes, devices, sizes and LegacyObjects.

        Raises:
            LegacyFormatError: malformed stream.
            LegacyLimitError: a resource cap was hit.
            LegacyUnsupportedError: unsupported tensor kinds or pickle features.
            UnsafeContentError: opcodes that can only serve to run code.
        """
        from mettaformat.legacy.vmloop import run_loop

        try:
            run_loop(self)
        except MettaFormatError:
            raise
        except (IndexError, KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
            # Bad input reaching Python-level operations (unhashable keys, wrong container
            # types, bad encodings) must surface as a format error, never as a bare exception.
            raise LegacyFormatError(
                f"malformed pickle: {type(e).__name__}: {e}", region=self.region, offset=self.offset
            ) from e
        if not allow_trailing and self.pos != self.end:
            self.fail(f"{self.end - self.pos} bytes after STOP")
        return self.result

    # -- globals --------------------------------------------------------------------------------
    def resolve_global(self, module: str, name: str) -> Any:
        """Map a class path to an inert value; the strings are never imported."""
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
        data: the pickle bytes; nothing may follow ``STOP``.
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
