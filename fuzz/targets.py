"""One function per parser: feed it bytes, accept only ``MettaFormatError`` as a failure mode."""

from __future__ import annotations

import math
import os
import struct
import tempfile
from collections.abc import Callable

import torch

from mettaformat.errors import MettaFormatError

_TMP = "/dev/shm" if os.path.isdir("/dev/shm") else None


def container(data: bytes) -> None:
    """The whole reader: open, metadata, trees, full load with verification."""
    with tempfile.NamedTemporaryFile(suffix=".mfmt", dir=_TMP) as f:
        f.write(data)
        f.flush()
        container_at(f.name)


def header(data: bytes) -> None:
    """The msgpack header parser and the object-tree decoder, with an oracle: a header that parses
    means the same thing with its tensor index in the other form (columnar <-> per-entry)."""
    from mettaformat.container.header import parse_header, parse_index
    from mettaformat.container.tree import decode_tree

    for parse in (parse_header, parse_index):
        try:
            h = parse(data)
            decode_tree(h.metadata)
            for tree in h.trees.values():
                decode_tree(tree)
        except MettaFormatError:
            continue
        for section in h.sections:
            _index_forms_agree(section)


def _index_forms_agree(section: object) -> None:
    from mettaformat.container.header import SectionEntry, encode_msgpack, parse_index
    from mettaformat.container.tensor_index import entries_msgpack, to_map

    assert isinstance(section, SectionEntry)
    columns = section.index.columns
    for form in ({"index": to_map(columns)}, {"tensors": entries_msgpack(columns)}):
        raw = {**section.to_msgpack(), **form}
        raw.pop("tensors" if "index" in form else "index", None)
        again = parse_index(encode_msgpack({"file_length": 0, "checksum": "xxh3-64", "sections": [raw]}))
        assert again.sections[0].key() == section.key(), "the two forms of one tensor index disagree"


def stream_json(data: bytes) -> None:
    """The embedded safetensors JSON parser, with an oracle: whatever it accepts, and that also tiles a
    data region as an index would, safetensors 0.8 reads (this format is never more lenient)."""
    import safetensors.torch

    from mettaformat.constants import MAX_TENSOR_BYTES
    from mettaformat.container.stream_json import parse_stream_json
    from mettaformat.dtypes import DTYPE_TAGS, itemsize

    try:
        _, tensors = parse_stream_json(data, region="fuzz")
    except MettaFormatError:
        return
    position = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        size = itemsize(t.dtype) if t.dtype in DTYPE_TAGS else 0
        if not size or t.begin != position or t.end - t.begin != size * math.prod(t.shape) or t.end > 1 << 20 or (
                size * math.prod(d or 1 for d in t.shape) > MAX_TENSOR_BYTES):
            return  # the index comparison refuses this one (§5.5; an empty tensor's other dimensions count too)
        position = t.end
    body = data + b" " * (-(8 + len(data)) % 8)
    safetensors.torch.load(struct.pack("<Q", len(body)) + body + bytes(position))


