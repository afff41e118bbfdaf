"""save_model: the model as a Hugging Face folder that transformers loads, LoRA merged in or not.

    python -m lora_engine.export --model PATH --adapter DIR --out DIR [--dtype bfloat16]

The folder holds config.json (the original config.json, kept in model.config.extra, with the dtype
updated), the weights as safetensors (one `model.safetensors`, or shards of at most
`max_shard_size` bytes plus `model.safetensors.index.json`, named as transformers names them) and
the tokenizer and generation files of the folder the model was loaded from (`model.source_dir`).

With merge=True each LoRA layer's weight is written as W + s * B @ A, computed in fp32 per tensor
and cast once to the output dtype; the model in memory is not changed. The folder is built under a
temporary name and renamed into place (lora_engine.io.atomic.atomic_dir), so an interrupted export
never leaves a half-written model under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from lora_engine.io.atomic import atomic_dir, usual_permissions
from lora_engine.lora.layers import LoraLinear, lora_layers

# Files of a Hugging Face folder, besides config and weights, that a user of the export needs.
CARRIED_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                 "generation_config.json", "chat_template*")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """5_000_000, "5MB" (10**6) or "5MiB" (2**20) -> bytes, with transformers' units."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)\s*", str(size).upper())
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"max_shard_size must be a positive byte count or a size like '500MB', got {size!r}")
    return int(float(m.group(1)) * UNITS[m.group(2)])


def save_model(model: nn.Module, folder: str | os.PathLike, merge: bool = False, dtype: torch.dtype | str | None = None,
               max_shard_size: int | str = "5GB") -> Path:
    """Write `model` as a Hugging Face model folder; returns the folder.

    merge: write W + s * B @ A for the LoRA layers (the in-memory model is left as it was); without
    it the base weights are written and a warning reminds you to save the adapter as well.
    dtype: the weights' dtype on disk (torch dtype or "bfloat16", ...); None keeps the model's.
    An existing `folder` is replaced only if it is empty or a model folder (has config.json).
    """
    folder = Path(folder)
    out_dtype = _out_dtype(model, dtype)
    limit = parse_size(max_shard_size)
    layers = dict(lora_layers(model))
    merged = [p for p, m in layers.items() if m.merged]
    if merged and not merge:
        raise ValueError(
            f"save_model: the LoRA of {merged[0]} (and {len(merged) - 1} more) is merged into the weights in "
            "memory, so merge=False cannot write the base weights; call unmerge_lora(model) first, or pass merge=True"
        )
    if layers and not merge:
        warnings.warn(
            f"save_model: writing the base weights only; the LoRA of {len(layers)} layers is not in {folder}. "
            "Save it too with save_adapter(model, dir), or export with merge=True", stacklevel=2)
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / "config.json").exists())):
        raise FileExistsError(
            f"save_model: {folder} exists and is not a model folder (no config.json); refusing to replace it. "
            "Pick a new or empty folder"
        )
    state = model.state_dict()  # references to the parameters, no copies
    names = _tensor_names(model, state)
    shards = _plan_shards(state, names, out_dtype, limit)
    with atomic_dir(folder) as tmp:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            tensors = {name: _export_tensor(state, layers, name, out_dtype, merge) for name in shard}
            save_file(tensors, tmp / file, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update(dict.fromkeys(shard, file))
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(_hf_config(model.config, out_dtype), indent=2) + "\n")
        _carry_files(getattr(model, "source_dir", None), tmp)
        for f in tmp.iterdir():  # copied tokenizer files keep their source's mode otherwise
            usual_permissions(f)
    return folder


def _out_dtype(model: nn.Module, dtype) -> torch.dtype:
    if dtype is None:
        return next(p.dtype for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B")))
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in DTYPES:
        return DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"save_model: dtype must be one of {', '.join(DTYPES)} (or None for the model's), got {dtype!r}")


def _tensor_names(model: nn.Module, state: dict) -> list[str]:
    """The checkpoint keys: the state dict without adapters and without a tied head (transformers re-ties it)."""
    skip_head = getattr(model.config, "tie_word_embeddings", False)
    return [n for n in state
            if not n.endswith((".lora_A", ".lora_B")) and not (skip_head and n == "lm_head.weight")]


def _plan_shards(state: dict, names: list[str], dtype: torch.dtype, limit: int) -> list[list[str]]:
    """Greedy in key order, like transformers: a shard closes before it would pass `limit` bytes."""
    shards, size = [[]], 0
    for name in names:
        t = state[name]
        n = t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _export_tensor(state: dict, layers: dict[str, LoraLinear], name: str, dtype: torch.dtype,
                   merge: bool) -> torch.Tensor:
    module_path, _, leaf = name.rpartition(".")
    t = state[name].detach()
    if merge and leaf == "weight" and module_path in layers and not layers[module_path].merged:
        t = t.float() + layers[module_path].delta_weight()  # fp32 sum, one rounding on the cast below
    if t.is_floating_point():
        t = t.to(dtype)
    return t.cpu().contiguous()


def _hf_config(cfg, dtype: torch.dtype) -> dict:
    """The original config.json with the dtype updated, or one built from ModelConfig if there is none."""
    name = str(dtype).replace("torch.", "")
    out = dict(cfg.extra) if cfg.extra else _config_from_fields(cfg)
    out["dtype"] = name
    if "torch_dtype" in out:  # files from transformers < 5 carry this key; keep both in step
        out["torch_dtype"] = name
    return out


def _config_from_fields(cfg) -> dict:
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **(cfg.rope_scaling or {})}
    return {
        "architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.qkv_bias if cfg.model_type != "qwen2" else False, "mlp_bias": cfg.mlp_bias,
    }


def _carry_files(source: str | None, dest: Path) -> list[str]:
    if not source or not Path(source).is_dir():
        return []
    copied = []
    for pattern in CARRIED_FILES:
        for f in sorted(Path(source).glob(pattern)):
            if f.is_file() and not (dest / f.name).exists():
                shutil.copy2(f, dest / f.name)
                copied.append(f.name)
    return copied


# ---- command line --------------------------------------------------------------------------------
@dataclasses.dataclass
class ExportArgs:
    model: str | None = dataclasses.field(default=None, metadata={"help": "base model folder or embedded name"})
    adapter: str | None = dataclasses.field(default=None, metadata={"help": "LoRA adapter folder (PEFT format)"})
    out: str | None = dataclasses.field(default=None, metadata={"help": "output folder"})
    dtype: str | None = dataclasses.field(default=None, metadata={
        "help": "weights' dtype on disk (default: the model's)", "choices": list(DTYPES)})
    max_shard_size: str = dataclasses.field(default="5GB", metadata={"help": "largest shard, e.g. 500MB"})

    def __post_init__(self):
        for name in ("model", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} is required")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        parse_size(self.max_shard_size)


def main(argv=None) -> Path:
    from lora_engine.cli import format_config, parse
    from lora_engine.loading import load_model
    from lora_engine.lora.adapter import load_adapter

    args, _ = parse(ExportArgs, argv, prog="python -m lora_engine.export",
                    description="Merge a LoRA adapter into its base model and write a Hugging Face folder.")
    print(format_config(args))
    model = load_model(args.model)
    if args.adapter:
        load_adapter(model, args.adapter)
    out = save_model(model, args.out, merge=True, dtype=args.dtype, max_shard_size=args.max_shard_size)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
