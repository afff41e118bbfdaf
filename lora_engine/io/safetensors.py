"""Safetensors files: read strictly, tensor by tensor; written as a stream; the one dtype table.

Reading uses plain file reads (no mmap), so a tensor goes straight into a preallocated parameter and
peak memory stays near one copy of the weights. `load_checkpoint` walks every tensor of a checkpoint
(one file or a sharded index) into a module's expected state with a per-tensor hook (NF4 uses it to
quantize while loading) and reports every unexpected, missing or wrong-shaped tensor together.
`write_safetensors` writes the header, then one tensor at a time, through an atomic file. Errors
name the file and the tensor. Imports torch and the standard library only.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_engine.io.atomic import atomic_file

# The dtype table of the package (kernels/dtypes.py keeps the kernels' three: the kernels import no io).
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES = {d: name for name, d in ST_DTYPES.items()}
# The dtypes a model's weights are computed and saved in (the kernels support these three).
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    spans = []
    for name, info in header.items():
        begin, end = _check_entry(path, name, info)
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {name!r} needs bytes {begin}..{end} of the data section but the file "
                f"has {size - data_start}: the file is truncated or corrupted"
            )
        if begin < end:
            spans.append((begin, end, name))
    # Tensors must not share bytes: a file whose tensors overlap was not written by a safetensors writer.
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section (bytes {begin}.."
                                  f"{end}): the file is corrupted")
    return header, data_start


def _check_entry(path: Path, name: str, info) -> tuple[int, int]:
    """(begin, end) of one header entry, after checking its types and that its bytes fit its dtype and shape."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupted entry for tensor {name!r}: {why}")

    if not isinstance(info, dict):
        raise bad(f"expected an object with dtype, shape and data_offsets, got {type(info).__name__}")
    if info.get("dtype") not in ST_DTYPES:
        raise bad(f"dtype {info.get('dtype')!r} is not one of {', '.join(ST_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")

    def ints(v) -> bool:
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)

    if not ints(shape):
        raise bad(f"shape must be a list of non-negative integers, got {shape!r:.80}")
    if not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r:.80}")
    begin, end = offsets
    nbytes = math.prod(shape) * ST_DTYPES[info["dtype"]].itemsize
    if end - begin != nbytes:
        raise bad(f"{info['dtype']} {tuple(shape)} needs {nbytes} bytes, data_offsets give {end - begin}")
    return begin, end


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
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must be an object of tensor name -> file name")
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


def float_dtype(name, choices: Iterable[torch.dtype] | None = None) -> torch.dtype:
    """torch.bfloat16, "bfloat16" or "torch.bfloat16" -> torch.bfloat16; ValueError for anything that is not a
    floating-point dtype, or not among `choices` when given."""
    d = name
    if not isinstance(d, torch.dtype):
        try:
            d = getattr(torch, str(name).replace("torch.", ""))
        except AttributeError:
            d = None
    if choices is not None:
        choices = tuple(choices)
        if d not in choices:
            names = ", ".join(str(c).removeprefix("torch.") for c in choices)
            raise ValueError(f"dtype must be one of {names}, got {name!r}")
    elif not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a floating-point torch dtype (float32, bfloat16, float16)")
    return d


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", the spelling of config.json."""
    return str(dtype).removeprefix("torch.")


