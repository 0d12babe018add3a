"""The rare opcodes of :class:`~mettaformat.legacy.unpickler.PickleVM`, protocols 0 to 5, as a table.

The loop in :mod:`.vmloop` runs the opcodes torch writes inline and looks everything else up
in :data:`TABLE` (opcode byte -> handler). A handler takes the machine, reads its arguments
through :meth:`PickleVM.need`/:meth:`~PickleVM.read`/:meth:`~PickleVM.readline` and returns
True only for ``STOP``. Opcode bytes come from the :mod:`pickle` module. Semantics follow
CPython's ``Lib/pickle.py``, except that:

* globals resolve through :mod:`.allowlist` (inert values) and ``REDUCE``/``NEWOBJ`` on an
  unknown class records a :class:`LegacyObject` instead of calling anything;
* ``EXT1/2/4``, text ``PERSID`` and out-of-band buffers are rejected;
* ``INST``/``OBJ``/``NEWOBJ_EX`` only ever record stubs;
* ``POP`` never pops a MARK, and ``STOP`` requires exactly one value and no open MARK.
"""

from __future__ import annotations

import codecs
import pickle
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from mettaformat.errors import LegacyUnsupportedError, UnsafeContentError
from mettaformat.legacy import allowlist

if TYPE_CHECKING:
    from mettaformat.legacy.unpickler import PickleVM

__all__ = ["HANDLED", "TABLE", "Handler"]

Handler = Callable[["PickleVM"], "bool | None"]

_U4 = struct.Struct("<I").unpack_from
_I4 = struct.Struct("<i").unpack_from
_U8 = struct.Struct("<Q").unpack_from
#: CPython's int/str conversion limit since CVE-2020-10735.
_MAX_INT_DIGITS: Final = 4300


# -- framing and structure ----------------------------------------------------------------------
def _proto(vm: PickleVM) -> None:
    v = vm.data[vm.need(1)]
    if v > pickle.HIGHEST_PROTOCOL:
        vm.fail(f"unsupported pickle protocol {v}")
    vm.proto = v


def _frame(vm: PickleVM) -> None:
    n = _U8(vm.data, vm.need(8))[0]
    if vm.frame_end >= 0:
        vm.fail("FRAME inside an unfinished frame")
    if n > vm.end - vm.pos:
        vm.fail(f"FRAME of {n} bytes exceeds the {vm.end - vm.pos} bytes left")
    vm.frame_end = vm.limit = vm.pos + n


def _stop(vm: PickleVM) -> bool:
    if vm.marks:
        vm.fail("STOP with an open MARK")
    if len(vm.stack) != 1:
        vm.fail(f"STOP with {len(vm.stack)} values on the stack (exactly one expected)")
    if vm.frame_end > vm.pos:
        vm.fail("STOP before the end of its FRAME")
    vm.result = vm.stack.pop()
    return True


def _pop(vm: PickleVM) -> None:
    vm.pop()


def _pop_mark(vm: PickleVM) -> None:
    vm.pop_mark()


def _dup(vm: PickleVM) -> None:
    vm.stack.append(vm.top())


# -- scalars --------------------------------------------------------------------------------------
def _long1(vm: PickleVM) -> None:
    n = vm.data[vm.need(1)]
    vm.stack.append(int.from_bytes(vm.read(n), "little", signed=True))


def _long4(vm: PickleVM) -> None:
    n = _I4(vm.data, vm.need(4))[0]
    if n < 0:
        vm.fail("negative LONG4 length")
    if n * 8 > _MAX_INT_DIGITS * 4:  # ~4300 decimal digits' worth of bits
        vm.fail(f"LONG4 of {n} bytes is beyond the integer size limit")
    vm.stack.append(int.from_bytes(vm.read(n), "little", signed=True))


def _text_int(vm: PickleVM, line: bytes) -> int:
    digits = line.lstrip(b"+-")
    if len(digits) > _MAX_INT_DIGITS:
        vm.fail(f"decimal integer of {len(digits)} digits exceeds {_MAX_INT_DIGITS}")
    if not digits.isdigit():
        vm.fail(f"malformed decimal integer {line[:40]!r}")
    return int(line)


def _int(vm: PickleVM) -> None:
    line = vm.readline()
    vm.stack.append(False if line == b"00" else True if line == b"01" else _text_int(vm, line))