def zstd_frame(data: bytes) -> None:
    """The zstd frame path. Byte 0's low two bits select the filter (1: shuffle on float32 elements;
    2 and 3: a plane group of four copies of the frame, float32 or int32), bytes 1-4 give the raw
    size the index would declare, the rest is the frame."""
    import numpy as np
    import xxhash
    import zstandard

    from mettaformat.container.codecs.zstd import ZstdSection
    from mettaformat.container.codecs.zstd_frames import walk_frame
    from mettaformat.container.header import SectionEntry, TensorEntry
    from mettaformat.dtypes import itemsize

    if len(data) < 6:
        return
    flt = data[0] & 3
    width = 1 if flt == 0 else 4
    copies = 4 if flt >= 2 else 1  # a plane group: one frame per byte plane
    raw = max(width, (struct.unpack_from("<I", data, 1)[0] % (1 << 20)) // width * width)
    if copies > 1:
        raw //= 4
    frame = data[5:]
    nbytes = raw * copies
    dtype = {0: "U8", 1: "F32", 2: "F32", 3: "I32"}[flt]
    entry = TensorEntry(name="t", dtype=dtype, shape=(nbytes // itemsize(dtype),), begin=0, end=nbytes, checksum=0)
    table = struct.pack("<QII", 64, 64, 0) + struct.pack("<QII", len(frame), raw, flt) * copies
    section = SectionEntry.from_entries(name="s", offset=0, length=64 + len(frame) * copies, codec="zstd",
                                        configuration={}, stream_length=64 + nbytes, stream_header_length=64,
                                        stream_header_checksum=0, tensors=(entry,), aliases={}, order=("t",),
                                        frames=table)
    try:
        reader = ZstdSection(section)
    except MettaFormatError:
        return
    source = memoryview(bytes(64) + frame * copies)
    # Oracle 1: the compiled chunk decoder and the Python form of its rules agree: what both decode, they
    # decode to the same bytes; a frame refused by the framing rules, both refuse. The one licence: two
    # zstd builds (libzstd, the zstandard package's) may judge a corrupt frame that the framing rules
    # accept differently; the one that decodes it gives content that the frame's checksum holds. The
    # reader takes the compiled result, and the Python path's where the compiled decoder refused.
    python = _decode_tensor(reader, source, entry, compiled=False)
    compiled = _compiled_verdict(reader, source, entry)
    if isinstance(compiled, bytes) and isinstance(python, bytes):
        assert python == compiled, "compiled and Python decoders decode to different bytes"
    elif isinstance(compiled, bytes) or (compiled[1] and isinstance(python, bytes)):
        decoded = compiled if isinstance(compiled, bytes) else python
        assert isinstance(decoded, bytes)
        if isinstance(python, str):  # Python's zstd refused it, not a framing rule
            assert python.startswith("CodecError: zstd: "), python
        walk_frame(memoryview(frame), raw, "fuzz")  # the framing rules accept it (else this raises)
        content = decoded if copies == 1 else decoded[::4]
        assert xxhash.xxh64_intdigest(content) & 0xFFFFFFFF == int.from_bytes(frame[-4:], "little"), compiled
    else:
        assert isinstance(python, str), f"compiled decoder refused ({compiled}) what Python decoded"
    reader_result = _decode_tensor(reader, source, entry, compiled=True)
    assert reader_result == (compiled if isinstance(compiled, bytes) else python), "the reader's choice differs"
    if not isinstance(python, bytes):
        return
    out = torch.frombuffer(bytearray(python), dtype=torch.uint8)
    # Oracle: what was accepted is what zstd itself decodes, interleaved byte by byte (stored frames
    # are read in place without zstd, and planes are joined a word at a time). A plane group's stored
    # frames may fail only zstd's content checksum, which a whole-tensor decode leaves to the tensor checksum.
    try:
        content = zstandard.ZstdDecompressor().decompress(frame)
    except zstandard.ZstdError as e:
        stored = walk_frame(memoryview(frame), raw, "fuzz")[1]
        assert flt >= 2 and stored is not None and "checksum" in str(e), e
        content = b"".join(stored)
    assert len(content) == raw
    planes = np.frombuffer(content, dtype=np.uint8)
    if flt == 1:
        want = planes.reshape(width, -1).T.reshape(-1)
    elif flt >= 2:
        group = np.stack([planes] * 4, axis=1)
        if flt == 2:
            hi, lo = group[:, 3].copy(), group[:, 2].copy()
            group[:, 3], group[:, 2] = (lo & 0x80) | (hi >> 1), (lo & 0x7F) | (hi << 7)
        want = group.reshape(-1)
    else:
        want = planes
    assert np.array_equal(out.numpy(), want), "decoded bytes differ from zstd's"


def _decoders() -> tuple[bool, ...]:
    from mettaformat.container.codecs import zstd_frames

    return (True, False) if zstd_frames.chunk_decoder() is not None else (False,)


def _compiled_verdict(reader: object, source: memoryview, entry: object) -> bytes | tuple[str, bool]:
    """The tensor as the compiled chunk decoder alone decodes it, or why it refused a frame (and
    whether libzstd did); where it is not available, what the Python path gives."""
    from mettaformat.constants import MAX_ZSTD_WINDOW
    from mettaformat.container.codecs import zstd_frames
    from mettaformat.container.codecs.zstd import FILTER_FLOAT_PLANES, FILTER_SHUFFLE

    context = zstd_frames.chunk_decoder()
    out = torch.empty(entry.nbytes, dtype=torch.uint8)  # type: ignore[attr-defined]
    position = 0
    for first, count in reader.tensor_chunks[entry.name]:  # type: ignore[attr-defined]
        _, _, rlen, flt = reader.frames[first]  # type: ignore[attr-defined]
        if context is None or flt == FILTER_SHUFFLE:
            return _decode_tensor(reader, source, entry, compiled=False)
        size = rlen * count
        refused = zstd_frames.decode_chunk(context, source, 0, reader.table, first, count,  # type: ignore[attr-defined]
                                           out.numpy()[position : position + size], bytearray(size),
                                           flt == FILTER_FLOAT_PLANES, MAX_ZSTD_WINDOW)
        if refused is not None:
            return refused[1], refused[2]
        position += size
    return bytes(out.numpy())


def _decode_tensor(reader: object, source: memoryview, entry: object, compiled: bool) -> bytes | str:
    """The tensor's bytes as the reader decodes them, with or without the compiled chunk decoder, or
    the error it raised."""
    from mettaformat.container.codecs import zstd_frames

    kernel = zstd_frames._kernel
    if not compiled:
        zstd_frames._kernel = None
    try:
        out = torch.empty(entry.nbytes, dtype=torch.uint8)  # type: ignore[attr-defined]
        for task in reader.decode_tasks(source, entry, out):  # type: ignore[attr-defined]
            task()
        return bytes(out.numpy())
    except MettaFormatError as e:
        return f"{type(e).__name__}: {e}"
    finally:
        zstd_frames._kernel = kernel


def reference_planes(data: object, width: int, float_bits: bool) -> object:
    """Byte planes of ``data`` (uint8 array) by byte-strided copies, the sign moved bit by bit: the rule
    of the plane filters written plainly, which the split and join (C and numpy) must agree with."""
    planes = data.reshape(-1, width).T.copy()  # type: ignore[attr-defined]
    if float_bits:
        hi, lo = planes[width - 1].copy(), planes[width - 2].copy()
        planes[width - 1] = (hi << 1) | (lo >> 7)
        planes[width - 2] = (lo & 0x7F) | (hi & 0x80)
    return planes


def planes(data: bytes) -> None:
    """Byte-plane split and join, compiled and numpy, with an oracle: both give what the plain rule
    gives. Byte 0 picks the width (2, 4, 8), the float move (bit 2) and how far off 8-byte alignment
    the elements and the output lie (bits 3-5); byte 1 where every plane is cut into two pieces."""
    import numpy as np

    from mettaformat.container.codecs import planes as module

    if len(data) < 2:
        return
    width, float_bits, offset = (2, 4, 8)[data[0] % 3], bool(data[0] & 4), (data[0] >> 3) & 7
    n = (len(data) - 2) // width
    elements = np.frombuffer(data, dtype=np.uint8)[2 : 2 + n * width]
    want = reference_planes(elements, width, float_bits)
    source = np.zeros(n * width + offset, dtype=np.uint8)[offset:]
    source[:] = elements
    cut = data[1] % (n + 1)
    kernels = [module._kernel, None] if module._kernel is not None else [None]
    for kernel in kernels:
        if kernel is None:
            got = np.zeros((width, n), dtype=np.uint8)
            if n:
                module._split_numpy(source, got, width, float_bits)
        else:
            got = module.split_planes(torch.from_numpy(source), width, float_bits).copy()
        assert np.array_equal(got, want), f"split (kernel={kernel is not None}) differs from the rule"
        out = np.zeros(n * width + offset, dtype=np.uint8)[offset:]
        pieces = [[plane[:cut], plane[cut:]] for plane in got]
        if kernel is None:
            module._join_numpy([module._Pieces(p, n) for p in pieces], out.view(module._WORD[width]), width,
                               float_bits)
        else:
            module.join_planes(pieces, torch.from_numpy(out), width, float_bits)
        assert np.array_equal(out, elements), f"join (kernel={kernel is not None}) differs from the rule"


def rebuild(data: bytes) -> None:
    """The delta rebuild from byte planes, with an oracle: it gives back the tensor whose residual against
    the base it was given. Byte 0 picks the width (2, 4, 8), the float move
    (bit 2) and ``high`` (bits 3-5, taken modulo the width); byte 1 where every plane is cut into two
    pieces; the rest is the target's elements, then the base's."""
    import numpy as np

    from mettaformat.container import delta_planes
    from mettaformat.container.delta_filter import residual

    if len(data) < 2:
        return
    width, float_bits = (2, 4, 8)[data[0] % 3], bool(data[0] & 4)
    high = (data[0] >> 3) % width + 1
    n = (len(data) - 2) // (2 * width)
    raw = np.frombuffer(data, dtype=np.uint8)[2 : 2 + 2 * n * width]
    target, base = raw[: n * width], raw[n * width :]
    stored = residual(target, base, width, high).numpy()
    top = max(high, 2) if float_bits else high
    cut = data[1] % (n + 1)
    planes = [[p[:cut], p[cut:]] for p in reference_planes(stored, width, False)]
    base_planes = [[p[:cut], p[cut:]] for p in reference_planes(base, width, float_bits)[width - top :]]
    out = torch.zeros(n * width, dtype=torch.uint8)
    delta_planes.rebuild_planes(planes, base_planes, out, high, float_bits)
    assert np.array_equal(out.numpy(), target), "the rebuild differs from the target"


_delta_dir: tempfile.TemporaryDirectory[str] | None = None


def delta(data: bytes) -> None:
    """A delta checkpoint read in full beside a fixed valid base (the header's ``delta`` map and its ``high``
    counts, the base's identity, the rebuild of each tensor); where it reads, the rebuild from the base's high
    planes must give the same bytes as the general path (whole base tensors). Then the filter with an oracle:
    byte 0 picks the element width and how many high bytes are differenced, the rest splits into a target and
    a base; the filter and its inverse give the target back, with the target's own low bytes stored as they are."""
    global _delta_dir
    import shutil
    from pathlib import Path

    from mettaformat.container.delta_filter import apply_residual, residual

    if _delta_dir is None:
        _delta_dir = tempfile.TemporaryDirectory(dir=_TMP)
        vectors = Path(__file__).resolve().parents[1] / "spec" / "vectors"
        shutil.copy(vectors / "valid_delta_base.mfmt", _delta_dir.name)
    path = Path(_delta_dir.name) / "delta.mfmt"
    path.write_bytes(data)
    fast = _load_all(path)
    if fast is not None:
        general = _load_all(path, planes=False)
        assert general is not None and all(
            fast[k].dtype == v.dtype and torch.equal(fast[k].reshape(-1).view(torch.uint8),
                                                     v.reshape(-1).view(torch.uint8)) for k, v in general.items()
        ), "the rebuild from the base's high planes differs from the general path"
    if not data:
        return
    width = 1 << (data[0] % 4)
    high = 1 + (data[0] >> 2) % width
    n = (len(data) - 1) // (2 * width) * width
    target = torch.frombuffer(bytearray(data[1 : 1 + n]), dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    base = torch.frombuffer(bytearray(data[1 + n : 1 + 2 * n]), dtype=torch.uint8) if n else target.clone()
    stored = residual(target, base, width, high)
    low = width - high
    assert torch.equal(stored.reshape(-1, width)[:, :low], target.reshape(-1, width)[:, :low]), "low bytes changed"
    assert torch.equal(apply_residual(stored, base, width, high), target), "zigzag-sub-high is lossy"


def _load_all(path: object, *, planes: bool = True) -> dict[str, torch.Tensor] | None:
    """Every tensor of every section of the container at ``path`` (keyed ``section/name``), or None when it
    is refused with a MettaFormatError; ``planes=False`` rebuilds residuals from whole base tensors."""
    import mettaformat
    from mettaformat.container import chain

    plan = chain.plane_plan
    if not planes:
        chain.plane_plan = lambda *args: None  # type: ignore[assignment]
    try:
        with mettaformat.open(path) as ckpt:  # type: ignore[arg-type]
            ckpt.metadata  # noqa: B018
            for name in ckpt.tree_names:
                ckpt.tree(name)
            return {f"{s}/{k}": v for s in ckpt.sections for k, v in ckpt.load_section(s).items()}
    except MettaFormatError:
        return None
    finally:
        chain.plane_plan = plan


def container_at(path: object) -> None:
    """Open, decode metadata and trees, and load every section of the container at ``path``."""
    import mettaformat

    try:
        with mettaformat.open(path) as ckpt:  # type: ignore[arg-type]
            ckpt.metadata  # noqa: B018
            for name in ckpt.tree_names:
                ckpt.tree(name)
            for section in ckpt.sections:
                ckpt.load_section(section)
    except MettaFormatError:
        pass


def unpickler(data: bytes) -> None:
    """The restricted pickle VM, with no storages available, and CPython's unpickler as its oracle.

    Whenever our VM accepts a stream that names no global, CPython's own unpickler (which then
    has nothing to import) must read it too, to an equal value.
    """
    from mettaformat.legacy.unpickler import PickleVM

    vm = PickleVM(bytearray(data))
    try:
        ours = vm.run()
    except MettaFormatError:
        return
    # CPython grows its memo array to the largest index written; keep the oracle's memory small.
    if vm.globals_seen or max(vm.memo, default=0) > 1 << 16:
        return
    theirs = _cpython_loads(data)
    try:
        same = _canonical(ours) == _canonical(theirs)
    except RecursionError:  # cyclic values: == recurses; nothing to compare cheaply
        return
    if not same:
        raise AssertionError(f"pickle VM disagrees with CPython: {ours!r:.200} != {theirs!r:.200}")


def _cpython_loads(data: bytes) -> object:
    import io
    import pickle

    class NoGlobals(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            raise pickle.UnpicklingError(f"global {module}.{name}")

    return NoGlobals(io.BytesIO(data), encoding="utf-8").load()


def _canonical(value: object) -> object:
    # NaN != NaN; compare floats by their bit patterns instead.
    if type(value) is float:
        return ("float", struct.pack("<d", value))
    if type(value) in (list, tuple):
        return (type(value).__name__, [_canonical(x) for x in value])  # type: ignore[attr-defined]
    if type(value) is dict:
        return ("dict", [(_canonical(k), _canonical(v)) for k, v in value.items()])  # type: ignore[attr-defined]
    return value


def torch_zip(data: bytes) -> None:
    """The torch zip parser and everything behind it (pickle, storages, recognisers), then what users do next
    with an imported checkpoint: migrate it, recognise its graph again, write it as a container and as a
    weights-only file. Each step may refuse with a MettaFormatError, none may crash."""
    from mettaformat.convert import write_target
    from mettaformat.legacy import import_legacy_bytes
    from mettaformat.legacy.export_plain import weights_only_tree
    from mettaformat.legacy.metta import graph_tensors
    from mettaformat.migrations import apply_migrations

    try:
        ckpt = import_legacy_bytes(data)
    except MettaFormatError:
        return
    with tempfile.TemporaryDirectory(dir=_TMP) as tmp:
        for step in (
            lambda: graph_tensors(ckpt.legacy_graph),
            lambda: weights_only_tree(ckpt.metadata, "metadata", [], []),
            lambda: write_target(ckpt, os.path.join(tmp, "x.mfmt"), "mfmt"),
            lambda: apply_migrations(ckpt, warn=False),
        ):
            try:
                step()
            except MettaFormatError:
                pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "container": container, "header": header, "stream_json": stream_json, "zstd_frame": zstd_frame,
    "unpickler": unpickler, "torch_zip": torch_zip, "delta": delta, "planes": planes,
    "rebuild": rebuild,
}