# ---- the strict loader ----------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a checkpoint, not yet read: what a load hook is given."""

    name: str
    file: Path
    info: dict  # its header entry: dtype, shape, data_offsets
    data_start: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.info["shape"])

    @property
    def dtype(self) -> torch.dtype:
        return ST_DTYPES[self.info["dtype"]]

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor, read from disk now (into `out` when it fits; see read_tensor)."""
        return read_tensor(self.file, self.info, self.data_start, out=out)


# hook(tensor) -> True when the hook has taken the tensor (the default read into `expected` is skipped).
LoadHook = Callable[[StoredTensor], bool]


def load_checkpoint(folder: Path, expected: Mapping[str, torch.Tensor], hook: LoadHook | None = None, *,
                    skip: Collection[str] = (), finish: Callable[[], list[str]] | None = None,
                    what: str = "the model") -> None:
    """Read every tensor of the checkpoint in `folder` into `expected` ({name: tensor}), strictly.

    Tensors are visited file by file in name order, one at a time. For each: a name in `skip` (or
    ending in IGNORED_SUFFIXES) is passed over; an expected name whose stored shape differs is a
    problem; otherwise `hook` is asked first and may claim it (read it, convert it, keep it), else it
    is read straight into its expected tensor (preallocated storage, no copy when dtype and device
    fit), else, if not expected, it is a problem. An expected tensor on the meta device must be
    claimed by the hook. Expected tensors neither read nor claimed are missing.
    A hook reports a problem with the tensor by raising CheckpointError: its message joins the others
    and the walk goes on; any other exception propagates, noting the tensor and its file.
    `finish()`, called after the walk, returns further problems (e.g. from assembling claimed parts).
    All problems are raised together as one CheckpointError naming `folder` and `what`.
    """
    files = checkpoint_files(folder)
    headers: dict[Path, tuple[dict, int]] = {}
    problems: list[str] = []
    loaded = set()  # expected names found in the checkpoint
    for name, file in sorted(files.items(), key=lambda kv: (str(kv[1]), kv[0])):
        if name.endswith(IGNORED_SUFFIXES) or name in skip:
            continue
        if file not in headers:
            headers[file] = read_safetensors_header(file)
        header, start = headers[file]
        if name not in header:
            problems.append(f"tensor {name} is listed in the index but absent from {file.name}")
            continue
        stored = StoredTensor(name, file, header[name], start)
        target = expected.get(name)
        if target is not None and stored.shape != tuple(target.shape):
            problems.append(f"wrong shape for {name} in {file.name}: expected {tuple(target.shape)}, "
                            f"got {stored.shape}")
            loaded.add(name)  # present, if unusable: reported once, not also as missing
            continue
        try:
            claimed = hook is not None and hook(stored)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        except Exception as e:
            e.add_note(f"while loading tensor {name} from {file}")
            raise
        if not claimed:
            if target is None:
                problems.append(f"unexpected tensor {name} in {file.name}")
                continue
            if target.is_meta:
                raise RuntimeError(f"load_checkpoint: {name} is expected on the meta device (no storage) and the "
                                   "hook did not claim it; the hook must take every meta tensor")
            with torch.no_grad():
                data = target.data
                buf = stored.read(out=data)
                if buf is not data:
                    data.copy_(buf)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        where = ", ".join(sorted({p.name for p in files.values()})) or "the checkpoint"
        problems.append(f"{len(missing)} tensors missing from {where}: {', '.join(missing)}")
    if finish is not None:
        problems += finish()
    if problems:
        raise CheckpointError(
            f"checkpoint {folder} does not match {what}; make sure config.json and the weights belong "
            "together:\n  - " + "\n  - ".join(problems)
        )


# ---- the streaming writer -------------------------------------------------------------------------
def write_safetensors(path: str | os.PathLike, layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
                      get: Callable[[str], torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file atomically, one tensor in memory at a time; returns the data bytes.

    layout: {name: (dtype, shape)}, known before any tensor is made, so the header goes first.
    get(name): the tensor itself, called once per name, just before it is written, and dropped after.
    Tensors are laid out by falling item size, then name (as safetensors orders them), so each one
    starts aligned to its item size. Raises ValueError when a tensor does not match its layout.
    """
    order = sorted(layout, key=lambda k: (-layout[k][0].itemsize, k))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        dtype, shape = layout[name]
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in order:
            t = get(name).detach()
            if (t.dtype, tuple(t.shape)) != (layout[name][0], tuple(layout[name][1])):
                raise ValueError(f"write_safetensors: {name} is {t.dtype} {tuple(t.shape)}, the layout says "
                                 f"{layout[name][0]} {tuple(layout[name][1])}")
            t = t.to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            del t
    return offset


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> int:
    """write_safetensors for tensors already in memory (shared storage is fine: each is written by value)."""
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    return write_safetensors(path, layout, tensors.__getitem__, metadata)
