"""Opcode handlers of :class:`~mettaformat.legacy.unpickler.PickleVM`, protocols 0 to 5.

Handlers are closures over one VM so that the hot ones (``BINPUT``, ``BINGET``,
``BINUNICODE``, ``MARK``...) touch local cells instead of attributes. Each returns ``True``
only for ``STOP``. Semantics follow CPython's ``Lib/pickle.py``, except that:

* globals resolve through :mod:`.allowlist` (inert values) and ``REDUCE``/``NEWOBJ`` on an
  unknown class records a :class:`LegacyObject` instead of calling anything (F1-F6);
* ``EXT1/2/4``, text ``PERSID`` and out-of-band buffers are rejected (F8, F9);
* ``INST``/``OBJ``/``NEWOBJ_EX`` only ever record stubs (F5);
* ``POP`` never pops a MARK, and ``STOP`` requires exactly one value and no open MARK (F13).
"""

from __future__ import annotations

import codecs
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from mettaformat.errors import LegacyLimitError, LegacyUnsupportedError, UnsafeContentError
from mettaformat.legacy import allowlist

if TYPE_CHECKING:
    from mettaformat.legacy.unpickler import PickleVM

__all__ = ["bind_handlers"]

_U2 = struct.Struct("<H").unpack_from
_U4 = struct.Struct("<I").unpack_from
_I4 = struct.Struct("<i").unpack_from
_U8 = struct.Struct("<Q").unpack_from
_F8 = struct.Struct(">d").unpack_from
_HIGHEST_PROTOCOL: Final = 5
#: CPython's int/str conversion limit since CVE-2020-10735 (HOSTILE F17).
_MAX_INT_DIGITS: Final = 4300
Handler = Callable[[], "bool | None"]


