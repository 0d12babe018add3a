"""threat model PK1-PK20: hostile pickle streams. One test per row, named by its id.

Every test that carries a payload runs inside :func:`canary`, which asserts afterwards that no
marker file was written and that no module was imported.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from mettaformat.container.tree import LegacyObject
from mettaformat.errors import LegacyImportError, MettaFormatError, UnsafeContentError
from mettaformat.legacy import LegacyFormatError, LegacyLimitError, LegacyLimits, import_legacy_bytes
from mettaformat.legacy.unpickler import unpickle
from tests.legacy_helpers import craft as C
from tests.legacy_helpers.canary import CANARY_MODULE, canary


def _load(pkl: bytes, **kw: Any) -> Any:
    return unpickle(pkl, **kw)[0]


def _import_zip(pkl: bytes, records: dict[str, bytes] | None = None) -> Any:
    return import_legacy_bytes(C.torch_zip(pkl, records))


def _payload(module: str, name: str, arg: str) -> bytes:
    return C.PROTO2 + C.call(C.glob(module, name), C.uni(arg)) + C.STOP


@pytest.mark.parametrize(
    ("module", "name"), [("os", "system"), ("posix", "system"), ("nt", "system"), (CANARY_MODULE, "boom")]
)
def test_PK1_os_system_not_called(tmp_path: Path, module: str, name: str) -> None:
    with canary(tmp_path) as c:
        obj = _load(_payload(module, name, c.shell))
        assert isinstance(obj, LegacyObject) and obj.kind == "reduce"
        assert (obj.module, obj.name, obj.args) == (module, name, (c.shell,))
        with pytest.raises(LegacyImportError):  # inert, and not a checkpoint shape either
            _import_zip(_payload(module, name, c.shell))


@pytest.mark.parametrize("module", ["builtins", "__builtin__"])
@pytest.mark.parametrize("name", ["eval", "exec", "getattr", "__import__", "apply", "open", "breakpoint", "compile"])
def test_PK2_builtins_eval_exec_not_called(tmp_path: Path, module: str, name: str) -> None:
    with canary(tmp_path) as c:
        obj = _load(_payload(module, name, c.python))
        assert isinstance(obj, LegacyObject) and obj.class_path == f"{module}.{name}" and obj.kind == "reduce"


def test_PK3_stack_global_names_from_memo(tmp_path: Path) -> None:
    with canary(tmp_path) as c:
        pkl = (
            b"\x80\x04"
            + C.uni(CANARY_MODULE)
            + b"\x940"
            + C.uni("boom")
            + b"\x940"
            + b"h\x00h\x01\x93"
            + C.uni(c.shell)
            + b"\x85R."
        )
        obj = _load(pkl)
        assert (obj.module, obj.name, obj.kind) == (CANARY_MODULE, "boom", "reduce")


def test_PK4_dotted_name_is_opaque(tmp_path: Path) -> None:
    with canary(tmp_path):
        obj = _load(b"\x80\x04" + C.uni("pathlib") + C.uni("os.system") + b"\x93" + C.uni("id") + b"\x85R.")
        assert (obj.module, obj.name) == ("pathlib", "os.system")


def test_PK5_inst_obj_newobj_ex_are_stubs(tmp_path: Path) -> None:
    with canary(tmp_path) as c:
        inst = b"(" + C.uni(c.shell) + b"i" + CANARY_MODULE.encode() + b"\nboom\n."
        obj = _load(inst)
        assert obj.class_path == f"{CANARY_MODULE}.boom" and obj.args == (c.shell,)
        # OBJ whose result is discarded by POP: still never instantiated.
        obj_pop = b"\x80\x02(" + C.glob(CANARY_MODULE, "Evil") + C.uni(c.shell) + b"o0N."
        assert _load(obj_pop) is None
        newobj_ex = b"\x80\x04" + C.glob(CANARY_MODULE, "Evil") + b"\x8c\x01x\x85}\x92."
        assert _load(newobj_ex).kind == "newobj"
        with pytest.raises(MettaFormatError):  # keyword arguments: refused
            _load(b"\x80\x04" + C.glob(CANARY_MODULE, "Evil") + b")}" + C.uni("k") + C.uni("v") + b"s\x92.")


def test_PK6_build_state_is_data(tmp_path: Path) -> None:
    with canary(tmp_path) as c:
        pkl = b"\x80\x02" + C.glob(CANARY_MODULE, "Evil") + b")\x81}" + C.uni("cmd") + C.uni(c.shell) + b"sb."
        obj = _load(pkl)
        assert obj.state == {"cmd": c.shell} and obj.kind == "newobj"


@pytest.mark.parametrize(
    "args",
    [
        C.tup(C.storage_pid(), C.uni("0"), C.tup(C.int_(4)), C.tup(C.int_(1)), C.FALSE, C.ordered_dict()),  # str offset
        C.tup(C.storage_pid(), C.int_(0), C.tup(C.uni("4")), C.tup(C.int_(1)), C.FALSE, C.ordered_dict()),  # str size
        C.tup(
            C.storage_pid(),
            C.int_(0),
            C.tup(b"G" + struct.pack(">d", 4.0)),
            C.tup(C.int_(1)),
            C.FALSE,
            C.ordered_dict(),
        ),
        C.tup(C.storage_pid(), C.int_(0), C.tup(C.int_(4)), C.tup(C.int_(1))),  # arity 4
        C.tup(C.storage_pid(), C.int_(0), C.tup(C.int_(4)), C.tup(C.int_(1)), C.uni("no"), C.ordered_dict()),
        C.tup(C.uni("not a storage"), C.int_(0), C.tup(C.int_(4)), C.tup(C.int_(1)), C.FALSE, C.ordered_dict()),
        C.tup(C.storage_pid(), C.int_(0), C.tup(C.TRUE), C.tup(C.int_(1)), C.FALSE, C.ordered_dict()),  # bool size
    ],
)
def test_PK7_rebuild_wrong_arity_or_types(args: bytes) -> None:
    pkl = C.state_dict_pickle(w=C.glob("torch._utils", "_rebuild_tensor_v2") + args + C.REDUCE)
    with pytest.raises(LegacyFormatError):
        _import_zip(pkl, {"0": bytes(16)})


@pytest.mark.parametrize("ext", [b"\x82\x01", b"\x83\x01\x00", b"\x84\x01\x00\x00\x00"])
def test_PK8_ext_opcodes_rejected(ext: bytes) -> None:
    with pytest.raises(UnsafeContentError):
        _load(b"\x80\x02" + ext + b")R.")


@pytest.mark.parametrize(
    "pid",
    [
        C.tup(C.uni("module"), C.glob("torch", "FloatStorage"), C.uni("0"), C.uni("cpu"), C.int_(4)),
        C.tup(C.uni("storage"), C.glob("torch", "FloatStorage"), C.uni("0"), C.uni("cpu")),
        C.tup(C.uni("storage"), C.glob("torch", "FloatStorage"), C.int_(0), C.uni("cpu"), C.int_(4)),
        C.tup(C.uni("storage"), C.glob("torch", "FloatStorage"), C.uni("../0"), C.uni("cpu"), C.int_(4)),
        C.tup(C.uni("storage"), C.glob("torch", "FloatStorage"), C.uni("0x1"), C.uni("cpu"), C.int_(4)),
        C.uni("storage"),
    ],
)
def test_PK9_bad_persistent_ids(pid: bytes) -> None:
    with pytest.raises(LegacyFormatError):
        _import_zip(C.state_dict_pickle(w=C.tensor(pid + C.BINPERSID)), {"0": bytes(16)})


def test_PK9_text_persid_rejected() -> None:
    with pytest.raises(UnsafeContentError):
        _import_zip(b"\x80\x02P0\n.")


def test_PK10_sparse_memo_and_memo_cap() -> None:
    tracemalloc.start()
    assert _load(b"\x80\x02]r\xff\xff\xff\xff.") == []  # index 2**32-1 in a dict, no array growth
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20
    many = b"\x80\x02" + b"".join(b"N" + b"r" + struct.pack("<I", i) + b"0" for i in range(50)) + b"N."
    with pytest.raises(LegacyLimitError):
        _load(many, limits=LegacyLimits(max_memo=10))


def test_PK11_memo_fanout_keeps_references() -> None:
    # Each level is a list of 64 references to the previous level: 64**30 leaves if copied.
    pkl = b"\x80\x02]q\x00" + b"".join(b"0(" + b"h\x00" * 64 + b"lq\x00" for _ in range(30)) + b"."
    tracemalloc.start()
    t0 = time.perf_counter()
    top = _load(pkl)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert top[0] is top[1] and elapsed < 1.0 and peak < 1 << 20
    with pytest.raises(LegacyLimitError):
        _load(b"\x80\x02" + b"]0" * 100 + b"N.", limits=LegacyLimits(max_objects=50))
    with pytest.raises(LegacyLimitError):  # quadratic copying through set(<memoised list>)
        big = (
            b"\x80\x02]("
            + b"K\x01" * 1000
            + b"eq\x00"
            + b"".join(b"c__builtin__\nset\nh\x00\x85R0" for _ in range(200))
            + b"N."
        )
        _load(big, limits=LegacyLimits(max_work=10_000))


def test_PK12_cycles() -> None:
    lst = _load(b"\x80\x02]q\x00h\x00a.")
    assert lst[0] is lst
    d = _load(b"\x80\x02}q\x00X\x01\x00\x00\x00sh\x00s.")
    assert d["s"] is d
    deep = b"\x80\x02" + b"(" * 5000 + b")" + b"\x85" * 0 + b"t" * 5000 + b"."
    with pytest.raises(LegacyLimitError):  # CPython would hash such a tuple recursively in C
        _load(deep)


@pytest.mark.parametrize(
    "pkl", [b"\x80\x020.", b"\x80\x02t.", b"\x80\x02N1.", b"\x80\x02.", b"\x80\x02NN.", b"\x80\x02(N.", b"\x80\x02(0N."]
)
def test_PK13_stack_errors_are_format_errors(pkl: bytes) -> None:
    with pytest.raises(LegacyFormatError):
        _load(pkl)


@pytest.mark.parametrize("pkl", [b"\x80\x02\xff.", b"\x80\x06N.", b"\x80\x02\x97N."])
def test_PK14_unknown_opcode_or_protocol(pkl: bytes) -> None:
    with pytest.raises(MettaFormatError):
        _load(pkl)


@pytest.mark.parametrize(
    "pkl",
    [
        b"\x80\x04\x95\xff\x00\x00\x00\x00\x00\x00\x00N.",  # frame longer than the data
        b"\x80\x04\x95\x01\x00\x00\x00\x00\x00\x00\x00K\x01.",  # BININT1's argument crosses the frame end
        b"\x80\x04\x95\x03\x00\x00\x00\x00\x00\x00\x00N.N",  # STOP before the frame end
    ],
)
def test_PK15_frame_inconsistencies(pkl: bytes) -> None:
    with pytest.raises(LegacyFormatError):
        _load(pkl)


@pytest.mark.parametrize(
    "pkl",
    [
        b"\x80\x02X\xff\xff\xff\x3f",  # BINUNICODE 1 GiB
        b"\x80\x04\x8e\x00\x00\x00\x40\x00\x00\x00\x00",  # BINBYTES8 1 GiB
        b"\x80\x02\x8b\xff\xff\xff\x3f",  # LONG4
        b"\x80\x04\x8d\x00\x00\x00\x00\x01\x00\x00\x00",  # BINUNICODE8 4 GiB
        b"\x80\x05\x96\x00\x00\x00\x40\x00\x00\x00\x00",  # BYTEARRAY8
    ],
)
def test_PK16_huge_lengths_rejected_without_allocating(pkl: bytes) -> None:
    with pytest.raises(LegacyFormatError):  # warm-up: first-use allocations are not the input's
        _load(pkl)
    tracemalloc.start()
    with pytest.raises(LegacyFormatError):
        _load(pkl)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize("op", [b"I", b"L"])
def test_PK17_long_decimal_integers(op: bytes) -> None:
    with pytest.raises(LegacyFormatError):
        _load(op + b"9" * 4301 + b"\n.")
    assert _load(op + b"9" * 50 + b"\n.") == int("9" * 50)


def test_PK18_data_after_stop() -> None:
    good = C.state_dict_pickle(w=C.tensor(C.storage_pid()))
    assert "w" in _import_zip(good, {"0": bytes(16)}).tensors
    for tail in (b"N", good):
        with pytest.raises(LegacyFormatError):
            _import_zip(good + tail, {"0": bytes(16)})


def test_PK19_malicious_prefix_then_broken_stream(tmp_path: Path) -> None:
    with canary(tmp_path) as c:
        broken = (
            b"\x80\x02}(" + C.uni("x") + C.call(C.glob("os", "system"), C.uni(c.shell)) + C.uni("y") + b"X\x10\x00\x00"
        )
        with pytest.raises(LegacyFormatError):
            _import_zip(broken)


def test_PK20_nested_pickles_not_interpreted(tmp_path: Path) -> None:
    with canary(tmp_path) as c:
        inner = _payload(CANARY_MODULE, "boom", c.shell)
        pkl = (
            b"\x80\x03" + C.call(C.glob("torch.storage", "_load_from_bytes"), b"C" + bytes([len(inner)]) + inner) + b"."
        )
        obj = _load(pkl)
        assert obj.class_path == "torch.storage._load_from_bytes" and obj.args == (inner,)
