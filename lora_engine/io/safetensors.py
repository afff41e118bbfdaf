"""Safetensors files read strictly: the header parsed and checked, each tensor read into given storage.

Plain file reads (no mmap), so a tensor can be read straight into a preallocated parameter and peak
memory stays near one copy of the weights. Errors name the file and the tensor. Imports torch only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
# Keys some checkpoints carry that hold nothing we need (recomputed buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: the message lists every problem and its file."""


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header: ({name: {dtype, shape, data_offsets}}, byte offset of the data).

    Raises CheckpointError naming the file when the header is truncated or corrupted, or when a
    tensor's bytes would lie past the end of the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: corrupted or truncated safetensors file (header of {n} bytes, file {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            dtype = ST_DTYPES[info["dtype"]]
            numel = 1
            for d in info["shape"]:
                numel *= d
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: corrupted entry for tensor {name!r}: {info!r}") from e
        if end - begin != numel * dtype.itemsize or data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} needs bytes {begin}..{end} of the data section but the file "
                f"has {size - data_start}: the file is truncated or corrupted"
            )
    return header, data_start


def read_tensor(path: Path, info: dict, data_start: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor. With `out` (contiguous CPU, same dtype and shape) it is filled in place."""
    dtype = ST_DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if out is None or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        buf = torch.empty(shape, dtype=dtype)
    else:
        buf = out
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        view = memoryview(buf.view(-1).view(torch.uint8).numpy()) if buf.numel() else memoryview(b"")
        got = f.readinto(view) if buf.numel() else 0
    if got != end - begin:
        raise CheckpointError(f"{path}: tensor {info} truncated (read {got} of {end - begin} bytes)")
    return buf


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """{tensor name: file} for a single-file or sharded (model.safetensors.index.json) checkpoint."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {', '.join(missing)}")
        return {k: folder / f for k, f in weight_map.items()}
    if single.is_file():
        header, _ = read_safetensors_header(single)
        return {k: single for k in header}
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f" (found {', '.join(others)})" if others else ""
    raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")


def float_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        d = getattr(torch, str(name).replace("torch.", ""))
    except AttributeError:
        d = None
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a floating-point torch dtype (float32, bfloat16, float16)")
    return d