def bind_handlers(vm: PickleVM) -> dict[int, Handler]:
    """Create the opcode table for ``vm``.

    Args:
        vm: the machine whose stack, memo and buffer the handlers operate on.

    Returns:
        Opcode byte to handler.
    """
    stack = vm.stack
    append = stack.append
    marks = vm.marks
    memo = vm.memo
    data = vm.data
    view = memoryview(data)
    end = vm.end
    max_memo = vm.limits.max_memo
    fail = vm.fail
    count = vm.count_object
    make_tuple = vm.make_tuple
    readline = vm.readline

    def need_slow(n: int) -> int:
        p = vm.pos
        q = p + n
        if n < 0 or q > end:
            fail(f"length {n} exceeds the {end - p} bytes left")
        fe = vm.frame_end
        if fe >= 0 and q > fe:
            if vm.op_pos < fe:
                fail("an opcode crosses the end of its FRAME")
            vm.frame_end = -1
        vm.pos = q
        return p

    def need(n: int) -> int:
        # Consume n argument bytes and return where they start. The fast path covers
        # unframed streams (protocol 2, what torch writes); framing goes through need_slow.
        p = vm.pos
        q = p + n
        if q > end or vm.frame_end >= 0 or n < 0:
            return need_slow(n)
        vm.pos = q
        return p

    def read(n: int) -> memoryview:
        p = need(n)
        return view[p : p + n]

    def pop() -> Any:
        if len(stack) <= (marks[-1] if marks else 0):
            fail("stack underflow")
        return stack.pop()

    def top() -> Any:
        if len(stack) <= (marks[-1] if marks else 0):
            fail("stack underflow")
        return stack[-1]

    def pop_mark() -> list[Any]:
        if not marks:
            fail("opcode needs a MARK but none is open")
        m = marks.pop()
        items = stack[m:]
        del stack[m:]
        return items

    def put_at(idx: int) -> None:
        memo[idx] = top()
        if len(memo) > max_memo:
            raise LegacyLimitError("memo slots", len(memo), max_memo, region=vm.region, offset=vm.offset)

    def get_at(idx: int) -> None:
        try:
            append(memo[idx])
        except KeyError:
            fail(f"memo slot {idx} was never written")

    # -- framing and structure ------------------------------------------------------------
    def proto() -> None:
        v = data[need(1)]
        if v > _HIGHEST_PROTOCOL:
            fail(f"unsupported pickle protocol {v}")
        vm.proto = v

    def frame() -> None:
        n = _U8(data, need(8))[0]
        if vm.frame_end >= 0 and vm.pos < vm.frame_end:
            fail("FRAME inside an unfinished frame")
        if n > vm.end - vm.pos:
            fail(f"FRAME of {n} bytes exceeds the {vm.end - vm.pos} bytes left")
        vm.frame_end = vm.pos + n

    def stop() -> bool:
        if marks:
            fail("STOP with an open MARK")
        if len(stack) != 1:
            fail(f"STOP with {len(stack)} values on the stack (exactly one expected)")
        if vm.frame_end > vm.pos:
            fail("STOP before the end of its FRAME")
        vm.result = stack.pop()
        return True

    def mark() -> None:
        marks.append(len(stack))

    def pop_() -> None:
        pop()

    def pop_mark_() -> None:
        pop_mark()

    def dup() -> None:
        append(top())

    # -- scalars ----------------------------------------------------------------------------
    def none() -> None:
        append(None)

    def newtrue() -> None:
        append(True)

    def newfalse() -> None:
        append(False)

    def binint() -> None:
        append(_I4(data, need(4))[0])

    def binint1() -> None:
        p = vm.pos
        if p + 1 > end or vm.frame_end >= 0:
            p = need_slow(1)
        else:
            vm.pos = p + 1
        append(data[p])

    def binint2() -> None:
        append(_U2(data, need(2))[0])

    def long1() -> None:
        n = data[need(1)]
        append(int.from_bytes(read(n), "little", signed=True))

    def long4() -> None:
        n = _I4(data, need(4))[0]
        if n < 0:
            fail("negative LONG4 length")
        if n * 8 > _MAX_INT_DIGITS * 4:  # ~4300 decimal digits' worth of bits
            fail(f"LONG4 of {n} bytes is beyond the integer size limit")
        append(int.from_bytes(read(n), "little", signed=True))

    def text_int(line: bytes) -> int:
        digits = line.lstrip(b"+-")
        if len(digits) > _MAX_INT_DIGITS:
            fail(f"decimal integer of {len(digits)} digits exceeds {_MAX_INT_DIGITS}")
        if not digits.isdigit():
            fail(f"malformed decimal integer {line[:40]!r}")
        return int(line)

    def int_() -> None:
        line = readline()
        if line == b"00":
            append(False)
        elif line == b"01":
            append(True)
        else:
            append(text_int(line))

    def long_() -> None:
        line = readline()
        append(text_int(line[:-1] if line.endswith(b"L") else line))

    def float_() -> None:
        line = readline()
        if len(line) > 64:
            fail("FLOAT text too long")
        append(float(line))

    def binfloat() -> None:
        append(_F8(data, need(8))[0])

    # -- strings and bytes ----------------------------------------------------------------
    def binunicode() -> None:
        n = _U4(data, need(4))[0]
        p = need(n)
        append(str(view[p : p + n], "utf-8", "surrogatepass"))

    def short_binunicode() -> None:
        n = data[need(1)]
        append(str(read(n), "utf-8", "surrogatepass"))

    def binunicode8() -> None:
        n = _U8(data, need(8))[0]
        append(str(read(n), "utf-8", "surrogatepass"))

    def unicode_() -> None:
        append(str(readline(), "raw-unicode-escape"))

    def binbytes() -> None:
        append(bytes(read(_U4(data, need(4))[0])))

    def short_binbytes() -> None:
        append(bytes(read(data[need(1)])))

    def binbytes8() -> None:
        append(bytes(read(_U8(data, need(8))[0])))

    def bytearray8() -> None:
        count()
        append(bytearray(read(_U8(data, need(8))[0])))  # counted above

    def py2_str(raw: bytes | bytearray | memoryview) -> str:
        # torch.load decodes Python 2 str with encoding="utf-8"; we do the same.
        return str(raw, "utf-8")

    def binstring() -> None:
        n = _I4(data, need(4))[0]
        if n < 0:
            fail("negative BINSTRING length")
        append(py2_str(read(n)))

    def short_binstring() -> None:
        append(py2_str(read(data[need(1)])))

    def string() -> None:
        line = readline()
        if len(line) < 2 or line[0] != line[-1] or line[0] not in b"\"'":
            fail("STRING argument is not quoted")
        append(py2_str(codecs.escape_decode(line[1:-1])[0]))

    # -- containers -----------------------------------------------------------------------
    def empty_list() -> None:
        count()
        append([])

    def empty_dict() -> None:
        count()
        append({})

    def empty_set() -> None:
        count()
        append(set())

    def empty_tuple() -> None:
        append(())

    def list_() -> None:
        count()
        append(pop_mark())

    def tuple_() -> None:
        count()
        append(make_tuple(pop_mark()))

    def tuple1() -> None:
        count()
        append(make_tuple((pop(),)))

    def tuple2() -> None:
        count()
        b = pop()
        append(make_tuple((pop(), b)))

    def tuple3() -> None:
        count()
        c = pop()
        b = pop()
        append(make_tuple((pop(), b, c)))

    def dict_() -> None:
        count()
        items = pop_mark()
        if len(items) % 2:
            fail("DICT with an odd number of items")
        append(dict(zip(items[::2], items[1::2], strict=True)))

    def frozenset_() -> None:
        count()
        append(frozenset(pop_mark()))

    def append_() -> None:
        value = pop()
        allowlist.extend_list(vm, top(), [value])

    def appends() -> None:
        items = pop_mark()
        allowlist.extend_list(vm, top(), items)

    def setitem() -> None:
        value = pop()
        key = pop()
        allowlist.set_items(vm, top(), [key, value])

    def setitems() -> None:
        items = pop_mark()
        if len(items) % 2:
            fail("SETITEMS with an odd number of items")
        allowlist.set_items(vm, top(), items)

    def additems() -> None:
        items = pop_mark()
        target = top()
        if type(target) is not set:
            fail(f"ADDITEMS on a {type(target).__name__}")
        target.update(items)

    # -- memo -------------------------------------------------------------------------------
    # The five handlers below run for ~80% of the opcodes of a torch pickle; they inline the
    # unframed fast path of need() and the memo/stack helpers.
    def binput() -> None:
        p = vm.pos
        if p + 1 > end or vm.frame_end >= 0:
            p = need_slow(1)
        else:
            vm.pos = p + 1
        if len(stack) <= (marks[-1] if marks else 0):
            fail("stack underflow")
        memo[data[p]] = stack[-1]  # at most 256 slots: no cap check needed

    def long_binput() -> None:
        p = vm.pos
        if p + 4 > end or vm.frame_end >= 0:
            p = need_slow(4)
        else:
            vm.pos = p + 4
        if len(stack) <= (marks[-1] if marks else 0):
            fail("stack underflow")
        memo[_U4(data, p)[0]] = stack[-1]
        if len(memo) > max_memo:
            raise LegacyLimitError("memo slots", len(memo), max_memo, region=vm.region, offset=vm.offset)

    def put() -> None:
        idx = text_int(readline())
        if idx < 0:
            fail("negative PUT index")
        put_at(idx)

    def memoize() -> None:
        put_at(len(memo))

    def binget() -> None:
        p = vm.pos
        if p + 1 > end or vm.frame_end >= 0:
            p = need_slow(1)
        else:
            vm.pos = p + 1
        value = memo.get(data[p], memo)  # the memo itself is the "missing" sentinel
        if value is memo:
            fail(f"memo slot {data[p]} was never written")
        append(value)

    def long_binget() -> None:
        p = vm.pos
        if p + 4 > end or vm.frame_end >= 0:
            p = need_slow(4)
        else:
            vm.pos = p + 4
        idx = _U4(data, p)[0]
        value = memo.get(idx, memo)
        if value is memo:
            fail(f"memo slot {idx} was never written")
        append(value)

    def get() -> None:
        get_at(text_int(readline()))

    # -- globals and objects ------------------------------------------------------------------
    def global_() -> None:
        module = str(readline(), "utf-8")
        name = str(readline(), "utf-8")
        append(vm.resolve_global(module, name))

    def stack_global() -> None:
        name = pop()
        module = pop()
        if type(module) is not str or type(name) is not str:
            fail("STACK_GLOBAL needs two str")
        append(vm.resolve_global(module, name))

    def reduce() -> None:
        args = pop()
        func = pop()
        count()
        append(allowlist.call(vm, func, args, "reduce"))

    def newobj() -> None:
        args = pop()
        cls = pop()
        count()
        append(allowlist.call(vm, cls, args, "newobj"))

    def newobj_ex() -> None:
        kwargs = pop()
        args = pop()
        cls = pop()
        if kwargs != {}:
            raise LegacyUnsupportedError("NEWOBJ_EX with keyword arguments", region=vm.region, offset=vm.offset)
        count()
        append(allowlist.stub_call(vm, cls, args, "newobj"))

    def inst() -> None:
        module = str(readline(), "utf-8")
        name = str(readline(), "utf-8")
        cls = vm.resolve_global(module, name)
        count()
        append(allowlist.stub_call(vm, cls, make_tuple(pop_mark()), "reduce"))

    def obj() -> None:
        items = pop_mark()
        if not items:
            fail("OBJ without a class")
        count()
        append(allowlist.stub_call(vm, items[0], make_tuple(items[1:]), "reduce"))

    def build() -> None:
        state = pop()
        allowlist.build(vm, top(), state)

    def binpersid() -> None:
        pid = pop()
        if vm.persistent_load is None:
            raise UnsafeContentError(
                "persistent id in a pickle that may not have any", region=vm.region, offset=vm.offset
            )
        if type(pid) is not tuple:
            fail(f"persistent id must be a tuple, got {type(pid).__name__}")
        append(vm.persistent_load(pid))

    def persid() -> None:
        raise UnsafeContentError("text PERSID is never written by torch", region=vm.region, offset=vm.offset)

    def ext() -> None:
        raise UnsafeContentError(
            "EXT1/EXT2/EXT4 resolve classes through copyreg; refused", region=vm.region, offset=vm.offset
        )

    def buffer() -> None:
        raise LegacyUnsupportedError("out-of-band pickle buffers", region=vm.region, offset=vm.offset)

    return {
        0x80: proto,
        0x95: frame,
        ord("."): stop,
        ord("("): mark,
        ord("0"): pop_,
        ord("1"): pop_mark_,
        ord("2"): dup,
        ord("N"): none,
        0x88: newtrue,
        0x89: newfalse,
        ord("J"): binint,
        ord("K"): binint1,
        ord("M"): binint2,
        0x8A: long1,
        0x8B: long4,
        ord("I"): int_,
        ord("L"): long_,
        ord("F"): float_,
        ord("G"): binfloat,
        ord("X"): binunicode,
        0x8C: short_binunicode,
        0x8D: binunicode8,
        ord("V"): unicode_,
        ord("B"): binbytes,
        ord("C"): short_binbytes,
        0x8E: binbytes8,
        0x96: bytearray8,
        ord("T"): binstring,
        ord("U"): short_binstring,
        ord("S"): string,
        ord("]"): empty_list,
        ord("}"): empty_dict,
        0x8F: empty_set,
        ord(")"): empty_tuple,
        ord("l"): list_,
        ord("t"): tuple_,
        0x85: tuple1,
        0x86: tuple2,
        0x87: tuple3,
        ord("d"): dict_,
        0x91: frozenset_,
        ord("a"): append_,
        ord("e"): appends,
        ord("s"): setitem,
        ord("u"): setitems,
        0x90: additems,
        ord("q"): binput,
        ord("r"): long_binput,
        ord("p"): put,
        0x94: memoize,
        ord("h"): binget,
        ord("j"): long_binget,
        ord("g"): get,
        ord("c"): global_,
        0x93: stack_global,
        ord("R"): reduce,
        0x81: newobj,
        0x92: newobj_ex,
        ord("i"): inst,
        ord("o"): obj,
        ord("b"): build,
        ord("Q"): binpersid,
        ord("P"): persid,
        0x82: ext,
        0x83: ext,
        0x84: ext,
        0x97: buffer,
        0x98: buffer,
    }
