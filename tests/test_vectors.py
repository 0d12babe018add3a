"""Conformance vectors (spec/vectors/): every committed file reads exactly as its expected.json says.

The vectors are never regenerated (``spec/vectors/make_vectors.py`` only writes missing ones), so
a reader or writer change that alters how one of them reads fails here.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import safetensors.torch
import torch

import mettaformat

VECTORS = Path(__file__).resolve().parents[1] / "spec" / "vectors"
FILES = sorted(VECTORS.glob("*.mfmt"))
MAX_VECTOR_SIZE = 64 << 10


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load_generator()


def expected_for(path: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(path.with_suffix(".expected.json").read_text(encoding="utf-8"))
    return result


def test_vector_set_is_complete() -> None:
    names = {p.stem for p in FILES}
    assert names >= set(GEN.VALID) | set(GEN.INVALID), "run spec/vectors/make_vectors.py"
    errors = {expected_for(p)["error"] for p in FILES if not expected_for(p)["valid"]}
    assert errors >= {"BadMagicError", "UnsupportedVersionError", "HeaderError", "LayoutError", "LimitExceededError",
                      "UnknownCodecError", "CodecError", "IntegrityError"}
    for p in FILES:
        assert p.with_suffix(".expected.json").is_file(), p.name
        assert p.stat().st_size < MAX_VECTOR_SIZE, p.name


def test_generator_writes_nothing_when_vectors_exist() -> None:
    assert GEN.main(VECTORS) == []


def _check_tensor(t: torch.Tensor, want: dict[str, Any], name: str) -> None:
    assert GEN.tensor_description(t) == want, name


@pytest.mark.parametrize("path", [p for p in FILES if expected_for(p)["valid"]], ids=lambda p: p.stem)
def test_valid_vector(path: Path) -> None:
    want = expected_for(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mettaformat.open(path) as ckpt:
            assert ckpt.keys() == want["keys"]
            assert GEN.canonical(ckpt.metadata) == want["metadata"]
            assert sorted(ckpt.tree_names) == sorted(want.get("trees", {}))
            for name, tree in want.get("trees", {}).items():
                assert GEN.canonical(ckpt.tree(name)) == tree, name
            assert sorted(s for s in ckpt.sections if s != "model") == sorted(want.get("sections", {}))
            for section, tensors in want.get("sections", {}).items():
                loaded = ckpt.load_section(section)
                assert sorted(loaded) == sorted(tensors)
                for name, t in loaded.items():
                    _check_tensor(t, tensors[name], f"{section}/{name}")
            lazy = {name: ckpt.get_tensor(name) for name in ckpt.keys()}
        model = mettaformat.load_file(path)
    newer = [w for w in caught if "newer than this reader" in str(w.message)]
    # "warning" says the file's minor is newer than the reader's that wrote the vector; a reader
    # that has since reached that minor reads it silently.
    minor = struct.unpack_from("<H", path.read_bytes(), 10)[0]
    assert bool(newer) == (want.get("warning", False) and minor > mettaformat.MFMT_VERSION_MINOR)

    assert list(model) == want["keys"]
    aliases: dict[str, str] = want["aliases"]
    assert set(model) == set(want["tensors"]) | set(aliases)
    for name, desc in want["tensors"].items():
        _check_tensor(model[name], desc, name)
        _check_tensor(lazy[name], desc, name)
    for alias, target in aliases.items():
        assert model[alias] is model[target] or model[alias].data_ptr() == model[target].data_ptr(), alias
        _check_tensor(model[alias], want["tensors"][target], alias)


@pytest.mark.parametrize("path", [p for p in FILES if not expected_for(p)["valid"]], ids=lambda p: p.stem)
def test_invalid_vector(path: Path) -> None:
    want = expected_for(path)
    # The same full read the generator used to confirm the vector's error.
    assert GEN.reader_error(path) == (want["error"], want["region"])


@pytest.mark.parametrize("path", [p for p in FILES if expected_for(p)["valid"]], ids=lambda p: p.stem)
def test_raw_model_section_is_a_safetensors_file(path: Path) -> None:
    """spec: a raw section's bytes are a safetensors file, with every stored tensor and ties in metadata."""
    data = path.read_bytes()
    header, _, sections = GEN.split(data)
    entry = next(s for s in header["sections"] if s["name"] == "model")
    if entry["codec"]["name"] != "raw":
        pytest.skip("zstd section")
    stream = sections["model"]
    (n,) = struct.unpack_from("<Q", stream)
    assert (8 + n) % 64 == 0 and stream[8 + n - 1:8 + n] in (b" ", b"}")
    loaded = safetensors.torch.load(stream)
    want = expected_for(path)
    assert sorted(loaded) == sorted(want["tensors"])
    for name, t in loaded.items():
        _check_tensor(t, want["tensors"][name], name)
    meta = json.loads(stream[8:8 + n])["__metadata__"]
    assert meta["format"] == "pt"
    if want["aliases"]:
        assert json.loads(meta["mettaformat.aliases"]) == want["aliases"]
    else:
        assert "mettaformat.aliases" not in meta
