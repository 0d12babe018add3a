"""Malformed but legal legacy object graphs end in a MettaFormatError subclass, never a bare TypeError,
AttributeError, RecursionError or IndexError: module dicts that are not dicts, tensor-valued version
fields, empty tensors with overflowing dims (see test_legacy_budget), and deep nesting."""

from __future__ import annotations

from pathlib import Path

import pytest

import mettaformat
from mettaformat.convert import CONVERT_TARGETS, write_target
from mettaformat.errors import LegacyFormatError, MettaFormatError
from mettaformat.legacy import import_legacy_bytes
from mettaformat.validate import validate
from tests.legacy_helpers import craft as C

_T = C.tensor(C.storage_pid())
_RECORDS = {"0": bytes(16)}


def _module(attrs: bytes, cls: str = "Mod") -> bytes:
    return C.glob("m", cls) + C.EMPTY_TUPLE + C.NEWOBJ + C.EMPTY_DICT + C.MARK + attrs + b"u" + C.BUILD


def _exercise(tmp_path: Path, data: bytes) -> None:
    """Import, validate, load_any and convert to every target: each may refuse, none may crash."""
    src = tmp_path / "src.pt"
    src.write_bytes(data)
    try:
        ckpt = import_legacy_bytes(data)
    except MettaFormatError:
        return
    assert validate(src).ok in (True, False)
    try:
        mettaformat.load_any(src, migrate=False)
    except MettaFormatError:
        pass
    for target in CONVERT_TARGETS:
        try:
            write_target(ckpt, tmp_path / f"out.{target}", target)
        except MettaFormatError:
            pass


_NOT_DICTS = [C.int_(3), C.uni("x"), C.EMPTY_LIST, C.NONE, C.tup(C.int_(1)), _T]


@pytest.mark.parametrize("key", ["_modules", "_parameters", "_buffers"])
@pytest.mark.parametrize("bad", _NOT_DICTS, ids=["int", "str", "list", "none", "tuple", "tensor"])
def test_module_dicts_that_are_not_dicts(tmp_path: Path, key: str, bad: bytes) -> None:
    others = b"".join(C.uni(k) + C.EMPTY_DICT for k in ("_modules", "_parameters", "_buffers") if k != key)
    child = _module(C.uni(key) + bad + others, "Child")
    for top in (_module(C.uni("_modules") + C.EMPTY_DICT + C.MARK + C.uni("policy") + child + b"u" + others),
                _module(C.uni(key) + bad + others, "MettaAgent")):
        data = C.torch_zip(C.PROTO2 + top + C.STOP, _RECORDS)
        _exercise(tmp_path, data)
        record = _module(C.uni("run_name") + C.uni("r") + C.uni("_cached_policy") + top, "PolicyRecord")
        _exercise(tmp_path, C.torch_zip(C.PROTO2 + record + C.STOP, _RECORDS))


@pytest.mark.parametrize("key", ["checkpoint_format_version", "observation_space_version", "layer_version"])
def test_tensor_valued_version_fields(tmp_path: Path, key: str) -> None:
    fields = {"checkpoint_format_version": C.int_(2), key: _T}
    body = b"".join(C.uni(k) + v for k, v in fields.items()) + C.uni("model_state_dict") + C.EMPTY_DICT
    data = C.torch_zip(C.PROTO2 + C.EMPTY_DICT + C.MARK + body + b"u" + C.STOP, _RECORDS)
    with pytest.raises(LegacyFormatError, match=key):
        import_legacy_bytes(data)
    _exercise(tmp_path, data)


@pytest.mark.parametrize("depth", [2_000, 100_000])
def test_deep_nesting_in_a_legal_pickle(tmp_path: Path, depth: int) -> None:
    nested = C.EMPTY_LIST * depth + b"a" * (depth - 1)
    body = (C.uni("checkpoint_format_version") + C.int_(2) + C.uni("model_state_dict") + C.EMPTY_DICT
            + C.uni("metadata") + C.EMPTY_DICT + C.MARK + C.uni("x") + nested + b"u")
    _exercise(tmp_path, C.torch_zip(C.PROTO2 + C.EMPTY_DICT + C.MARK + body + b"u" + C.STOP))
    module = _module(C.uni("_modules") + C.EMPTY_DICT + C.uni("_parameters") + C.EMPTY_DICT + C.uni("deep") + nested)
    _exercise(tmp_path, C.torch_zip(C.PROTO2 + module + C.STOP))
