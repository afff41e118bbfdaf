"""NF4 checkpoints in the layout transformers + bitsandbytes save: load (as stored, or quantizing a
full-precision checkpoint while it is read) and save. Keys and quant-state format: kernels/nf4_format.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lora_engine.io.atomic import Owned, atomic_dir, write_json
from lora_engine.io.safetensors import CheckpointError, StoredTensor, dtype_name, save_tensors
from lora_engine.kernels.nf4_format import QUANT_STATE_KEY, NF4Tensor, from_bnb_state_dict
from lora_engine.models import gpt_oss
from lora_engine.models.builder import Checkpoint, build_model, load_weights, open_checkpoint, tied_keys
from lora_engine.quant import nf4_experts
from lora_engine.quant.nf4 import DEFAULT_SKIP, Linear4bit, _skipped, memory_report, quantize

__all__ = ["load_quantized_model", "save_quantized", "transformers_quantization_config"]
QUANTIZE_METHODS = (None, "nf4")  # load_model's `quantize` values
_QS_SUFFIX = ".weight." + QUANT_STATE_KEY
# What save_quantized writes: an existing folder holding anything else is not replaced.
NF4_FILES = Owned("an NF4 model folder", ("config.json", "model.safetensors"), marker="config.json")

logger = logging.getLogger(__name__)


def _check_bnb_config(qc, where) -> None:
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise CheckpointError(f"{where}: quantization_config {qc!r} is not a bitsandbytes 4-bit config; only NF4 "
                              "checkpoints (load_in_4bit, bnb_4bit_quant_type='nf4') load directly")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise CheckpointError(f"{where}: bnb_4bit_quant_type is {qc.get('bnb_4bit_quant_type')!r}; only 'nf4' is "
                              "supported (fp4 is not)")
    if qc.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise CheckpointError(f"{where}: bnb_4bit_quant_storage {qc['bnb_4bit_quant_storage']!r} is not supported; "
                              "save with the default uint8 storage")


def load_quantized_model(path, dtype=None, device="cpu", quantize: str | None = None, quantize_skip=DEFAULT_SKIP,
                         blocksize: int = 64, double_quant: bool = True, verbose: bool = True):
    """Load a CausalLM with NF4 linear layers, tensor by tensor.

    A checkpoint whose config.json has a bitsandbytes `quantization_config` (transformers + bnb
    save_pretrained) loads as stored. A full-precision checkpoint with quantize="nf4" is quantized
    while it is read: each weight is read, cast to `dtype`, quantized and dropped, so peak memory is
    the quantized model plus one full-precision tensor. quantize_skip: module names kept in full
    precision (default: lm_head; embeddings and norms are never quantized). blocksize/double_quant:
    the NF4 settings for quantize="nf4". Logs (INFO) the measured bits per quantized parameter unless verbose=False.
    """
    if quantize not in QUANTIZE_METHODS:
        raise ValueError(f"load_model: quantize={quantize!r} is not supported; use quantize='nf4' or None")
    if isinstance(quantize_skip, str):
        quantize_skip = (quantize_skip,)
    return load_nf4(open_checkpoint(path), dtype, device, quantize, quantize_skip, blocksize, double_quant, verbose,
                    name_or_path=path)


def load_nf4(ckpt: Checkpoint, dtype, device, quantize, quantize_skip, blocksize, double_quant, verbose,
             name_or_path=None):
    """load_quantized_model on an opened checkpoint, its arguments already checked (load_model's path)."""
    # gpt-oss's MXFP4 experts are not NF4 bytes: read dequantized, then quantized (models/gpt_oss.py read_mxfp4)
    qc = None if gpt_oss.is_mxfp4(ckpt.config.extra) else ckpt.quantization_config
    if qc is not None:
        _check_bnb_config(qc, ckpt.config_file)
    elif quantize is None:
        raise ValueError(f"load_quantized_model: {ckpt.folder} is not quantized; pass quantize='nf4' to quantize it")
    stored = {k[: -len(_QS_SUFFIX)] for k in ckpt.shapes if k.endswith(_QS_SUFFIX)}
    if stored and ckpt.config.num_experts:
        raise CheckpointError(f"{ckpt.config_file}: a mixture-of-experts checkpoint saved in NF4 does not load yet; "
                              "load its full-precision checkpoint with quantize='nf4'")
    dt = ckpt.dtype(dtype)
    swap = _NF4Shells(stored, quantize_skip)
    model = build_model(ckpt.config, dt, device, swaps=[swap], checkpoint=ckpt)
    _fill(model, ckpt, swap, stored, dt, device, blocksize, double_quant, name_or_path)
    if verbose:
        r = memory_report(model)
        logger.info(f"NF4: {len(swap.targets)} linear layers, {r['quantized_params']:,} parameters in "
                    f"{r['quantized_bytes']:,} bytes = {r['bits_per_param']:.3f} bits/param; "
                    f"{r['other_bytes']:,} bytes in {dt} elsewhere")
    return model


class _NF4Shells:
    """The builder's swap for NF4: every nn.Linear of the meta model that the checkpoint stores in NF4 (or,
    quantizing a full-precision checkpoint, that `skip` does not name) becomes an empty Linear4bit, so its
    full-precision weight is never allocated; the loader fills `targets` ({module path: Linear4bit})."""

    def __init__(self, stored: set[str], skip):
        self.stored, self.skip = stored, skip
        self.targets: dict[str, Linear4bit] = {}
        self.experts: dict = {}

    def __call__(self, model: nn.Module) -> None:
        tied, routers = tied_keys(model.config), nf4_experts.routers(model)
        self.experts = nf4_experts.empty_experts(model)  # filled slice by slice by the loader
        for name, m in list(model.named_modules()):
            if not isinstance(m, nn.Linear) or name + ".weight" in tied or name in routers:
                continue
            if name in self.stored or (not self.stored and not _skipped(name, self.skip)):
                self.targets[name] = Linear4bit(None, m.bias, m.in_features, m.out_features)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, self.targets[name])


