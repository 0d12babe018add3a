"""The one interpreter loop of :class:`~mettaformat.legacy.unpickler.PickleVM`.

The opcodes of a torch pickle run inline here, with the position, the opcode's offset, the read
limit, the MARK floor and the object count in locals; every other opcode runs its handler from
:data:`.opcodes.TABLE` with that state written back to the VM. Each opcode is in exactly one of
the two places. Runs torch's pickler always writes together are taken in one step: ``BINGET...``,
``BINGET EMPTY_TUPLE REDUCE|NEWOBJ`` (``OrderedDict()``, module instances), and a new value
followed by its ``BINPUT``/``LONG_BINPUT``/``MEMOIZE``. The checks are the VM's: arguments against
``limit`` (the end of the current ``FRAME``, else of the stream) before any read; pops against the
innermost MARK; the memo slot cap; ``max_objects``; tuple nesting and tuple-key hashing through
:meth:`PickleVM.make_tuple`/:meth:`~PickleVM.charge_keys`; anything beyond plain containers through
:mod:`.allowlist`. Nothing named in the stream is imported or called.
"""

from __future__ import annotations

import pickle
import struct
from typing import TYPE_CHECKING, Any, Final

from mettaformat.container.tree import LegacyObject
from mettaformat.legacy import allowlist
from mettaformat.legacy.allowlist import Builtin
from mettaformat.legacy.opcodes import TABLE

if TYPE_CHECKING:
    from mettaformat.legacy.unpickler import PickleVM

__all__ = ["INLINE", "RECORD_FIELDS", "run_loop"]

_U2 = struct.Struct("<H").unpack_from
_U4 = struct.Struct("<I").unpack_from
_I4 = struct.Struct("<i").unpack_from
_F8 = struct.Struct(">d").unpack_from
#: The opcodes this loop runs itself; every other opcode is looked up in ``TABLE``.
INLINE: Final = frozenset(
    op[0]
    for op in (
        pickle.BINGET, pickle.LONG_BINGET, pickle.EMPTY_DICT, pickle.EMPTY_LIST, pickle.BININT1, pickle.MARK,
        pickle.BINUNICODE, pickle.SHORT_BINUNICODE, pickle.SETITEMS, pickle.BUILD, pickle.REDUCE, pickle.NEWOBJ,
        pickle.NEWTRUE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3, pickle.TUPLE, pickle.NEWFALSE,
        pickle.EMPTY_TUPLE, pickle.NONE, pickle.LONG_BINPUT, pickle.BINPUT, pickle.MEMOIZE, pickle.BINFLOAT,
        pickle.BININT2, pickle.SETITEM, pickle.APPEND, pickle.BININT,
    )
)  # fmt: skip
#: The fields of LegacyObject in order: records are built positionally, twice as fast as with
#: keywords (a test checks the order).
RECORD_FIELDS: Final = ("module", "name", "args", "state", "items", "listitems", "kind")


def _record(cls: LegacyObject, args: tuple[Any, ...], how: str) -> LegacyObject:
    # What allowlist.stub_call returns for a class it has accepted once already.
    return LegacyObject(cls.module, cls.name, args, None, [], [], how)


