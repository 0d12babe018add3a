"""``mettaformat inspect FILE``: version, sections, codecs, sizes, tensors and metadata."""

from __future__ import annotations

import argparse
import os
from typing import Any

from mettaformat.cli._output import emit_json, human_bytes, jsonable, sanitize, table
from mettaformat.container.reader import LazyCheckpoint


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's structure, tensors and metadata")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def describe(path: str) -> dict[str, Any]:
    """Everything inspect shows, as plain data (reads the header only)."""
    with LazyCheckpoint(path, verify=False) as ckpt:
        h, pre = ckpt.header, ckpt.preamble
        sections = []
        tensors = []
        for s in h.sections:
            sections.append(
                {
                    "name": s.name,
                    "codec": s.codec,
                    "configuration": s.configuration,
                    "offset": s.offset,
                    "stored_bytes": s.length,
                    "raw_bytes": s.stream_length,
                    "ratio": round(s.stream_length / s.length, 4) if s.length else None,
                    "tensors": len(s.tensors),
                    "aliases": dict(s.aliases),
                }
            )
            by_name = s.by_name()
            for name in s.order:
                t = by_name.get(s.aliases.get(name, name))
                assert t is not None
                tensors.append(
                    {
                        "section": s.name,
                        "name": name,
                        "dtype": t.dtype,
                        "shape": list(t.shape),
                        "bytes": t.nbytes,
                        "alias_of": s.aliases.get(name),
                    }
                )
        return {
            "path": path,
            "format": "mettaformat",
            "version": f"{pre.major}.{pre.minor}",
            "file_bytes": os.path.getsize(path),
            "checksum": h.checksum,
            "sections": sections,
            "tensors": tensors,
            "metadata": ckpt.metadata,
            "trees": list(h.trees),
        }


def run(args: argparse.Namespace) -> int:
    info = describe(args.file)
    if args.json:
        emit_json(info)
        return 0
    print(
        f"{sanitize(info['path'])}: mettaformat {info['version']}, {human_bytes(info['file_bytes'])}, "
        f"checksums {info['checksum']}"
    )
    print()
    print(
        table(
            ["section", "codec", "stored", "raw", "ratio", "tensors"],
            [
                [
                    s["name"],
                    s["codec"],
                    human_bytes(s["stored_bytes"]),
                    human_bytes(s["raw_bytes"]),
                    f"{s['ratio']:.3f}" if s["ratio"] else "-",
                    s["tensors"],
                ]
                for s in info["sections"]
            ],
            align="llrrrr",
        )
    )
    if not args.quiet:
        print()
        print(
            table(
                ["tensor", "dtype", "shape", "bytes"],
                [
                    [
                        (f"{t['section']}:" if t["section"] != "model" else "")
                        + t["name"]
                        + (f" -> {t['alias_of']}" if t["alias_of"] else ""),
                        t["dtype"],
                        "x".join(map(str, t["shape"])) or "()",
                        t["bytes"],
                    ]
                    for t in info["tensors"]
                ],
                align="lllr",
            )
        )
    if info["metadata"]:
        print()
        print("metadata:")
        for k, v in jsonable(info["metadata"]).items():
            print(f"  {sanitize(k)}: {sanitize(repr(v))[:200]}")
    if info["trees"]:
        print(f"\ntrees: {', '.join(map(sanitize, info['trees']))}")
    return 0
