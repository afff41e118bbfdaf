"""load_model: a Hugging Face folder (or the embedded default) -> CausalLM, strictly checked.

The model is built on the meta device, given uninitialised storage once, and each tensor is read
from its safetensors file straight into its parameter with plain file reads (no mmap), so peak
memory stays near one copy of the weights. Every key and shape is checked; problems are collected
and reported together with the file they concern.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from lora_engine.models.config import ModelConfig
from lora_engine.models.decoder import CausalLM

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


def resolve_path(path: str | os.PathLike) -> Path:
    """A local folder, or the name of an embedded default model (converted once, then cached)."""
    from lora_engine.sources import embedded

    if isinstance(path, str) and path in embedded.EMBEDDED_MODELS:
        return embedded.ensure_converted(path)
    p = Path(path)
    if not p.exists():
        names = ", ".join(embedded.EMBEDDED_MODELS)
        raise FileNotFoundError(f"model path {str(p)!r} does not exist (embedded models: {names})")
    if not p.is_dir():
        raise NotADirectoryError(f"model path {p} is a file; pass the Hugging Face folder that holds config.json")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has no config.json; is it a Hugging Face model folder?")
    return p


def _dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        d = getattr(torch, str(name).replace("torch.", ""))
    except AttributeError:
        d = None
    if not isinstance(d, torch.dtype) or not d.is_floating_point:
        raise ValueError(f"dtype {name!r} is not a floating-point torch dtype (float32, bfloat16, float16)")
    return d


def load_model(path, dtype=None, device="cpu", **kwargs) -> CausalLM:
    """Load a Llama-family model from a Hugging Face folder or an embedded name.

    dtype: None takes the checkpoint's config (`dtype` / `torch_dtype`), else e.g. torch.bfloat16 or
    "float32". device: where the parameters live. Further keyword arguments (quantize=...) are
    handled by the quantization module when it is installed in the engine.
    """
    if kwargs.get("quantize") is not None:
        from lora_engine.quant import nf4

        return nf4.load_quantized_model(path, dtype=dtype, device=device, **kwargs)
    kwargs.pop("quantize", None)
    if kwargs:
        raise TypeError(f"load_model got unexpected arguments: {', '.join(kwargs)}")
    folder = resolve_path(path)
    cfg = ModelConfig.from_hf(folder / "config.json")
    if "quantization_config" in cfg.extra:
        from lora_engine.quant import nf4

        return nf4.load_quantized_model(folder, dtype=dtype, device=device)
    dt = _dtype(dtype if dtype is not None else cfg.torch_dtype)
    with torch.device("meta"):
        model = CausalLM(cfg).to(dt)  # dtype first: on meta this costs nothing
    model = model.to_empty(device=device)
    model.tie_weights()
    model.reset_buffers()
    load_weights(model, folder)
    model.name_or_path = str(path)
    model.source_dir = str(folder)
    model.eval()
    return model


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Fill every parameter and buffer of `model` from the checkpoint in `folder`, strictly."""
    files = checkpoint_files(folder)
    expected = dict(model.state_dict(keep_vars=True))
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        expected.pop("lm_head.weight", None)
    headers: dict[Path, tuple[dict, int]] = {}
    problems: list[str] = []
    loaded = set()
    for name, file in sorted(files.items(), key=lambda kv: (str(kv[1]), kv[0])):
        if name.endswith(IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if file not in headers:
            headers[file] = read_safetensors_header(file)
        header, start = headers[file]
        if name not in header:
            problems.append(f"tensor {name} is listed in the index but absent from {file.name}")
            continue
        if name not in expected:
            problems.append(f"unexpected tensor {name} in {file.name}")
            continue
        info = header[name]
        param = expected[name]
        if tuple(info["shape"]) != tuple(param.shape):
            problems.append(
                f"wrong shape for {name} in {file.name}: expected {tuple(param.shape)}, got {tuple(info['shape'])}"
            )
            continue
        with torch.no_grad():
            target = param.data
            buf = read_tensor(file, info, start, out=target)
            if buf is not target:
                target.copy_(buf)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        where = ", ".join(sorted({p.name for p in files.values()})) or "the checkpoint"
        problems.append(f"{len(missing)} tensors missing from {where}: {', '.join(missing)}")
    if problems:
        raise CheckpointError(
            f"checkpoint {folder} does not match the {model.config.model_type} model built from its "
            "config.json; make sure config.json and the weights belong together:\n  - " + "\n  - ".join(problems)
        )
