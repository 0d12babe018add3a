"""``check_checkpoint_compatibility``: can this runtime load that checkpoint, and what to do if not.

Levels and texts follow Metta's version checker (PR #973) so existing tooling keeps matching
its strings, with two fixes: it reads only the header of containers instead of loading the
whole file, and it works on every legacy shape (the old checker crashed on PolicyRecords).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from mettaformat.checkpoint import Checkpoint
from mettaformat.constants import MFMT_VERSION_MAJOR, MFMT_VERSION_MINOR
from mettaformat.errors import MettaFormatError, UnsupportedVersionError

__all__ = ["CompatibilityLevel", "CompatibilityReport", "RuntimeVersions", "check_checkpoint_compatibility"]


class CompatibilityLevel(Enum):
    FULL = "full"
    PARTIAL = "partial"
    INCOMPATIBLE = "incompatible"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RuntimeVersions:
    """What the loading runtime supports. ``None`` fields are not checked."""

    checkpoint_format: int = MFMT_VERSION_MAJOR
    observation_space: str | None = None
    action_space: str | None = None
    layer: str | None = None


@dataclass
class CompatibilityReport:
    level: CompatibilityLevel
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)
    #: what was found in the file: format, shape and version fields.
    checkpoint: dict[str, Any] = field(default_factory=dict)

    def is_compatible(self) -> bool:
        return self.level in (CompatibilityLevel.FULL, CompatibilityLevel.PARTIAL)

    @property
    def exit_code(self) -> int:
        """0 full, 1 partial, 2 incompatible or unknown (the CLI's exit status)."""
        return {CompatibilityLevel.FULL: 0, CompatibilityLevel.PARTIAL: 1}.get(self.level, 2)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["level"] = self.level.value
        return out

    def __str__(self) -> str:
        lines = [f"Compatibility Level: {self.level.value}"]
        for title, items in (
            ("Errors", self.errors),
            ("Warnings", self.warnings),
            ("Recommendations", self.recommendations),
        ):
            if items:
                lines.append(f"\n{title}:")
                lines.extend(f"  - {item}" for item in items)
        return "\n".join(lines)


def _format_level(found: int | None, runtime: int) -> CompatibilityLevel:
    if found is None:
        return CompatibilityLevel.PARTIAL
    if found > runtime:
        return CompatibilityLevel.INCOMPATIBLE
    return CompatibilityLevel.FULL  # 1 and 2 are imported losslessly; 3 is native


def _read(path: str | os.PathLike[str]) -> Checkpoint:
    from mettaformat.anyformat import sniff_format
    from mettaformat.checkpoint_io import read_checkpoint

    if sniff_format(path) == "mettaformat":
        return read_checkpoint(path, with_tensors=False)  # header only
    from mettaformat.anyformat import load_any

    return load_any(path, migrate=False)


def check_checkpoint_compatibility(
    path: str | os.PathLike[str], runtime: RuntimeVersions | None = None
) -> CompatibilityReport:
    """Report whether ``runtime`` can load the checkpoint at ``path``.

    Never raises for a bad file: an unreadable or unrecognised file is level ``unknown``
    with the reason in ``errors``.

    Example:
        >>> report = check_checkpoint_compatibility("model_0050.pt")
        >>> print(report)
        Compatibility Level: full
    """
    runtime = runtime or RuntimeVersions()
    try:
        ckpt = _read(path)
    except UnsupportedVersionError as e:
        found = e.found[0] if isinstance(e.found, tuple) else e.found
        return CompatibilityReport(
            CompatibilityLevel.INCOMPATIBLE,
            errors=[f"Checkpoint format v{found} is not compatible with runtime v{runtime.checkpoint_format}", str(e)],
            recommendations=["Upgrade mettaformat to read this checkpoint"],
            checkpoint={"checkpoint_format_version": found},
        )
    except (MettaFormatError, OSError) as e:
        return CompatibilityReport(
            CompatibilityLevel.UNKNOWN,
            errors=[f"Cannot read checkpoint: {e}"],
            recommendations=["Run: mettaformat validate <checkpoint_path>"],
        )
    found = ckpt.versions.get("checkpoint_format")
    report = CompatibilityReport(
        CompatibilityLevel.FULL,
        checkpoint={
            "format": ckpt.provenance.get("source_format"),
            "shape": ckpt.provenance.get("shape"),
            "checkpoint_format_version": found,
            "container_version": ckpt.provenance.get("container_version"),
            "observation_space_version": ckpt.versions.get("observation_space"),
            "action_space_version": ckpt.versions.get("action_space"),
            "layer_version": ckpt.versions.get("layer"),
        },
    )
    level = _format_level(found, runtime.checkpoint_format)
    if level is CompatibilityLevel.INCOMPATIBLE:
        report.errors.append(f"Checkpoint format v{found} is not compatible with runtime v{runtime.checkpoint_format}")
        report.recommendations.append("Use the checkpoint migration tool: mettaformat migrate <checkpoint_path>")
    elif level is CompatibilityLevel.PARTIAL:
        report.warnings.append("Checkpoint format version is unknown, loading may fail")
    container = ckpt.provenance.get("container_version")
    if isinstance(container, str) and container.startswith(f"{MFMT_VERSION_MAJOR}."):
        minor = int(container.split(".")[1])
        if minor > MFMT_VERSION_MINOR:
            report.warnings.append(
                f"Checkpoint format v{container} is newer than this reader "
                f"(v{MFMT_VERSION_MAJOR}.{MFMT_VERSION_MINOR}); newer fields will be ignored"
            )
    if found in (1, 2):
        report.recommendations.append(
            "Convert to mettaformat for faster, safer loading: mettaformat migrate <checkpoint_path>"
        )
    obs, act, layer = (ckpt.versions.get(k) for k in ("observation_space", "action_space", "layer"))
    if obs is not None and runtime.observation_space is not None and obs != runtime.observation_space:
        report.errors.append(
            f"Observation space mismatch: checkpoint uses {obs}, runtime expects {runtime.observation_space}"
        )
    if act is not None and runtime.action_space is not None and act != runtime.action_space:
        report.warnings.append(
            f"Action space version mismatch: checkpoint uses {act}, runtime uses "
            f"{runtime.action_space}. Some actions may not work correctly."
        )
    if layer is not None and runtime.layer is not None and layer != runtime.layer:
        report.warnings.append(
            f"Layer architecture version mismatch: checkpoint uses {layer}, runtime uses {runtime.layer}"
        )
    if report.errors:
        report.level = CompatibilityLevel.INCOMPATIBLE
    elif report.warnings:
        report.level = CompatibilityLevel.PARTIAL
    return report