def _long(vm: PickleVM) -> None:
    line = vm.readline()
    vm.stack.append(_text_int(vm, line[:-1] if line.endswith(b"L") else line))


def _float(vm: PickleVM) -> None:
    line = vm.readline()
    if len(line) > 64:
        vm.fail("FLOAT text too long")
    vm.stack.append(float(line))


# -- strings and bytes ----------------------------------------------------------------------------
def _binunicode8(vm: PickleVM) -> None:
    vm.stack.append(str(vm.read(_U8(vm.data, vm.need(8))[0]), "utf-8", "surrogatepass"))


def _unicode(vm: PickleVM) -> None:
    vm.stack.append(str(vm.readline(), "raw-unicode-escape"))


def _binbytes(vm: PickleVM) -> None:
    vm.stack.append(bytes(vm.read(_U4(vm.data, vm.need(4))[0])))


def _short_binbytes(vm: PickleVM) -> None:
    vm.stack.append(bytes(vm.read(vm.data[vm.need(1)])))


def _binbytes8(vm: PickleVM) -> None:
    vm.stack.append(bytes(vm.read(_U8(vm.data, vm.need(8))[0])))


def _bytearray8(vm: PickleVM) -> None:
    vm.count_object()
    vm.stack.append(bytearray(vm.read(_U8(vm.data, vm.need(8))[0])))


def _py2_str(raw: bytes | bytearray | memoryview) -> str:
    # torch.load decodes Python 2 str with encoding="utf-8"; we do the same.
    return str(raw, "utf-8")


def _binstring(vm: PickleVM) -> None:
    n = _I4(vm.data, vm.need(4))[0]
    if n < 0:
        vm.fail("negative BINSTRING length")
    vm.stack.append(_py2_str(vm.read(n)))


def _short_binstring(vm: PickleVM) -> None:
    vm.stack.append(_py2_str(vm.read(vm.data[vm.need(1)])))


def _string(vm: PickleVM) -> None:
    line = vm.readline()
    if len(line) < 2 or line[0] != line[-1] or line[0] not in b"\"'":
        vm.fail("STRING argument is not quoted")
    vm.stack.append(_py2_str(codecs.escape_decode(line[1:-1])[0]))


# -- containers -------------------------------------------------------------------------------------
def _empty_set(vm: PickleVM) -> None:
    vm.count_object()
    vm.stack.append(set())


def _list(vm: PickleVM) -> None:
    vm.count_object()
    vm.stack.append(vm.pop_mark())


def _dict(vm: PickleVM) -> None:
    vm.count_object()
    items = vm.pop_mark()
    if len(items) % 2:
        vm.fail("DICT with an odd number of items")
    vm.charge_keys(items[::2])
    vm.stack.append(dict(zip(items[::2], items[1::2], strict=True)))


def _frozenset(vm: PickleVM) -> None:
    vm.count_object()
    items = vm.pop_mark()
    vm.charge_keys(items)
    vm.stack.append(frozenset(items))


def _appends(vm: PickleVM) -> None:
    items = vm.pop_mark()
    allowlist.extend_list(vm, vm.top(), items)


def _additems(vm: PickleVM) -> None:
    items = vm.pop_mark()
    target = vm.top()
    if type(target) is not set:
        vm.fail(f"ADDITEMS on a {type(target).__name__}")
    vm.charge_keys(items)
    target.update(items)


# -- memo ---------------------------------------------------------------------------------------------
def _put(vm: PickleVM) -> None:
    idx = _text_int(vm, vm.readline())
    if idx < 0:
        vm.fail("negative PUT index")
    vm.memo_put(idx, vm.top())


def _get(vm: PickleVM) -> None:
    vm.stack.append(vm.memo_get(_text_int(vm, vm.readline())))


# -- globals and objects ------------------------------------------------------------------------------
def _global(vm: PickleVM) -> None:
    module = str(vm.readline(), "utf-8")
    name = str(vm.readline(), "utf-8")
    vm.stack.append(vm.resolve_global(module, name))


def _stack_global(vm: PickleVM) -> None:
    name = vm.pop()
    module = vm.pop()
    if type(module) is not str or type(name) is not str:
        vm.fail("STACK_GLOBAL needs two str")
    vm.stack.append(vm.resolve_global(module, name))


