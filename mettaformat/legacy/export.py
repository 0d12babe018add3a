"""Export a :class:`Checkpoint` to Metta's legacy files, a raw state dict, or safetensors.

Every exporter returns an :class:`ExportReport` naming what the target cannot carry; nothing
is dropped silently. With ``strict=True`` anything not carried raises :class:`WriteError`
before a byte is written. Files are written atomically (a temp file beside the target, then a
rename), so a crash leaves the previous file or the complete new one.

Targets (docs/legacy-formats.md sections 1 and 2):

* ``v1``: a pickled ``PolicyRecord``, rebuilt from the preserved object graph by
  :class:`~mettaformat.legacy.pickler.LegacyPickler` without importing any class it names;
* ``v2`` and ``v2-full``: PR #973's dicts at 88c490efd6 (the standard one loads with
  ``torch.load(weights_only=True)``);
* ``pt``: ``torch.save`` of the state dict; ``safetensors``.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import torch

from mettaformat._atomic import fsync_dir
from mettaformat.checkpoint import Checkpoint
from mettaformat.errors import WriteError
from mettaformat.legacy.export_plain import dropped_fields, safetensors_payload, weights_only_tree
from mettaformat.legacy.pickler import DEFAULT_PROTOCOL, PickleOptions, class_pairs, class_paths, pickle_module
from mettaformat.legacy.rebuild import (
    graph_policy,
    is_policy_record,
    module_hook_dicts,
    patch_record,
    substitute_tensors,
    synthesize_record,
)

__all__ = [
    "EXPORT_TARGETS",
    "ExportReport",
    "ExportTarget",
    "export_safetensors",
    "export_state_dict",
    "export_v1",
    "export_v2",
    "export_v2_full",
]

ExportTarget = Literal["v1", "v2", "v2-full", "pt", "safetensors"]
EXPORT_TARGETS: Final = ("v1", "v2", "v2-full", "pt", "safetensors")
#: Zip root folders torch may be asked to write (it derives the folder from the file name).
_ZIP_PREFIX: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,127}\Z")
#: Checkpoint fields a pickled PolicyRecord / v2 dict carries.
_OBJECT_FIELDS: Final = frozenset({"tensors", "name", "uri", "model_type", "metadata", "graph", "agent_attributes"})


@dataclass
class ExportReport:
    """What an export wrote and what it could not carry.

    Attributes:
        path: the file written (or that would have been written).
        target: the format (an ``ExportTarget``, or ``"mfmt"`` from ``convert``).
        not_carried: checkpoint content absent from the file, one line each.
        notes: how content was carried where that is not obvious (tied tensors as aliases,
            metadata JSON-encoded, classes the file needs to load...).
    """

    path: str
    target: str
    not_carried: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "target": self.target, "not_carried": self.not_carried, "notes": self.notes}

    def check(self, strict: bool) -> None:
        """Raise if ``strict`` and something is not carried.

        Raises:
            WriteError: listing what the target cannot carry.
        """
        if strict and self.not_carried:
            lines = "; ".join(self.not_carried[:10]) + (" ..." if len(self.not_carried) > 10 else "")
            raise WriteError(f"{self.target} cannot carry everything in this checkpoint (strict): {lines}")


def export_v1(
    ckpt: Checkpoint, path: str | os.PathLike[str], *, model: torch.nn.Module | None = None, strict: bool = False
) -> ExportReport:
    """Write a v1 ``PolicyRecord`` pickle (torch zip) that ``torch.load(weights_only=False)`` reads.

    A checkpoint imported from a v1 file is rebuilt from its preserved object graph, with the
    hub's state dict, name, uri and metadata written into it. Otherwise an era-D
    ``metta.agent.policy_record.PolicyRecord`` + ``PolicyMetadata`` is synthesised around the
    policy module: ``model`` if given, else the module graph of a v2 full-model or bare-module
    import.

    Args:
        ckpt: the checkpoint.
        path: the ``.pt`` file to write.
        model: a live module to pickle as the policy instead of the graph's. Its state dict
            must equal ``ckpt.tensors``.
        strict: raise instead of reporting content the file cannot carry.

    Returns:
        The report.

    Raises:
        WriteError: no policy module is available (a native checkpoint without ``model``),
            ``model`` disagrees with ``ckpt.tensors``, ``strict`` and something is not
            carried, the graph cannot be pickled, or an I/O error.
    """
    report = ExportReport(os.fspath(path), "v1")
    options = _options(ckpt)
    graph = ckpt.legacy_graph
    if model is not None:
        _check_model(model, ckpt)
    if is_policy_record(graph):
        policy = graph_policy(graph)
        if model is None and policy is not None:
            substitute_tensors(policy, ckpt.tensors, options, report.not_carried, report.notes)
        elif model is None and ckpt.tensors:
            report.not_carried.append(f"state dict ({len(ckpt.tensors)} tensors): the record holds no policy module")
        root: Any = patch_record(ckpt, graph, model=model, notes=report.notes)
        prefix = ckpt.provenance.get("zip_prefix")
    else:
        policy = model if model is not None else graph_policy(graph)
        if policy is None:
            raise WriteError(
                "a v1 file pickles the policy module, and this checkpoint has none "
                f"(source {ckpt.provenance.get('shape') or ckpt.provenance.get('source_format', 'unknown')}); "
                "pass model=<nn.Module> holding these weights (mettaformat never rebuilds modules)"
            )
        if model is None:
            substitute_tensors(policy, ckpt.tensors, options, report.not_carried, report.notes)
        name = ckpt.name or Path(path).name
        root = synthesize_record(ckpt, policy, name, ckpt.uri or f"file://{os.fspath(path)}")
        report.notes.append(f"synthesised an era-D metta.agent.policy_record.PolicyRecord named {name!r}")
        prefix = None
    _agent_attributes_note(ckpt, policy if model is None else None, model, report)
    report.not_carried += dropped_fields(ckpt, keep=_OBJECT_FIELDS)
    _classes_note(root, report)
    report.check(strict)
    _torch_save(root, path, prefix=prefix or Path(path).name, options=options)
    return report


def export_v2(
    ckpt: Checkpoint, path: str | os.PathLike[str], *, allow_objects: bool = False, strict: bool = False
) -> ExportReport:
    """Write a v2 standard dict (``MettaAgent.save(full_model=False)`` at 88c490efd6).

    Keys, in order: ``model_state_dict, model_type, name, uri, metadata,
    checkpoint_format_version`` (2), then ``agent_attributes`` (brain models) and
    ``component_config`` when present. The file loads with ``torch.load(weights_only=True)``:
    metadata and attribute values that are recorded objects (gym spaces, omegaconf nodes) are
    left out and reported, unless ``allow_objects`` pickles them (then loading needs
    ``weights_only=False`` and their classes).

    Args:
        ckpt: the checkpoint.
        path: the ``.pt`` file to write.
        allow_objects: keep recorded objects instead of leaving them out.
        strict: raise instead of reporting content the file cannot carry.

    Returns:
        The report.

    Raises:
        WriteError: ``strict`` and something is not carried, or an I/O error.
    """
    report = ExportReport(os.fspath(path), "v2")
    d: dict[str, Any] = {"model_state_dict": OrderedDict(ckpt.tensors)}
    d.update(_v2_header(ckpt, path, report))
    d["metadata"] = weights_only_tree(ckpt.metadata, "metadata", report.not_carried, report.notes, allow_objects)
    d["checkpoint_format_version"] = 2
    if ckpt.agent_attributes and d["model_type"] == "brain":
        d["agent_attributes"] = weights_only_tree(
            ckpt.agent_attributes, "agent_attributes", report.not_carried, report.notes, allow_objects
        )
    elif ckpt.agent_attributes:
        report.not_carried.append(f"agent_attributes: v2 writes them for 'brain' models only, not {d['model_type']!r}")
    if "component_config" in ckpt.provenance:
        d["component_config"] = weights_only_tree(
            ckpt.provenance["component_config"], "component_config", report.not_carried, report.notes, allow_objects
        )
    report.not_carried += dropped_fields(ckpt, keep=_OBJECT_FIELDS - {"graph"})
    objects = class_paths([d["metadata"], d.get("agent_attributes"), d.get("component_config")])
    if objects:
        report.notes.append(f"needs torch.load(weights_only=False) and these classes: {', '.join(objects)}")
    report.check(strict)
    _torch_save(d, path, prefix=Path(path).stem, options=_options(ckpt) if objects else None)
    return report


def export_v2_full(
    ckpt: Checkpoint, path: str | os.PathLike[str], *, model: torch.nn.Module | None = None, strict: bool = False
) -> ExportReport:
    """Write a v2 full-model dict (``MettaAgent.save(full_model=True)`` at 88c490efd6).

    Keys, in order: ``model, model_type, name, uri, metadata, checkpoint_format_version`` (2).
    ``model`` is the caller's live module, or else the policy module preserved in the legacy
    graph (re-pickled as recorded, with the hub's tensors in its slots).

    Args:
        ckpt: the checkpoint.
        path: the ``.pt`` file to write.
        model: the live module; its state dict must equal ``ckpt.tensors``.
        strict: raise instead of reporting content the file cannot carry.

    Returns:
        The report.

    Raises:
        WriteError: no module is available, ``model`` disagrees with ``ckpt.tensors``,
            ``strict`` and something is not carried, or an I/O error.
    """
    report = ExportReport(os.fspath(path), "v2-full")
    options = _options(ckpt)
    module: Any = model
    if model is not None:
        _check_model(model, ckpt)
    else:
        module = graph_policy(ckpt.legacy_graph)
        if module is None:
            raise WriteError("a v2 full-model file pickles the model, and this checkpoint has none; pass model=")
        substitute_tensors(module, ckpt.tensors, options, report.not_carried, report.notes)
    d: dict[str, Any] = {"model": module}
    d.update(_v2_header(ckpt, path, report))
    d["metadata"] = dict(ckpt.metadata)
    d["checkpoint_format_version"] = 2
    _agent_attributes_note(ckpt, module if model is None else None, model, report)
    report.not_carried += dropped_fields(ckpt, keep=_OBJECT_FIELDS)
    _classes_note(d, report)
    report.check(strict)
    _torch_save(d, path, prefix=Path(path).stem, options=options)
    return report


def export_state_dict(ckpt: Checkpoint, path: str | os.PathLike[str], *, strict: bool = False) -> ExportReport:
    """Write ``torch.save(OrderedDict(state dict))`` (loads with ``weights_only=True``; ties kept).

    Args:
        ckpt: the checkpoint.
        path: the ``.pt`` file to write.
        strict: raise instead of reporting what a bare state dict cannot carry (everything
            but the tensors).

    Returns:
        The report.

    Raises:
        WriteError: ``strict`` and something is not carried, or an I/O error.
    """
    report = ExportReport(os.fspath(path), "pt")
    report.not_carried += dropped_fields(ckpt, keep={"tensors"})
    report.check(strict)
    _torch_save(OrderedDict(ckpt.tensors), path, prefix=Path(path).stem, options=None)
    return report


def export_safetensors(ckpt: Checkpoint, path: str | os.PathLike[str], *, strict: bool = False) -> ExportReport:
    """Write a ``.safetensors`` file with ``safetensors.torch.save_file``.

    Tensors that are the same view of one storage are written once; the others are listed in
    the ``mettaformat.aliases`` metadata key, which :func:`mettaformat.load_any` restores.
    Tensors that overlap a storage otherwise are written as copies (reported). Metadata
    values that are strings are kept; other JSON-encodable values are JSON-encoded (noted:
    they read back as strings); the rest is reported.

    Args:
        ckpt: the checkpoint.
        path: the file to write.
        strict: raise instead of reporting content the file cannot carry.

    Returns:
        The report.

    Raises:
        WriteError: ``strict`` and something is not carried, unsupported tensors, or an I/O error.
    """
    import safetensors.torch

    report = ExportReport(os.fspath(path), "safetensors")
    tensors, metadata = safetensors_payload(ckpt, report.not_carried, report.notes)
    report.not_carried += dropped_fields(ckpt, keep={"tensors", "metadata"})
    report.check(strict)
    target = Path(path)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".mfmt-export-") as tmp:
        staged = Path(tmp) / "out.safetensors"
        try:
            safetensors.torch.save_file(tensors, os.fspath(staged), metadata=metadata)
            os.replace(staged, target)
        except (OSError, ValueError, RuntimeError) as e:
            raise WriteError(f"saving {target} failed: {e}") from e
    fsync_dir(target.parent)
    return report


# -- helpers ------------------------------------------------------------------------------------
def _options(ckpt: Checkpoint) -> PickleOptions:
    # Write numpy records the way the source spelled them (numpy 2 files used numpy._core).
    paths = ckpt.provenance.get("class_paths") or ()
    modern = any(isinstance(p, str) and p.startswith("numpy._core.") for p in paths)
    return PickleOptions(
        ordered=module_hook_dicts(ckpt.legacy_graph), numpy_core="numpy._core" if modern else "numpy.core"
    )


def _v2_header(ckpt: Checkpoint, path: str | os.PathLike[str], report: ExportReport) -> dict[str, Any]:
    model_type = ckpt.model_type
    if model_type is None:
        model_type = "brain"
        report.notes.append("model_type unknown; written as 'brain' (MettaAgent's default)")
    name = ckpt.name or Path(path).name
    uri = ckpt.uri or f"file://{os.fspath(path)}"
    if ckpt.name is None or ckpt.uri is None:
        report.notes.append("name/uri unknown; derived from the output path")
    return {"model_type": model_type, "name": name, "uri": uri}


def _check_model(model: torch.nn.Module, ckpt: Checkpoint) -> None:
    if not isinstance(model, torch.nn.Module):
        raise WriteError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not ckpt.tensors:
        return
    state = model.state_dict()
    if list(state) != list(ckpt.tensors):
        missing = sorted(set(ckpt.tensors) - set(state))[:5]
        extra = sorted(set(state) - set(ckpt.tensors))[:5]
        raise WriteError(f"model's state dict keys differ from the checkpoint's (missing {missing}, extra {extra})")
    for k, t in ckpt.tensors.items():
        m = state[k]
        if m.dtype != t.dtype or m.shape != t.shape or not torch.equal(m.detach().cpu(), t.detach().cpu()):
            raise WriteError(f"model's {k!r} differs from the checkpoint's; load_state_dict(ckpt.tensors) first")


def _agent_attributes_note(ckpt: Checkpoint, graph_module: Any, model: torch.nn.Module | None, report: ExportReport
                           ) -> None:
    """v1/v2-full files keep agent_attributes on the agent object; report edits that are not there."""
    if not ckpt.agent_attributes:
        return
    from mettaformat.legacy.graph import graph_equal
    from mettaformat.legacy.modules import module_attrs, module_dict

    if model is not None:
        held = getattr(model, "agent_attributes", None)
    else:
        attrs = module_attrs(graph_module) or {}
        inner = module_attrs(module_dict(attrs, "_modules").get("policy")) or {}
        held = attrs.get("agent_attributes", inner.get("agent_attributes"))
    if not (isinstance(held, dict) and graph_equal(dict(held), ckpt.agent_attributes)):
        report.not_carried.append("agent_attributes: the policy object carries its own, which differ")


def _classes_note(root: Any, report: ExportReport) -> None:
    paths = class_paths(root)
    if paths:
        shown = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
        report.notes.append(f"loading needs torch.load(weights_only=False) and the classes {shown}")


def _torch_save(obj: Any, path: str | os.PathLike[str], *, prefix: str, options: PickleOptions | None) -> None:
    """``torch.save`` into a temp folder beside ``path``, then rename over it.

    torch names the zip's root folder after the file, minus its last suffix; saving as
    ``<prefix>.tmp`` reproduces a source's root folder (``model_0000.pt/`` in era-D files).
    """
    target = Path(path)
    root = prefix if _ZIP_PREFIX.match(prefix) else "archive"
    module = pickle_module(options) if options is not None else None
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".mfmt-export-") as tmp:
        staged = Path(tmp) / f"{root}.tmp"
        try:
            if module is None:
                torch.save(obj, staged, pickle_protocol=DEFAULT_PROTOCOL)
            else:
                torch.save(obj, staged, pickle_module=module, pickle_protocol=_protocol(obj))
            os.replace(staged, target)
        except RecursionError as e:
            raise WriteError(f"saving {target}: object graph too deep to pickle") from e
        except (OSError, RuntimeError, ValueError, TypeError, AttributeError, pickle.PickleError) as e:
            raise WriteError(f"saving {target} failed: {e}") from e
    fsync_dir(target.parent)


def _protocol(obj: Any) -> int:
    # Protocol 2 (torch's default) resolves GLOBAL names with getattr; nested class names
    # ("Outer.Inner") need protocol 4's attribute walk.
    dotted = any("." in name for _, name in class_pairs(obj))
    return 4 if dotted else DEFAULT_PROTOCOL

