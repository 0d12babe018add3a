"""Shared output helpers: JSON vs human text, tables, and control-character escaping."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["emit_json", "human_bytes", "jsonable", "progress_bar", "sanitize", "table"]


def sanitize(text: str) -> str:
    """Escape control characters so a hostile name cannot rewrite the terminal."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def clip(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, with an ellipsis when anything was cut."""
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def jsonable(value: Any) -> Any:
    """A JSON-safe rendering of a decoded object tree (tags kept readable, never lossy silently)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, bytes):
        return {"$bytes": value.hex()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k) if isinstance(k, str) else repr(k): jsonable(v) for k, v in value.items()}
    torch = sys.modules.get("torch")  # no torch imported means no torch value can be here
    if torch is None:
        return repr(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return {"$tensor": {"dtype": str(value.dtype), "shape": list(value.shape)}}
    return repr(value)


def emit_json(value: Any) -> None:
    json.dump(jsonable(value), sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, align: str = "") -> str:
    """A plain-text table; ``align`` holds 'l' or 'r' per column (default: left)."""
    cells = [[sanitize(str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    aligns = (align or "l" * len(headers)).ljust(len(headers), "l")

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, aligns, strict=True)
        ).rstrip()

    lines = [fmt(headers), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def progress_bar(total: int, desc: str, *, quiet: bool = False) -> Any:
    """A tqdm bar on stderr, shown only on a terminal (never in pipes, logs or CI) and not with --quiet."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="file", disable=quiet or not sys.stderr.isatty(), leave=False)
