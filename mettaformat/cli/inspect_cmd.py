"""``mettaformat inspect FILE``: version, sections, codecs, sizes, tensors and metadata."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mettaformat.cli._output import clip, emit_json, human_bytes, jsonable, sanitize, table
from mettaformat.dtypes import tag_from_dtype
from mettaformat.errors import WriteError
from mettaformat.remote.uri import size_of

if TYPE_CHECKING:
    import torch


def add_parser(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's structure, tensors and metadata")
    p.add_argument("file", metavar="FILE", help="the checkpoint to describe (any format)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def _dtype_tag(t: torch.Tensor) -> str:
    """The safetensors tag containers use, so every format reports dtypes the same way."""
    try:
        return tag_from_dtype(t.dtype)
    except WriteError:  # a dtype safetensors has no tag for (complex128...): torch's name
        return str(t.dtype).removeprefix("torch.")


def _entries(section: str, tensors: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    return [
        {
            "section": section,
            "name": k,
            "dtype": _dtype_tag(t),
            "shape": list(t.shape),
            "bytes": t.numel() * t.element_size(),
            "alias_of": None,
            "delta": False,
        }
        for k, t in tensors.items()
    ]


def describe_other(path: str, kind: str) -> dict[str, Any]:
    """A legacy or safetensors file, through the safe importer (nothing in it runs)."""
    from mettaformat.anyformat import load_any

    ckpt = load_any(path, migrate=False)
    version = ckpt.versions.get("checkpoint_format")
    return {
        "path": path,
        "format": kind,
        "version": str(version) if version is not None else None,
        "shape": ckpt.provenance.get("shape"),
        "file_bytes": size_of(path),
        "checksum": None,
        "sections": [],
        "tensors": _entries("model", ckpt.tensors) + _entries("legacy", ckpt.legacy_tensors),
        "metadata": ckpt.metadata,
        "trees": [],
        "model_type": ckpt.model_type,
        "name": ckpt.name,
        "class_paths": ckpt.provenance.get("class_paths", []),
        "delta": None,
    }


def describe(path: str) -> dict[str, Any]:
    """Everything inspect shows, as plain data (reads the header only for containers)."""
    from mettaformat.container.opened import ContainerFile, split_metadata
    from mettaformat.signatures import sniff_format

    kind = sniff_format(path)
    if kind in ("dcp", "torch-dcp"):  # a distributed checkpoint directory
        from mettaformat.dcp.report import describe_dcp

        return describe_dcp(path, kind)
    if kind != "mettaformat":
        return describe_other(path, kind)
    with ContainerFile(path) as ckpt:  # the header is all inspect shows: no torch, no codecs
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
            deltas = h.delta.tensors.get(s.name, {}) if h.delta is not None else {}
            for name in s.order:
                t = by_name.get(s.aliases.get(name, name))
                assert t is not None
                tensors.append(
                    {
                        "section": s.name,
                        "name": name,
                        "dtype": deltas[t.name][0] if t.name in deltas else t.dtype,
                        "delta": t.name in deltas,
                        "shape": list(t.shape),
                        "bytes": t.nbytes,
                        "alias_of": s.aliases.get(name),
                    }
                )
        user, own = split_metadata(ckpt.metadata)
        return {
            "path": path,
            "format": "mettaformat",
            "version": f"{pre.major}.{pre.minor}",
            "shape": "container",
            "file_bytes": ckpt.file_size,
            "checksum": h.checksum,
            "sections": sections,
            "tensors": tensors,
            "metadata": user,
            "trees": list(h.trees),
            "model_type": own.get("model_type"),
            "name": own.get("name"),
            "class_paths": [],
            "delta": _delta_info(ckpt),
        }


def _delta_info(ckpt: Any) -> dict[str, Any] | None:
    """The base as written and the chain as the headers declare it (nearest first), for a delta checkpoint."""
    from mettaformat.container.delta import declared_chain

    delta = ckpt.header.delta
    if delta is None:
        return None
    return {
        "base": delta.base.uri,
        "chain": [str(p) for p in declared_chain(ckpt.path)],
        "filter": delta.filter,
        "tensors": sum(len(names) for names in delta.tensors.values()),
    }


def run(args: argparse.Namespace) -> int:
    info = describe(args.file)
    if args.json:
        emit_json(info)
        return 0
    path = sanitize(info["path"])
    if info["shape"] == "distributed":
        print(f"{path}: {info['format']} distributed checkpoint, {sanitize(info['version'] or 'torch layout')}, "
              f"{human_bytes(info['file_bytes'])}; read safely, nothing in it executed")
    elif info["format"] != "mettaformat":
        print(
            f"{path}: {info['format']} ({info['shape']}), checkpoint_format_version {info['version']}, "
            f"{human_bytes(info['file_bytes'])}; imported safely, nothing in it executed"
        )
        if args.verbose and info["class_paths"]:
            print("classes named in the pickle: " + ", ".join(map(sanitize, info["class_paths"])))
    else:
        print(f"{path}: mettaformat {info['version']}, {human_bytes(info['file_bytes'])}, checksums {info['checksum']}")
        print()
        rows = [
            [
                s["name"],
                s["codec"],
                human_bytes(s["stored_bytes"]),
                human_bytes(s["raw_bytes"]),
                f"{s['ratio']:.3f}" if s["ratio"] else "-",
                s["tensors"],
            ]
            for s in info["sections"]
        ]
        print(table(["section", "codec", "stored", "raw", "ratio", "tensors"], rows, align="llrrrr"))
        delta = info.get("delta")
        if delta:
            print(f"\ndelta of {sanitize(delta['base'])}: {delta['tensors']} tensors stored as differences; chain: "
                  + " <- ".join(sanitize(p) for p in delta["chain"]))
    if not args.quiet:
        print()
        rows = [
            [
                (f"{t['section']}:" if t["section"] != "model" else "")
                + t["name"]
                + (f" -> {t['alias_of']}" if t["alias_of"] else "")
                + (" (delta)" if t.get("delta") else ""),
                t["dtype"],
                "x".join(map(str, t["shape"])) or "()",
                t["bytes"],
            ]
            for t in info["tensors"]
        ]
        print(table(["tensor", "dtype", "shape", "bytes"], rows, align="lllr"))
    if info["metadata"]:
        print()
        print("metadata:")
        for k, v in jsonable(info["metadata"]).items():
            print(f"  {sanitize(k)}: {clip(sanitize(repr(v)), 200)}")
    if info["trees"]:
        print(f"\ntrees: {', '.join(map(sanitize, info['trees']))}")
    return 0
