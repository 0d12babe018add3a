"""v2 dicts, raw state dicts and safetensors: exact round trips and reports of what is not carried."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

from mettaformat import load_any
from mettaformat.checkpoint import Checkpoint
from mettaformat.container.tree import LegacyObject
from mettaformat.convert import convert
from mettaformat.errors import WriteError
from mettaformat.legacy import import_legacy
from mettaformat.legacy.allowlist import RecordedDefaultDict
from mettaformat.legacy.export import export_safetensors, export_state_dict, export_v2, export_v2_full
from mettaformat.legacy.graph import graph_equal, storable_checkpoint, to_storable
from tests.conftest import FIXTURES


def _state() -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        [
            ("components.fc1._net.0.weight", torch.randn(4, 6, generator=g)),
            ("components.fc1._net.0.bias", torch.randn(4, generator=g)),
            ("components._action_embeds_.active_indices", torch.arange(5)),
        ]
    )


def _v2_standard(**extra: Any) -> dict[str, Any]:
    # MettaAgent.save(full_model=False) at 88c490efd6 (docs/legacy-formats.md 2.1).
    return {
        "model_state_dict": _state(),
        "model_type": "brain",
        "name": "model_0002.pt",
        "uri": "file://ckpt/model_0002.pt",
        "metadata": {"agent_step": 128, "epoch": 2, "generation": 1, "train_time": 1.5, "action_names": ["move"]},
        "checkpoint_format_version": 2,
        "agent_attributes": {"obs_width": 11, "obs_shape": (200, 3), "feature_normalizations": {0: 1.0}},
        **extra,
    }


def _assert_dicts_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert list(a) == list(b)
    for k in a:
        if isinstance(a[k], dict) and a[k] and all(isinstance(v, torch.Tensor) for v in a[k].values()):
            assert list(a[k]) == list(b[k]) and all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
        else:
            assert a[k] == b[k], k


def test_v2_mfmt_v2_is_equal_key_by_key(tmp_path: Path) -> None:
    original = _v2_standard()
    torch.save(original, tmp_path / "v2.pt")
    convert(tmp_path / "v2.pt", tmp_path / "v2.mfmt")
    report = convert(tmp_path / "v2.mfmt", tmp_path / "back.pt", to="v2")
    assert report.not_carried == []
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    _assert_dicts_equal(original, back)
    assert type(back["model_state_dict"]) is OrderedDict


def test_v2_ad2eb4277e_layout_drops_only_the_always_none_version_keys(tmp_path: Path) -> None:
    original = _v2_standard(observation_space_version=None, action_space_version=None, layer_version=None)
    torch.save(original, tmp_path / "v2.pt")
    convert(tmp_path / "v2.pt", tmp_path / "back.pt", to="v2")
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    expected = {k: v for k, v in original.items() if not k.endswith("_version") or k.startswith("checkpoint")}
    _assert_dicts_equal(expected, {k: back[k] for k in expected})
    assert set(back) == set(expected)


def test_v2_reports_objects_a_weights_only_file_cannot_hold(tmp_path: Path) -> None:
    space = LegacyObject("gymnasium.spaces.multi_discrete", "MultiDiscrete", state={"nvec": [9, 10]})
    factory = RecordedDefaultDict()
    factory["a"] = 1
    ckpt = Checkpoint(
        tensors=_state(),
        model_type="brain",
        name="m.pt",
        uri="file://m.pt",
        metadata={"epoch": 1, "observation_space": space, "counts": factory},
        agent_attributes={"action_space": space, "obs_width": 11},
        training=None,
    )
    report = export_v2(ckpt, tmp_path / "a.pt")
    assert any("metadata.observation_space" in x and "MultiDiscrete" in x for x in report.not_carried)
    assert any("agent_attributes.action_space" in x for x in report.not_carried)
    assert any("defaultdict" in n for n in report.notes)
    back = torch.load(tmp_path / "a.pt", weights_only=True)
    assert back["metadata"] == {"epoch": 1, "counts": {"a": 1}}
    assert back["agent_attributes"] == {"obs_width": 11}
    with pytest.raises(WriteError, match="strict"):
        export_v2(ckpt, tmp_path / "b.pt", strict=True)
    assert not (tmp_path / "b.pt").exists()
    report = export_v2(ckpt, tmp_path / "c.pt", allow_objects=True)
    assert report.not_carried == [] and any("weights_only=False" in n for n in report.notes)
    with pytest.raises(Exception, match=r"MultiDiscrete|gymnasium"):
        torch.load(tmp_path / "c.pt", weights_only=True)
    assert import_legacy(tmp_path / "c.pt").metadata["observation_space"].class_path.endswith("MultiDiscrete")


def test_v2_full_from_a_module_graph_and_from_a_live_model(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    torch.save(model, tmp_path / "bare.pt")
    ckpt = import_legacy(tmp_path / "bare.pt")
    export_v2_full(ckpt, tmp_path / "full.pt")
    back = import_legacy(tmp_path / "full.pt")
    assert back.provenance["shape"] == "v2-full-model"
    assert all(torch.equal(back.tensors[k], t) for k, t in model.state_dict().items())
    d = torch.load(tmp_path / "full.pt", weights_only=False)
    assert list(d) == ["model", "model_type", "name", "uri", "metadata", "checkpoint_format_version"]
    assert isinstance(d["model"], torch.nn.Sequential)
    assert all(isinstance(p, torch.nn.Parameter) for p in d["model"].parameters())
    native = Checkpoint(tensors=dict(model.state_dict()), model_type="pytorch")
    with pytest.raises(WriteError, match="model="):
        export_v2_full(native, tmp_path / "x.pt")
    export_v2_full(native, tmp_path / "x.pt", model=model)
    assert torch.load(tmp_path / "x.pt", weights_only=False)["model_type"] == "pytorch"


def test_state_dict_pt_keeps_ties_and_reports_the_rest(tmp_path: Path, shared_tensor_state_dict: Any) -> None:
    ckpt = Checkpoint(tensors=shared_tensor_state_dict, metadata={"epoch": 3}, name="n")
    report = export_state_dict(ckpt, tmp_path / "sd.pt")
    assert report.not_carried == ["metadata (1 keys: epoch)", "name ('n')"]
    back = torch.load(tmp_path / "sd.pt", weights_only=True)
    assert type(back) is OrderedDict and list(back) == list(shared_tensor_state_dict)
    assert back["embed.weight"].data_ptr() == back["head.weight"].data_ptr()
    with pytest.raises(WriteError):
        export_state_dict(ckpt, tmp_path / "strict.pt", strict=True)


def test_mfmt_safetensors_mfmt_tensors_equal(tmp_path: Path, shared_tensor_state_dict: Any) -> None:
    t = dict(shared_tensor_state_dict)
    base = torch.arange(12, dtype=torch.float32)
    t["half_a"], t["half_b"] = base[:6], base[6:]  # overlapping one storage: written as copies
    ckpt = Checkpoint(tensors=t, metadata={"epoch": 3, "run": "r", "table": {0: 1.0}, "obj": LegacyObject("m", "C")})
    from mettaformat.checkpoint_io import write_checkpoint

    direct = export_safetensors(ckpt, tmp_path / "direct.safetensors")
    assert "storage sharing of 'half_b' with 'half_a' (written as a copy)" in direct.not_carried
    write_checkpoint(storable_checkpoint(ckpt), tmp_path / "a.mfmt")
    report = convert(tmp_path / "a.mfmt", tmp_path / "a.safetensors")
    assert any("metadata['table']" in x for x in report.not_carried)
    assert any("metadata['obj']" in x for x in report.not_carried)
    assert any("JSON-encoded" in n for n in report.notes) and any("aliases" in n for n in report.notes)
    raw = safetensors.torch.load_file(tmp_path / "a.safetensors")
    assert "head.weight" not in raw  # stored once, under the first name
    convert(tmp_path / "a.safetensors", tmp_path / "b.mfmt")
    assert any("sorted by name" in n for n in report.notes)
    back = load_any(tmp_path / "b.mfmt")
    assert sorted(back.tensors) == sorted(t)
    assert all(torch.equal(back.tensors[k], v) for k, v in t.items())
    assert back.tensors["embed.weight"].data_ptr() == back.tensors["head.weight"].data_ptr()
    assert back.metadata["run"] == "r" and back.metadata["epoch"] == "3"


def test_storable_conversion_of_importer_stand_ins() -> None:
    from mettaformat.legacy.allowlist import Builtin
    from mettaformat.legacy.tensors import StorageRef

    dd = RecordedDefaultDict()
    dd.default_factory = Builtin("__builtin__", "dict", lambda vm, a: {}, True)
    dd["k"] = 1
    storage = StorageRef("0", torch.float32, torch.ones(3))
    graph = {"dd": dd, "s": storage, "c": 1 + 2j}
    out = to_storable(graph)
    assert out["dd"].class_path == "collections.defaultdict" and out["dd"].items == [("k", 1)]
    assert out["dd"].args[0].class_path == "__builtin__.dict" and out["dd"].args[0].kind == "global"
    assert out["s"].class_path == "torch.FloatStorage" and torch.equal(out["s"].args[0], torch.ones(3))
    assert out["c"].args == (1.0, 2.0)
    assert graph_equal(graph, out) and not graph_equal(graph, {**graph, "c": 1 + 3j})
    assert storable_checkpoint(Checkpoint(metadata={"d": dd})).metadata["d"].class_path == "collections.defaultdict"


def test_real_fixture_to_every_target(tmp_path: Path) -> None:
    src = FIXTURES / "v1_era_d_model_0050.pt"
    if not src.exists():
        pytest.skip(f"Metta fixture {src} not found (fixtures live in ../shared beside the repo)")
    original = import_legacy(src)
    for to, name in (("v2", "v2.pt"), ("v2-full", "full.pt"), ("pt", "sd.pt"), ("safetensors", "m.safetensors")):
        report = convert(src, tmp_path / name, to=to)  # type: ignore[arg-type]
        back = load_any(tmp_path / name, migrate=False)
        assert all(torch.equal(back.tensors[k], v) for k, v in original.tensors.items()), to
        if to == "v2":
            assert report.not_carried == [
                "agent_attributes.action_space: a gymnasium.spaces.multi_discrete.MultiDiscrete object "
                "(weights_only files hold plain data only)",
                "legacy object graph (class paths, attributes and 9 graph-only tensors)",
            ]
            torch.load(tmp_path / name, weights_only=True)
        if to == "v2-full":
            assert report.not_carried == [] and back.metadata == original.metadata
