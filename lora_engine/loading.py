"""load_model: a Hugging Face folder (or the embedded default) -> CausalLM, strictly checked.

The model is built on the meta device, given uninitialised storage once, and each tensor is read
from its safetensors file straight into its parameter with plain file reads (no mmap), so peak
memory stays near one copy of the weights. Every key and shape is checked; problems are collected
and reported together with the file they concern.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lora_engine.io.safetensors import (
    IGNORED_SUFFIXES,
    CheckpointError,
    checkpoint_files,
    float_dtype,
    read_safetensors_header,
    read_tensor,
)
from lora_engine.models.config import ModelConfig
from lora_engine.models.decoder import CausalLM
from lora_engine.sources.embedded import resolve_path


def load_model(path, dtype=None, device="cpu", **kwargs) -> CausalLM:
    """Load a Llama-family model from a Hugging Face folder or an embedded name.

    dtype: None takes the checkpoint's config (`dtype` / `torch_dtype`), else e.g. torch.bfloat16 or
    "float32". device: where the parameters live. Further keyword arguments (quantize=...) are
    handled by the quantization module when it is installed in the engine.
    """
    if kwargs.get("quantize") is not None:
        from lora_engine.quant.checkpoint import load_quantized_model

        return load_quantized_model(path, dtype=dtype, device=device, **kwargs)
    kwargs.pop("quantize", None)
    if kwargs:
        raise TypeError(f"load_model got unexpected arguments: {', '.join(kwargs)}")
    folder = resolve_path(path)
    cfg = ModelConfig.from_hf(folder / "config.json")
    if "quantization_config" in cfg.extra:
        from lora_engine.quant.checkpoint import load_quantized_model

        return load_quantized_model(folder, dtype=dtype, device=device)
    dt = float_dtype(dtype if dtype is not None else cfg.torch_dtype)
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