def _newobj_ex(vm: PickleVM) -> None:
    kwargs = vm.pop()
    args = vm.pop()
    cls = vm.pop()
    if kwargs != {}:
        raise LegacyUnsupportedError("NEWOBJ_EX with keyword arguments", region=vm.region, offset=vm.offset)
    vm.count_object()
    vm.stack.append(allowlist.stub_call(vm, cls, args, "newobj"))


def _inst(vm: PickleVM) -> None:
    module = str(vm.readline(), "utf-8")
    name = str(vm.readline(), "utf-8")
    cls = vm.resolve_global(module, name)
    vm.count_object()
    vm.stack.append(allowlist.stub_call(vm, cls, vm.make_tuple(vm.pop_mark()), "reduce"))


def _obj(vm: PickleVM) -> None:
    items = vm.pop_mark()
    if not items:
        vm.fail("OBJ without a class")
    vm.count_object()
    vm.stack.append(allowlist.stub_call(vm, items[0], vm.make_tuple(items[1:]), "reduce"))


def _binpersid(vm: PickleVM) -> None:
    pid = vm.pop()
    if vm.persistent_load is None:
        raise UnsafeContentError("persistent id in a pickle that may not have any", region=vm.region, offset=vm.offset)
    if type(pid) is not tuple:
        vm.fail(f"persistent id must be a tuple, got {type(pid).__name__}")
    vm.stack.append(vm.persistent_load(pid))


def _persid(vm: PickleVM) -> None:
    raise UnsafeContentError("text PERSID is never written by torch", region=vm.region, offset=vm.offset)


def _ext(vm: PickleVM) -> None:
    raise UnsafeContentError(
        "EXT1/EXT2/EXT4 resolve classes through copyreg; refused", region=vm.region, offset=vm.offset
    )


def _buffer(vm: PickleVM) -> None:
    raise LegacyUnsupportedError("out-of-band pickle buffers", region=vm.region, offset=vm.offset)


def _unknown(vm: PickleVM) -> None:
    vm.fail(f"unknown opcode 0x{vm.data[vm.op_pos]:02x}")


_BY_NAME: Final[dict[bytes, Handler]] = {
    pickle.PROTO: _proto,
    pickle.FRAME: _frame,
    pickle.STOP: _stop,
    pickle.POP: _pop,
    pickle.POP_MARK: _pop_mark,
    pickle.DUP: _dup,
    pickle.LONG1: _long1,
    pickle.LONG4: _long4,
    pickle.INT: _int,
    pickle.LONG: _long,
    pickle.FLOAT: _float,
    pickle.BINUNICODE8: _binunicode8,
    pickle.UNICODE: _unicode,
    pickle.BINBYTES: _binbytes,
    pickle.SHORT_BINBYTES: _short_binbytes,
    pickle.BINBYTES8: _binbytes8,
    pickle.BYTEARRAY8: _bytearray8,
    pickle.BINSTRING: _binstring,
    pickle.SHORT_BINSTRING: _short_binstring,
    pickle.STRING: _string,
    pickle.EMPTY_SET: _empty_set,
    pickle.LIST: _list,
    pickle.DICT: _dict,
    pickle.FROZENSET: _frozenset,
    pickle.APPENDS: _appends,
    pickle.ADDITEMS: _additems,
    pickle.PUT: _put,
    pickle.GET: _get,
    pickle.GLOBAL: _global,
    pickle.STACK_GLOBAL: _stack_global,
    pickle.NEWOBJ_EX: _newobj_ex,
    pickle.INST: _inst,
    pickle.OBJ: _obj,
    pickle.BINPERSID: _binpersid,
    pickle.PERSID: _persid,
    pickle.EXT1: _ext,
    pickle.EXT2: _ext,
    pickle.EXT4: _ext,
    pickle.NEXT_BUFFER: _buffer,
    pickle.READONLY_BUFFER: _buffer,
}
#: Opcode byte -> handler, for every byte (unknown opcodes fail). The loop runs the opcodes
#: missing here inline (``vmloop.INLINE``); a test checks that each opcode the :mod:`pickle`
#: module defines is in exactly one of the two.
#: The opcode bytes with a handler here.
HANDLED: Final = frozenset(op[0] for op in _BY_NAME)
TABLE: Final[tuple[Handler, ...]] = tuple(
    _BY_NAME.get(bytes([code]), _unknown) for code in range(256)
)