def _fill(model, ckpt, swap, stored, dt, device, blocksize, double_quant, name_or_path) -> None:
    """Read every checkpoint tensor into `model` through the strict loader, with an NF4 hook: stored NF4
    parts are collected and assembled at the end; full-precision weights of the swap's targets (and of its
    MoE experts, slice by slice: quant/nf4_experts.py) are quantized as they are read, the full-precision
    tensor dropped before the next is read."""
    targets, placeholders = swap.targets, {}
    if not stored:  # shape-only placeholders, so the loader checks their shapes and reports them missing
        placeholders = {path + ".weight": torch.empty(mod.out_features, mod.in_features, device="meta")
                        for path, mod in targets.items()}
    more, expert_hook, expert_finish = nf4_experts.loading_hook(
        model.config.model_type, swap.experts, set(ckpt.shapes),
        lambda w: quantize(w.to(device=device, dtype=dt), blocksize, double_quant))
    placeholders.update(more)
    parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in targets}
    where: dict[str, Path] = {}

    def hook(t: StoredTensor) -> bool:
        if expert_hook(t):
            return True
        path, _, rest = t.name.partition(".weight")
        if path not in targets or rest[:1] not in ("", "."):
            return False
        if stored:
            parts[path][t.name] = t.read()
            if not rest or path not in where:
                where[path] = t.file
            return True
        if rest:
            return False  # a full-precision layer has only .weight: anything else is unexpected
        w = t.read()
        targets[path].weight = quantize(w.to(device=device, dtype=dt), blocksize, double_quant)
        del w  # the full-precision tensor is gone before the next one is read
        return True

    hook.put_expert = expert_hook.put_expert  # MXFP4 experts come dequantized from gpt_oss.read_mxfp4's hook

    def assemble() -> list[str]:
        problems = expert_finish()
        for path, sd in parts.items() if stored else ():
            mod, file = targets[path], str(where.get(path, ckpt.folder))
            try:
                w = from_bnb_state_dict(sd, path + ".", file)
            except ValueError as e:
                problems.append(str(e))
                continue
            if w.shape != (mod.out_features, mod.in_features):
                problems.append(f"{file}: {path}.weight is an NF4 weight of shape {w.shape}, the model's {path} is "
                                f"({mod.out_features}, {mod.in_features})")
                continue
            mod.weight = w.to(device)
        return problems

    load_weights(model, ckpt, hook, finish=assemble, placeholders=placeholders, name_or_path=name_or_path)


def transformers_quantization_config(model: nn.Module) -> dict:
    """The `quantization_config` transformers 5 writes for BitsAndBytesConfig(load_in_4bit, nf4, ...)."""
    ws = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), NF4Tensor)]
    if not ws:
        raise ValueError("save_quantized: the model has no NF4 weights; quantize it first (quantize_model)")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    skip = sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear)}) or None
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": dtype_name(dtype),
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": any(w.is_nested for w in ws), "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


def save_quantized(model: nn.Module, folder) -> Path:
    """Write `folder`/model.safetensors (bitsandbytes keys for NF4 weights) and config.json with the
    quantization_config, in the layout transformers + bitsandbytes load; returns the folder.

    The folder is built under a temporary name and swapped into place (io/atomic.atomic_dir), the weights
    one tensor at a time. An existing `folder` is replaced only if it is empty or holds nothing but these
    two files (NF4_FILES): a run folder, or a model folder with a tokenizer beside the weights, is refused
    with OutputError before any work."""
    folder = Path(folder)
    qc = transformers_quantization_config(model)
    sd = model.state_dict()
    for k in tied_keys(model.config):
        sd.pop(k, None)  # transformers re-ties it
    config = dict(model.config.extra) if model.config.extra else model.config.to_hf()
    config["quantization_config"] = qc
    with atomic_dir(folder, NF4_FILES) as tmp:
        save_tensors(tmp / "model.safetensors", sd, metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
    return folder
