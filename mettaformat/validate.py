"""``validate``: check a checkpoint end to end and name every damaged region, without stopping at the first.

For containers: structure, header and trailer-index consistency, padding, embedded safetensors
headers and every checksum; ``deep`` also decodes every tensor. For legacy torch files: the
detected shape and any unsafe globals the pickle names (found by the safe importer, which never
executes them). For ``.safetensors`` files: safetensors' own validation.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mettaformat.errors import MettaFormatError

__all__ = ["Problem", "ValidationReport", "unsafe_globals", "validate"]

@dataclass(frozen=True)
class Problem:
    region: str
    message: str


@dataclass
class ValidationReport:
    path: str
    format: str | None = None
    shape: str | None = None
    tensors_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    unsafe_globals: list[str] = field(default_factory=list)
    #: information that is not a problem (``deep``: non-finite values in float tensors).
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def unsafe_globals(class_paths: list[str]) -> list[str]:
    """The class paths from a pickle that name code-running callables (the importer's own rule)."""
    from mettaformat.legacy.unsafe import unsafe_class_paths

    return unsafe_class_paths(class_paths)


def _problem(e: MettaFormatError) -> Problem:
    where = e.region or "file"
    if e.offset is not None:
        where += f" @ {e.offset}"
    return Problem(where, e.message)


def validate(path: str | os.PathLike[str], *, deep: bool = False) -> ValidationReport:
    """Check ``path``; every problem found is listed, none raises.

    Args:
        deep: also materialise every tensor and report non-finite values (as notes). Every
            checksum is verified either way, which decodes zstd sections.
    """
    from mettaformat.anyformat import sniff_format

    report = ValidationReport(path=os.fspath(path))
    try:
        report.format = sniff_format(path)
    except (MettaFormatError, OSError) as e:
        report.problems.append(Problem("signature", str(e)))
        return report
    try:
        if report.format == "mettaformat":
            _validate_container(path, deep, report)
        elif report.format == "safetensors":
            _validate_safetensors(path, report)
        elif report.format in ("dcp", "torch-dcp"):
            from mettaformat.dcp.report import validate_dcp

            validate_dcp(path, report.format, deep, report)
        else:
            _validate_legacy(path, report)
    except MettaFormatError as e:
        report.problems.append(_problem(e))
    except OSError as e:
        report.problems.append(Problem("file", str(e)))
    return report


def _validate_container(path: str | os.PathLike[str], deep: bool, report: ValidationReport) -> None:
    from mettaformat.container.chain import chain
    from mettaformat.container.reader import LazyCheckpoint
    from mettaformat.container.tree import decode_tree

    report.shape = "container"
    with LazyCheckpoint(path, verify=True) as ckpt:
        try:
            ckpt.verify_structure()
        except MettaFormatError as e:
            report.problems.append(_problem(e))
        for base in chain(ckpt)[1:]:  # the files a delta's tensors are rebuilt from
            report.notes.append(f"delta: rebuilt from base {base.path}")
            try:
                base.verify_structure()
            except MettaFormatError as e:
                report.problems.append(Problem(f"base {base.path}: {e.region}", e.message))
        damaged: set[tuple[str, str]] = set()
        for s in ckpt.header.sections:
            for t in s.tensors:
                # Checking a zstd tensor's checksums means decoding it: each frame carries a zstd
                # content checksum and each tensor an xxh3 over its decoded bytes.
                report.tensors_checked += 1  # checked, whatever the outcome
                try:
                    tensor = ckpt.read_entry(s, t)
                except MettaFormatError as e:
                    damaged.add((s.name, t.name))
                    report.problems.append(Problem(f"section {s.name!r} tensor {t.name!r}", e.message))
                    continue
                if deep and tensor.is_floating_point() and tensor.numel():
                    bad = int((~torch.isfinite(tensor.float())).sum())
                    if bad:
                        report.notes.append(f"section {s.name!r} tensor {t.name!r}: {bad} non-finite values")

        def tensor_of(section: str, name: str) -> torch.Tensor:
            # A damaged tensor is reported once, above; a tree referring to it is not damaged.
            s = ckpt.header.section(section)
            target = s.aliases.get(name, name) if s is not None else name
            if (section, target) in damaged:
                return torch.empty(0)
            return ckpt.get_tensor(name, section=section)

        try:
            ckpt.metadata  # noqa: B018 - decoding validates every tag
            for name in ckpt.tree_names:
                decode_tree(ckpt.header.trees[name], tensor_of, path=f"header.trees.{name}")
        except MettaFormatError as e:
            report.problems.append(_problem(e))


def _validate_safetensors(path: str | os.PathLike[str], report: ValidationReport) -> None:
    import safetensors.torch

    report.shape = "state_dict"
    try:
        report.tensors_checked = len(safetensors.torch.load_file(os.fspath(path)))
    except Exception as e:  # safetensors reports its own error types
        report.problems.append(Problem("safetensors", str(e)))


def _validate_legacy(path: str | os.PathLike[str], report: ValidationReport) -> None:
    from mettaformat.legacy import import_legacy

    ckpt = import_legacy(path)
    report.shape = ckpt.provenance.get("shape")
    report.tensors_checked = len(ckpt.tensors)
    report.unsafe_globals = unsafe_globals(list(ckpt.provenance.get("class_paths", [])))
    for g in report.unsafe_globals:
        report.problems.append(Problem("data.pkl", f"names unsafe global {g} (recorded, never executed)"))
