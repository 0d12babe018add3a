"""Build the seed corpus: ``python -m fuzz.seed``. Existing seeds are kept; new ones are added.

Seeds are every conformance vector (and the header, index and frames cut out of them), small
pickles of the shapes Metta wrote, and tiny torch files in both the zip and the legacy stream
format. The real Metta fixtures are not copied here (they live outside the repository); the
tests mutate them at run time instead.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
VECTORS = ROOT.parent / "spec" / "vectors"


def add(target: str, data: bytes) -> None:
    folder = ROOT / "corpus" / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / hashlib.sha1(data).hexdigest()[:16]
    if not path.exists():
        path.write_bytes(data)


def torch_bytes(obj: object, *, zip_format: bool = True) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def _add_stream_json(data: bytes) -> None:
    """The safetensors JSON header of each raw section of a vector (valid or not)."""
    import msgpack

    (header_length,) = struct.unpack_from("<Q", data, 16)
    try:
        header = msgpack.unpackb(data[32:32 + header_length], raw=False, strict_map_key=False)
        sections = [s for s in header["sections"] if s["codec"]["name"] == "raw"]
    except Exception:
        return
    for s in sections:
        stream = data[s["offset"]:s["offset"] + s["length"]]
        if len(stream) >= 8:
            (n,) = struct.unpack_from("<Q", stream)
            add("stream_json", stream[8:8 + n])


def main() -> None:
    for vector in sorted(VECTORS.glob("*.mfmt")):
        data = vector.read_bytes()
        add("container", data)
        if vector.name.startswith(("valid_delta.", "valid_delta_high.", "invalid_delta_")):
            add("delta", data)
        if vector.name.startswith("valid_"):
            (header_length,) = struct.unpack_from("<Q", data, 16)
            add("header", data[32:32 + header_length])
            index_length = struct.unpack_from("<Q", data, len(data) - 32)[0]
            add("header", data[len(data) - 32 - index_length:len(data) - 32])
        _add_stream_json(data)
    import mettaformat

    for vector in sorted(VECTORS.glob("valid_zstd*.mfmt")):
        with mettaformat.open(vector) as ckpt:
            data = vector.read_bytes()
            for reader in (ckpt.section_reader(s) for s in ckpt.sections):
                for offset, clen, rlen, flt in getattr(reader, "frames", []):
                    declared = rlen * (4 if flt >= 2 else 1)  # the target builds plane groups of four
                    add("zstd_frame", bytes([flt]) + struct.pack("<I", declared) + data[offset:offset + clen])
    generator = torch.Generator().manual_seed(0)
    for first in range(0, 48, 5):  # every width, with and without the float move, at several offsets
        floats = torch.randn(37, generator=generator).to(torch.float64).view(torch.uint8)
        add("planes", bytes([first, (7 * first + 3) % 256]) + bytes(floats.numpy()[: 8 * (first % 37 + 1)]))
    for first in range(0, 72, 7):  # every width, float move and high, a trained-like pair a step apart
        weights = torch.randn(61, generator=generator) * 0.02
        after = weights + 1e-4 * torch.randn(61, generator=generator)
        pair = torch.cat([after, weights]).to(torch.float64 if first % 3 == 2 else torch.float32)
        words = pair.view(torch.uint8).numpy() if first % 3 else pair.to(torch.bfloat16).view(torch.uint8).numpy()
        add("rebuild", bytes([first, (5 * first + 1) % 256]) + bytes(words))
    torch.manual_seed(0)
    linear = nn.Linear(3, 2)
    shapes: list[object] = [
        {"w": torch.randn(2, 3), "b": torch.arange(4)},
        {"model_state_dict": linear.state_dict(), "checkpoint_format_version": 2, "model_type": "brain",
         "name": "m", "uri": "file://m.pt", "metadata": {"epoch": 1, "action_names": ["a", "b"]}},
        {"optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}, "agent_step": 1,
         "epoch": 2, "policy_path": "file://p"},
        linear,
        nn.Sequential(nn.Linear(2, 2), nn.ReLU()),
    ]
    for obj in shapes:
        z = torch_bytes(obj)
        add("torch_zip", z)
        add("torch_zip", torch_bytes(obj, zip_format=False))
        with zipfile.ZipFile(io.BytesIO(z)) as archive:
            pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            add("unpickler", archive.read(pkl))
    for protocol in range(6):
        add("unpickler", pickle.dumps({"a": [1, 2.5, "x", b"y", None, True], "t": (1, (2,)), 3: {4}}, protocol))
        add("unpickler", pickle.dumps(OrderedDict(a=1), protocol))
    print(f"corpus: {sum(1 for _ in (ROOT / 'corpus').rglob('*') if _.is_file())} files")


if __name__ == "__main__":
    main()