def run_loop(vm: PickleVM) -> None:
    """Interpret opcodes from ``vm.pos`` until ``STOP``; the value is left in ``vm.result``.

    Args:
        vm: the machine; its position, object count and error offset are kept up to date
            whenever control leaves this function or calls out of it.

    Raises:
        MettaFormatError: malformed input or a cap reached. Other exceptions propagate with
            ``vm.op_pos`` naming the opcode that raised them (the VM turns them into format errors).
    """
    # Opcode bytes, bound to locals (as fast as literals in the comparisons below).
    BINGET, LONG_BINGET, EMPTY_TUPLE = pickle.BINGET[0], pickle.LONG_BINGET[0], pickle.EMPTY_TUPLE[0]
    REDUCE, NEWOBJ = pickle.REDUCE[0], pickle.NEWOBJ[0]
    EMPTY_DICT, EMPTY_LIST = pickle.EMPTY_DICT[0], pickle.EMPTY_LIST[0]
    BININT1, BININT2, BININT, MARK = pickle.BININT1[0], pickle.BININT2[0], pickle.BININT[0], pickle.MARK[0]
    BINUNICODE, SHORT_BINUNICODE = pickle.BINUNICODE[0], pickle.SHORT_BINUNICODE[0]
    SETITEMS, SETITEM, BUILD, APPEND = pickle.SETITEMS[0], pickle.SETITEM[0], pickle.BUILD[0], pickle.APPEND[0]
    NEWTRUE, NEWFALSE, NONE, BINFLOAT = pickle.NEWTRUE[0], pickle.NEWFALSE[0], pickle.NONE[0], pickle.BINFLOAT[0]
    TUPLE, TUPLE1, TUPLE3 = pickle.TUPLE[0], pickle.TUPLE1[0], pickle.TUPLE3[0]
    BINPUT, LONG_BINPUT, MEMOIZE = pickle.BINPUT[0], pickle.LONG_BINPUT[0], pickle.MEMOIZE[0]

    data = vm.data
    view = memoryview(data)
    end = vm.end
    stack = vm.stack
    append = stack.append
    pop = stack.pop
    marks = vm.marks
    memo = vm.memo
    table = TABLE
    make_tuple = vm.make_tuple
    charge_keys = vm.charge_keys
    max_memo = vm.limits.max_memo
    max_objects = vm.limits.max_objects
    call = allowlist.call
    ordered_dict = allowlist.ordered_dict
    # Globals that allowlist.stub_call accepted: calling them again only records the call.
    # (A global's module, name and kind never change once resolved.)
    stubbed: set[LegacyObject] = set()
    objects = vm.objects
    pos = vm.pos
    op_pos = pos
    limit = vm.limit
    # Height of the stack above which values may be popped (the innermost MARK).
    floor = marks[-1] if marks else 0
    value: Any = None

    def at(p: int) -> PickleVM:
        # Name the opcode at p in the error about to be raised.
        vm.op_pos = p
        return vm

    def tuple_of(items: list[Any], at: int) -> tuple[Any, ...]:
        # Only tuples of tuples need make_tuple's bookkeeping.
        for x in items:
            if type(x) is tuple:
                vm.op_pos = at
                return make_tuple(items)
        return tuple(items)

    def invoke(op: int, func: Any, args: Any) -> Any:
        # REDUCE/NEWOBJ through the allowlist (the caller has set vm.op_pos).
        value = call(vm, func, args, "reduce" if op == REDUCE else "newobj")
        if type(func) is LegacyObject:
            stubbed.add(func)  # call() only returns for globals stub_call accepted
        return value

    try:
        while True:
            if pos >= limit:
                if pos >= end:
                    at(op_pos).fail("pickle ends without STOP")
                # The current FRAME is used up; the stream continues unframed.
                vm.frame_end = -1
                limit = vm.limit = end
            op_pos = pos
            op = data[pos]
            if op == BINGET:  # usually several in a row
                while True:
                    if pos + 2 > limit:
                        at(pos).short(pos + 1, 1)
                    try:
                        append(memo[data[pos + 1]])
                    except KeyError:
                        at(pos).missing(data[pos + 1])
                    pos += 2
                    if pos >= limit:
                        break
                    op = data[pos]
                    if op != BINGET:
                        break
                    op_pos = pos
                # "BINGET... EMPTY_TUPLE REDUCE|NEWOBJ" is how torch's pickler writes
                # OrderedDict() and every module instance: run the call here. The EMPTY_TUPLE
                # needs no check; its tuple is passed without being pushed.
                if pos + 1 >= limit or op != EMPTY_TUPLE:
                    continue
                op = data[pos + 1]
                if op != REDUCE and op != NEWOBJ:
                    continue
                pos += 1
                op_pos = pos
                if len(stack) <= floor:
                    at(pos).underflow()
                objects += 1
                if objects > max_objects:
                    at(pos).too_many(objects)
                func = pop()
                vm.op_pos = pos
                if type(func) is LegacyObject and func in stubbed:
                    value = _record(func, (), "reduce" if op == REDUCE else "newobj")
                elif op == REDUCE and type(func) is Builtin and func.fn is ordered_dict:
                    value = ordered_dict(vm, ())
                else:
                    value = invoke(op, func, ())
                pos += 1
            # The rest, most frequent first. Opcodes that push one new value leave it in
            # ``value`` and fall out of the chain; torch's pickler memoizes most of them, and
            # a BINPUT/LONG_BINPUT/MEMOIZE right after runs below.
            elif op == LONG_BINGET:
                if pos + 5 > limit:
                    at(pos).short(pos + 1, 4)
                idx = _U4(data, pos + 1)[0]
                try:
                    append(memo[idx])
                except KeyError:
                    at(pos).missing(idx)
                pos += 5
                continue
            elif op == EMPTY_DICT or op == EMPTY_LIST:
                objects += 1
                if objects > max_objects:
                    at(pos).too_many(objects)
                value = {} if op == EMPTY_DICT else []
                pos += 1
            elif op == BININT1:
                if pos + 2 > limit:
                    at(pos).short(pos + 1, 1)
                append(data[pos + 1])
                pos += 2
                continue
            elif op == MARK:
                floor = len(stack)
                marks.append(floor)
                pos += 1
                continue
            elif op == BINUNICODE:
                if pos + 5 > limit:
                    at(pos).short(pos + 1, 4)
                q = pos + 5 + _U4(data, pos + 1)[0]
                if q > limit:
                    at(pos).short(pos + 5, q - pos - 5)
                value = str(view[pos + 5 : q], "utf-8", "surrogatepass")
                pos = q
            elif op == SETITEMS:
                if not marks:
                    at(pos).no_mark()
                m = marks.pop()
                floor = marks[-1] if marks else 0
                items = stack[m:]
                del stack[m:]
                if len(items) % 2:
                    at(pos).fail("SETITEMS with an odd number of items")
                if len(stack) <= floor:
                    at(pos).underflow()
                target = stack[-1]
                if type(target) is dict:
                    it = iter(items)
                    if tuple in map(type, items[::2]):
                        vm.op_pos = pos
                        charge_keys(items[::2])
                    for key in it:  # an even count: next() never runs out
                        target[key] = next(it)
                else:
                    vm.op_pos = pos
                    allowlist.set_items(vm, target, items)
                pos += 1
                continue
            elif op == BUILD:
                if len(stack) - 2 < floor:
                    at(pos).underflow()
                state = pop()
                target = stack[-1]
                if type(target) is LegacyObject and target.state is None:
                    target.state = state
                else:
                    vm.op_pos = pos
                    allowlist.build(vm, target, state)
                pos += 1
                continue
            elif op == REDUCE or op == NEWOBJ:  # (other than after BINGET EMPTY_TUPLE)
                if len(stack) - 2 < floor:
                    at(pos).underflow()
                objects += 1
                if objects > max_objects:
                    at(pos).too_many(objects)
                args = pop()
                func = pop()
                vm.op_pos = pos
                if type(func) is LegacyObject and func in stubbed and type(args) is tuple:
                    value = _record(func, args, "reduce" if op == REDUCE else "newobj")
                elif op == REDUCE and type(func) is Builtin and type(args) is tuple:
                    value = func.fn(vm, args)
                else:
                    value = invoke(op, func, args)
                pos += 1
            elif op == NEWTRUE:
                append(True)
                pos += 1
                continue
            elif TUPLE1 <= op <= TUPLE3:
                objects += 1
                if objects > max_objects:
                    at(pos).too_many(objects)
                n = op - TUPLE1 + 1
                if len(stack) - n < floor:
                    at(pos).underflow()
                value = tuple_of(stack[-n:], pos)
                del stack[-n:]
                pos += 1
            elif op == TUPLE:
                objects += 1
                if objects > max_objects:
                    at(pos).too_many(objects)
                if not marks:
                    at(pos).no_mark()
                m = marks.pop()
                floor = marks[-1] if marks else 0
                value = tuple_of(stack[m:], pos)
                del stack[m:]
                pos += 1
            elif op == NEWFALSE:
                append(False)
                pos += 1
                continue
            elif op == EMPTY_TUPLE:
                value = ()
                pos += 1
            elif op == NONE:
                append(None)
                pos += 1
                continue
            elif op == LONG_BINPUT or op == BINPUT or op == MEMOIZE:
                # Not right after a new value (those run below).
                n = 4 if op == LONG_BINPUT else 1 if op == BINPUT else 0
                if pos + 1 + n > limit:
                    at(pos).short(pos + 1, n)
                if len(stack) <= floor:
                    at(pos).underflow()
                memo[_U4(data, pos + 1)[0] if n == 4 else data[pos + 1] if n else len(memo)] = stack[-1]
                if len(memo) > max_memo:
                    at(pos).memo_full()
                pos += 1 + n
                continue
            elif op == BINFLOAT:
                if pos + 9 > limit:
                    at(pos).short(pos + 1, 8)
                append(_F8(data, pos + 1)[0])
                pos += 9
                continue
            elif op == BININT2:
                if pos + 3 > limit:
                    at(pos).short(pos + 1, 2)
                append(_U2(data, pos + 1)[0])
                pos += 3
                continue
            elif op == SETITEM:
                if len(stack) - 3 < floor:
                    at(pos).underflow()
                value = pop()
                key = pop()
                target = stack[-1]
                if type(target) is dict and type(key) is not tuple:
                    target[key] = value
                else:
                    vm.op_pos = pos
                    allowlist.set_items(vm, target, [key, value])
                pos += 1
                continue
            elif op == APPEND:
                if len(stack) - 2 < floor:
                    at(pos).underflow()
                value = pop()
                target = stack[-1]
                if type(target) is list:
                    target.append(value)
                else:
                    vm.op_pos = pos
                    allowlist.extend_list(vm, target, [value])
                pos += 1
                continue
            elif op == SHORT_BINUNICODE:
                if pos + 2 > limit:
                    at(pos).short(pos + 1, 1)
                q = pos + 2 + data[pos + 1]
                if q > limit:
                    at(pos).short(pos + 2, q - pos - 2)
                value = str(view[pos + 2 : q], "utf-8", "surrogatepass")
                pos = q
            elif op == BININT:
                if pos + 5 > limit:
                    at(pos).short(pos + 1, 4)
                append(_I4(data, pos + 1)[0])
                pos += 5
                continue
            else:
                # Everything else, STOP and FRAME included, runs its handler on the VM's state.
                vm.op_pos = pos
                vm.pos = pos + 1
                vm.objects = objects
                done = table[op](vm)
                pos = vm.pos
                objects = vm.objects
                limit = vm.limit
                if done:
                    return
                floor = marks[-1] if marks else 0
                continue
            # A new value to push, and maybe memoize.
            append(value)
            if pos + 1 <= limit:
                op = data[pos]
                if op == LONG_BINPUT:
                    if pos + 5 <= limit:
                        op_pos = pos
                        memo[_U4(data, pos + 1)[0]] = value
                        if len(memo) > max_memo:
                            at(pos).memo_full()
                        pos += 5
                elif op == BINPUT:
                    if pos + 2 <= limit:
                        op_pos = pos
                        memo[data[pos + 1]] = value  # at most 256 slots: no cap check needed
                        pos += 2
                elif op == MEMOIZE:
                    op_pos = pos
                    memo[len(memo)] = value
                    if len(memo) > max_memo:
                        at(pos).memo_full()
                    pos += 1
    except BaseException:
        vm.op_pos = op_pos
        raise
    finally:
        vm.pos = pos
        vm.objects = objects
