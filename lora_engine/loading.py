"""load_model: a Hugging Face folder (or the embedded default) -> CausalLM, strictly checked.

models/builder.py builds it: config.json read once and checked against the checkpoint's tensor shapes,
the model built on the meta device, given uninitialised storage once, and each tensor read from its
safetensors file straight into its parameter with plain file reads (no mmap), so peak memory stays near
one copy of the weights. Every key and shape is checked; problems are collected and reported together
with the file they concern. NF4 (quantize="nf4", or a checkpoint saved in NF4) goes through
quant/checkpoint.py, which hands the builder its swap.
"""

from __future__ import annotations

import torch

from lora_engine.io.safetensors import float_dtype
from lora_engine.kernels.nf4_format import BLOCKSIZES
from lora_engine.models import gpt_oss
from lora_engine.models.builder import build_model, load_weights, open_checkpoint
from lora_engine.models.decoder import CausalLM
from lora_engine.quant.checkpoint import QUANTIZE_METHODS, load_nf4
from lora_engine.quant.nf4 import DEFAULT_SKIP


def load_model(path, dtype=None, device="cpu", *, quantize: str | None = None, quantize_skip=DEFAULT_SKIP,
               blocksize: int = 64, double_quant: bool = True, verbose: bool = True) -> CausalLM:
    """Load a Llama-family model from a Hugging Face folder or an embedded name.

    dtype: None takes the checkpoint's config (`dtype` / `torch_dtype`), else e.g. torch.bfloat16 or
    "float32". device: where the parameters live ("cpu", "cuda", torch.device).
    quantize: None, or "nf4" to quantize the linear layers while the weights are read (bitsandbytes'
    NF4 bytes). A checkpoint saved in NF4 (config.json with a bitsandbytes quantization_config) loads
    as stored either way, with the blocksize and double quantization it was saved with.
    quantize_skip: module names kept in full precision with quantize="nf4" (a name matches a module
    path, its last part or any part of it). blocksize (32, 64, ..., 4096) and double_quant: the NF4
    settings. verbose: log (INFO) the NF4 model's bits per parameter.
    Raises ValueError naming the argument when one is out of range, CheckpointError naming the file
    when config.json or the weights are not a model this engine builds.
    """
    quantize_skip = _check_arguments(dtype, device, quantize, quantize_skip, blocksize, double_quant)
    ckpt = open_checkpoint(path)
    # a quantization_config of NF4 bytes; gpt-oss's MXFP4 experts are read dequantized (models/gpt_oss.py)
    stored_nf4 = ckpt.quantization_config is not None and not gpt_oss.is_mxfp4(ckpt.config.extra)
    if quantize is not None or stored_nf4:
        return load_nf4(ckpt, dtype, device, quantize, quantize_skip, blocksize, double_quant, verbose,
                        name_or_path=path)
    model = build_model(ckpt.config, ckpt.dtype(dtype), device, checkpoint=ckpt)
    return load_weights(model, ckpt, name_or_path=path)


def _check_arguments(dtype, device, quantize, quantize_skip, blocksize, double_quant) -> tuple[str, ...]:
    """ValueError naming the first argument out of range; returns quantize_skip as a tuple of names."""
    if dtype is not None:
        float_dtype(dtype)
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"load_model: device={device!r} is not a torch device ({e})") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"load_model: device={device!r} but this torch sees no CUDA device; use device='cpu'")
    if quantize not in QUANTIZE_METHODS:
        raise ValueError(f"load_model: quantize={quantize!r} is not supported; use quantize='nf4' or None")
    try:
        names = (quantize_skip,) if isinstance(quantize_skip, str) else tuple(quantize_skip)
    except TypeError:
        names = None
    if names is None or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"load_model: quantize_skip={quantize_skip!r} must be a module name or a sequence of "
                         "module names, e.g. ('lm_head',)")
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"load_model: blocksize={blocksize!r} is not allowed; use one of {BLOCKSIZES}")
    if not isinstance(double_quant, bool):
        raise ValueError(f"load_model: double_quant={double_quant!r} must be True or False")
    if quantize is None:
        given = [f"{k}={v!r}" for k, v, changed in (("quantize_skip", quantize_skip, names != DEFAULT_SKIP),
                                                     ("blocksize", blocksize, blocksize != 64),
                                                     ("double_quant", double_quant, not double_quant)) if changed]
        if given:
            raise ValueError(f"load_model: {', '.join(given)} applies only with quantize='nf4'; pass quantize='nf4' "
                             "or leave the NF4 settings at their defaults")
    return names
