"""Every allocation or copy the pickle VM makes beyond the bytes it consumes is charged to its budget,
and error messages about hostile values stay small whatever those values hold."""

from __future__ import annotations

import pickle
import struct
import time

import pytest

from mettaformat.errors import LegacyFormatError, LegacyUnsupportedError, MettaFormatError
from mettaformat.legacy import LegacyLimitError, LegacyLimits, import_legacy_bytes
from mettaformat.legacy.opcodes import HANDLED
from mettaformat.legacy.unpickler import unpickle
from mettaformat.legacy.vmloop import INLINE
from tests.legacy_helpers import craft as C

_SMALL = LegacyLimits(max_work=100_000)


def _memo_then_repeat(value: bytes, use: bytes, times: int) -> bytes:
    """``value`` stored in memo slot 0, then ``use`` (which reads slot 0) ``times`` times into a list."""
    return C.PROTO2 + C.EMPTY_LIST + value + b"q\x00" + b"0" + C.MARK + use * times + b"e" + C.STOP


def test_every_pickle_opcode_is_run_by_exactly_one_place() -> None:
    import pickletools

    codes = {op.code.encode("latin-1")[0] for op in pickletools.opcodes}
    assert INLINE.isdisjoint(HANDLED)
    assert codes == INLINE | HANDLED


def test_records_are_built_with_the_fields_in_order() -> None:
    import dataclasses

    from mettaformat.container.tree import LegacyObject
    from mettaformat.legacy.vmloop import RECORD_FIELDS

    assert tuple(f.name for f in dataclasses.fields(LegacyObject)) == RECORD_FIELDS


def test_budget_charges_bytearray_of_a_memoised_buffer() -> None:
    big = b"B" + struct.pack("<I", 50_000) + b"x" * 50_000
    pkl = _memo_then_repeat(big, C.call(C.glob("__builtin__", "bytearray"), b"h\x00"), 20)
    with pytest.raises(LegacyLimitError, match="work"):
        unpickle(pkl, limits=_SMALL)


def test_budget_charges_codecs_encode_repeats() -> None:
    text = C.uni("y" * 50_000)
    pkl = _memo_then_repeat(text, C.call(C.glob("_codecs", "encode"), b"h\x00", C.uni("latin1")), 20)
    with pytest.raises(LegacyLimitError, match="work"):
        unpickle(pkl, limits=_SMALL)


def test_budget_charges_copyreg_reconstructors() -> None:
    big_list = C.EMPTY_LIST + C.MARK + C.NONE * 50_000 + b"e"
    use = C.call(C.glob("copy_reg", "_reconstructor"), C.glob("m", "Cls"), C.glob("__builtin__", "list"), b"h\x00")
    with pytest.raises(LegacyLimitError, match="work"):
        unpickle(_memo_then_repeat(big_list, use, 20), limits=_SMALL)


def test_budget_charges_hashing_repeated_tuple_keys() -> None:
    # A tuple of tuples doubles its hash cost at each level; CPython never caches tuple hashes.
    pkl = C.PROTO2 + C.int_(1) + b"q\x00"
    for _ in range(60):
        pkl += b"h\x00h\x00\x86q\x00"  # slot 0 = (slot 0, slot 0)
    pkl += C.EMPTY_DICT + b"h\x00" + C.NONE + b"s" + C.STOP
    start = time.monotonic()
    with pytest.raises(LegacyLimitError, match="work"):
        unpickle(pkl)
    assert time.monotonic() - start < 5


def test_repr_of_repeated_references_is_bounded() -> None:
    # A storage "class" that is a tuple of 2**60 leaves by sharing: the message must not repr it.
    nested = C.int_(1) + b"q\x00" + b"h\x00h\x00\x86q\x00" * 60
    pid = C.tup(C.uni("storage"), nested + b"0" + b"h\x00", C.uni("0"), C.uni("cpu"), C.int_(4)) + C.BINPERSID
    pkl = C.PROTO2 + C.tensor(pid) + C.STOP
    start = time.monotonic()
    with pytest.raises(MettaFormatError) as info:
        import_legacy_bytes(C.torch_zip(pkl, {"0": bytes(16)}))
    assert time.monotonic() - start < 5 and len(str(info.value)) < 1000


def test_empty_tensor_with_overflowing_dims() -> None:
    pid = C.storage_pid(numel=0)
    pkl = C.state_dict_pickle(w=C.tensor(pid, size=(0, 1 << 61, 1 << 61), stride=(1, 1, 1)))
    with pytest.raises(LegacyFormatError, match="too large"):
        import_legacy_bytes(C.torch_zip(pkl, {"0": b""}))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_pickles_agree_with_cpython_at_every_protocol(protocol: int) -> None:
    values = [
        {"a": [1, 2.5, "x", b"y", None, True, False], "t": (1, (2, 3)), 3: {4, 5}, "f": frozenset({"z"})},
        [list(range(300)), "é" * 300, b"\x00" * 70_000, -(1 << 70), 1 << 31, -1, 65535, 1e300],
        {"big": ["s" * 100] * 2000, "bytes": bytearray(b"ab")},  # several FRAMEs at protocol 4+
    ]
    for value in values:
        data = pickle.dumps(value, protocol=protocol)
        assert unpickle(data)[0] == pickle.loads(data)


def test_unknown_storage_class_message_names_it_briefly() -> None:
    pkl = C.PROTO2 + C.tensor(C.storage_pid(cls="Nope" * 500)) + C.STOP
    with pytest.raises(LegacyUnsupportedError) as info:
        import_legacy_bytes(C.torch_zip(pkl, {"0": bytes(16)}))
    assert len(str(info.value)) < 400
