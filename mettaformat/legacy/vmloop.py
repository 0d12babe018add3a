"""The hot loop of :class:`~mettaformat.legacy.unpickler.PickleVM` for unframed streams.

torch writes protocol 2 (no ``FRAME``); nearly all the opcodes of a torch pickle are the two
dozen run inline here, with the position, the opcode's own offset, the MARK floor and the
object count in local variables. Runs that torch's pickler always writes together are taken
in one step: ``BINGET...``, ``BINGET EMPTY_TUPLE REDUCE|NEWOBJ`` (``OrderedDict()``, module
instances) and a new value followed by its ``BINPUT``/``LONG_BINPUT``. Other opcodes go to
the handlers of :mod:`.opcodes` with the state written back to the VM, and the first
``FRAME`` hands the rest of the stream to the generic loop. Checks, their order, error
messages and offsets are exactly those of :mod:`.opcodes`:

* every argument length is checked against ``end`` before anything is read (F15, F16);
* pops check the stack height above the innermost MARK (F13);
* the memo is a dict with a slot cap, ``GET`` pushes references (F10, F11);
* containers and records count against ``max_objects`` (F11); tuples of tuples go through
  :meth:`PickleVM.make_tuple` (nesting cap);
* ``REDUCE``/``NEWOBJ``/``BUILD``/``SETITEM(S)`` beyond the plain cases go through
  :mod:`.allowlist`; nothing named in the stream is imported or called.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import TYPE_CHECKING, Any, NoReturn

from mettaformat.container.tree import LegacyObject
from mettaformat.errors import LegacyLimitError
from mettaformat.legacy import allowlist
from mettaformat.legacy.allowlist import Builtin

if TYPE_CHECKING:
    from mettaformat.legacy.unpickler import PickleVM

__all__ = ["run_unframed"]

_U2 = struct.Struct("<H").unpack_from
_U4 = struct.Struct("<I").unpack_from
_I4 = struct.Struct("<i").unpack_from
_F8 = struct.Struct(">d").unpack_from
#: LegacyObject's fields in order, so records can be built positionally (twice as fast as
#: with keywords); checked here so that a change to the class cannot go unnoticed.
_POSITIONAL = [f.name for f in dataclasses.fields(LegacyObject)] == [
    "module",
    "name",
    "args",
    "state",
    "items",
    "listitems",
    "kind",
]


def _record(cls: LegacyObject, args: tuple[Any, ...], how: str) -> LegacyObject:
    # What allowlist.stub_call returns for a class it has accepted once already.
    if _POSITIONAL:
        return LegacyObject(cls.module, cls.name, args, None, [], [], how)
    return LegacyObject(cls.module, cls.name, args=args, kind=how)  # pragma: no cover


def run_unframed(vm: PickleVM) -> bool:
    """Interpret opcodes from ``vm.pos`` until ``STOP`` or the first ``FRAME``.

    Args:
        vm: the machine; its position, object count and error offset are kept up to date
            whenever control leaves this function or calls out of it.

    Returns:
        True once ``STOP`` has run, False when a ``FRAME`` opened (``vm.frame_end >= 0``).

    Raises:
        MettaFormatError: as the opcode handlers. Other exceptions propagate with
            ``vm.op_pos`` naming the opcode that raised them.
    """
    data = vm.data
    view = memoryview(data)
    end = vm.end
    stack = vm.stack
    append = stack.append
    pop = stack.pop
    marks = vm.marks
    memo = vm.memo
    dispatch = vm._dispatch
    fail = vm.fail
    make_tuple = vm.make_tuple
    max_memo = vm.limits.max_memo
    max_objects = vm.limits.max_objects
    call = allowlist.call
    ordered_dict = allowlist.ordered_dict
    # Globals that allowlist.stub_call accepted: calling them again only records the call.
    # (A global's module, name and kind never change once resolved.)
    stubbed: set[LegacyObject] = set()
    objects = vm._objects
    pos = vm.pos
    op_pos = vm.op_pos
    # Height of the stack above which values may be popped (the innermost MARK), F13.
    floor = marks[-1] if marks else 0
    value: Any = None

    def short(at: int, p: int, n: int) -> NoReturn:
        # need(n) at argument offset p ran past the end of the stream.
        vm.op_pos = at
        fail(f"length {n} exceeds the {end - p} bytes left")

    def underflow(at: int) -> NoReturn:
        vm.op_pos = at
        fail("stack underflow")

    def too_many(at: int, count: int) -> NoReturn:
        vm.op_pos = at
        vm._objects = count
        raise LegacyLimitError("pickle objects", count, max_objects, region=vm.region, offset=vm.offset)

    def memo_full(at: int) -> NoReturn:
        vm.op_pos = at
        raise LegacyLimitError("memo slots", len(memo), max_memo, region=vm.region, offset=vm.offset)

    def tuple_of(items: list[Any], at: int) -> tuple[Any, ...]:
        # Only tuples of tuples need make_tuple's nesting bookkeeping.
        for x in items:
            if type(x) is tuple:
                vm.op_pos = at
                return make_tuple(items)
        return tuple(items)

    def invoke(op: int, func: Any, args: Any) -> Any:
        # REDUCE/NEWOBJ through the allowlist (the caller has set vm.op_pos).
        value = call(vm, func, args, "reduce" if op == 0x52 else "newobj")
        if type(func) is LegacyObject:
            stubbed.add(func)  # call() only returns for globals stub_call accepted
        return value

    try:
        while True:
            if pos >= end:
                vm.op_pos = op_pos
                fail("pickle ends without STOP")
            op_pos = pos
            op = data[pos]
            if op == 0x68:  # BINGET, usually several in a row
                while True:
                    if pos + 2 > end:
                        short(pos, pos + 1, 1)
                    try:
                        append(memo[data[pos + 1]])
                    except KeyError:
                        vm.op_pos = pos
                        fail(f"memo slot {data[pos + 1]} was never written")
                    pos += 2
                    if pos >= end:
                        break
                    op = data[pos]
                    if op != 0x68:
                        break
                    op_pos = pos
                # "BINGET... EMPTY_TUPLE REDUCE|NEWOBJ [LONG_BINPUT]" is how torch's pickler
                # writes OrderedDict() and every module instance: run the call here. The
                # EMPTY_TUPLE needs no check; its tuple is passed without being pushed.
                if pos + 1 >= end or op != 0x29:
                    continue
                op = data[pos + 1]
                if op != 0x52 and op != 0x81:
                    continue
                pos += 1
                op_pos = pos
                if len(stack) <= floor:
                    underflow(pos)
                objects += 1
                if objects > max_objects:
                    too_many(pos, objects)
                func = pop()
                vm.op_pos = pos
                if type(func) is LegacyObject and func in stubbed:
                    value = _record(func, (), "reduce" if op == 0x52 else "newobj")
                elif op == 0x52 and type(func) is Builtin and func.fn is ordered_dict:
                    value = {}
                else:
                    value = invoke(op, func, ())
                pos += 1
            # The rest, most frequent first. Opcodes that push one new value leave it in
            # ``value`` and fall out of the chain; torch's pickler memoizes most of them, and
            # a BINPUT/LONG_BINPUT right after runs below (its stack check holds trivially).
            elif op == 0x6A:  # LONG_BINGET
                if pos + 5 > end:
                    short(pos, pos + 1, 4)
                idx = _U4(data, pos + 1)[0]
                try:
                    append(memo[idx])
                except KeyError:
                    vm.op_pos = pos
                    fail(f"memo slot {idx} was never written")
                pos += 5
                continue
            elif op == 0x7D or op == 0x5D:  # EMPTY_DICT, EMPTY_LIST
                objects += 1
                if objects > max_objects:
                    too_many(pos, objects)
                value = {} if op == 0x7D else []
                pos += 1
            elif op == 0x4B:  # BININT1
                if pos + 2 > end:
                    short(pos, pos + 1, 1)
                append(data[pos + 1])
                pos += 2
                continue
            elif op == 0x28:  # MARK
                floor = len(stack)
                marks.append(floor)
                pos += 1
                continue
            elif op == 0x58:  # BINUNICODE
                if pos + 5 > end:
                    short(pos, pos + 1, 4)
                q = pos + 5 + _U4(data, pos + 1)[0]
                if q > end:
                    short(pos, pos + 5, q - pos - 5)
                value = str(view[pos + 5 : q], "utf-8", "surrogatepass")
                pos = q
            elif op == 0x75:  # SETITEMS
                if not marks:
                    vm.op_pos = pos
                    fail("opcode needs a MARK but none is open")
                m = marks.pop()
                floor = marks[-1] if marks else 0
                items = stack[m:]
                del stack[m:]
                if len(items) % 2:
                    vm.op_pos = pos
                    fail("SETITEMS with an odd number of items")
                if len(stack) <= floor:
                    underflow(pos)
                target = stack[-1]
                if type(target) is dict:
                    it = iter(items)
                    for key in it:  # an even count: next() never runs out
                        target[key] = next(it)
                else:
                    vm.op_pos = pos
                    allowlist.set_items(vm, target, items)
                pos += 1
                continue
            elif op == 0x62:  # BUILD
                if len(stack) - 2 < floor:
                    underflow(pos)
                state = pop()
                target = stack[-1]
                if type(target) is LegacyObject and target.state is None:
                    target.state = state
                else:
                    vm.op_pos = pos
                    allowlist.build(vm, target, state)
                pos += 1
                continue
            elif op == 0x52 or op == 0x81:  # REDUCE, NEWOBJ (other than after BINGET/EMPTY_TUPLE)
                if len(stack) - 2 < floor:
                    underflow(pos)
                objects += 1
                if objects > max_objects:
                    too_many(pos, objects)
                args = pop()
                func = pop()
                vm.op_pos = pos
                if type(func) is LegacyObject and func in stubbed and type(args) is tuple:
                    value = _record(func, args, "reduce" if op == 0x52 else "newobj")
                elif op == 0x52 and type(func) is Builtin and type(args) is tuple:
                    value = {} if not args and func.fn is ordered_dict else func.fn(vm, args)
                else:
                    value = invoke(op, func, args)
                pos += 1
            elif op == 0x88:  # NEWTRUE
                append(True)
                pos += 1
                continue
            elif 0x85 <= op <= 0x87:  # TUPLE1, TUPLE2, TUPLE3
                objects += 1
                if objects > max_objects:
                    too_many(pos, objects)
                n = op - 0x84
                if len(stack) - n < floor:
                    underflow(pos)
                value = tuple_of(stack[-n:], pos)
                del stack[-n:]
                pos += 1
            elif op == 0x74:  # TUPLE
                objects += 1
                if objects > max_objects:
                    too_many(pos, objects)
                if not marks:
                    vm.op_pos = pos
                    fail("opcode needs a MARK but none is open")
                m = marks.pop()
                floor = marks[-1] if marks else 0
                value = tuple_of(stack[m:], pos)
                del stack[m:]
                pos += 1
            elif op == 0x89:  # NEWFALSE
                append(False)
                pos += 1
                continue
            elif op == 0x29:  # EMPTY_TUPLE
                value = ()
                pos += 1
            elif op == 0x4E:  # NONE
                append(None)
                pos += 1
                continue
            elif op == 0x72:  # LONG_BINPUT
                if pos + 5 > end:
                    short(pos, pos + 1, 4)
                if len(stack) <= floor:
                    underflow(pos)
                memo[_U4(data, pos + 1)[0]] = stack[-1]
                if len(memo) > max_memo:
                    memo_full(pos)
                pos += 5
                continue
            elif op == 0x71:  # BINPUT
                if pos + 2 > end:
                    short(pos, pos + 1, 1)
                if len(stack) <= floor:
                    underflow(pos)
                memo[data[pos + 1]] = stack[-1]  # at most 256 slots: no cap check needed
                pos += 2
                continue
            elif op == 0x47:  # BINFLOAT
                if pos + 9 > end:
                    short(pos, pos + 1, 8)
                append(_F8(data, pos + 1)[0])
                pos += 9
                continue
            elif op == 0x4D:  # BININT2
                if pos + 3 > end:
                    short(pos, pos + 1, 2)
                append(_U2(data, pos + 1)[0])
                pos += 3
                continue
            elif op == 0x73:  # SETITEM
                if len(stack) - 3 < floor:
                    underflow(pos)
                value = pop()
                key = pop()
                target = stack[-1]
                if type(target) is dict:
                    target[key] = value
                else:
                    vm.op_pos = pos
                    allowlist.set_items(vm, target, [key, value])
                pos += 1
                continue
            elif op == 0x61:  # APPEND
                if len(stack) - 2 < floor:
                    underflow(pos)
                value = pop()
                target = stack[-1]
                if type(target) is list:
                    target.append(value)
                else:
                    vm.op_pos = pos
                    allowlist.extend_list(vm, target, [value])
                pos += 1
                continue
            elif op == 0x4A:  # BININT
                if pos + 5 > end:
                    short(pos, pos + 1, 4)
                append(_I4(data, pos + 1)[0])
                pos += 5
                continue
            else:
                # Everything else, STOP and FRAME included, runs its handler on the VM's state.
                vm.op_pos = pos
                vm.pos = pos + 1
                vm._objects = objects
                done = dispatch[op]()
                pos = vm.pos
                objects = vm._objects
                if done:
                    return True
                if vm.frame_end >= 0:
                    return False
                floor = marks[-1] if marks else 0
                continue
            # A new value to push, and maybe memoize.
            append(value)
            if pos + 2 <= end:
                op = data[pos]
                if op == 0x72:  # LONG_BINPUT
                    if pos + 5 <= end:
                        op_pos = pos
                        memo[_U4(data, pos + 1)[0]] = value
                        if len(memo) > max_memo:
                            memo_full(pos)
                        pos += 5
                elif op == 0x71:  # BINPUT
                    op_pos = pos
                    memo[data[pos + 1]] = value
                    pos += 2
    except BaseException:
        vm.op_pos = op_pos
        raise
    finally:
        vm.pos = pos
        vm._objects = objects
