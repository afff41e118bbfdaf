"""save_model: the model as a Hugging Face folder that transformers loads, LoRA merged in or not.

    python -m lora_engine.export --model PATH --adapter DIR --out DIR [--dtype bfloat16]
    python -m lora_engine.export --model PATH --adapter DIR --gguf OUT.gguf [--gguf-type q8_0]
    python -m lora_engine.export --model NF4_OR_16BIT --adapter QLORA --merge-into dequantized --out DIR
    python -m lora_engine.export --model NF4 --adapter QLORA --base PATH_16BIT --gguf OUT.gguf

--gguf writes one GGUF file for llama.cpp / Ollama and an Ollama Modelfile beside it
(lora_engine/deploy/gguf.py). A QLoRA adapter is merged into full-precision weights, never into
4 bits: --merge-into dequantized or --base PATH_16BIT (lora_engine/deploy/qlora.py says which to
pick when).

The folder holds config.json (the original config.json, kept in model.config.extra, with the dtype
updated; ModelConfig.to_hf() when there is none), the weights as safetensors, streamed one tensor at
a time (one `model.safetensors`, or shards of at most `max_shard_size` bytes plus
`model.safetensors.index.json`, named as transformers names them) and the tokenizer and generation
files of the folder the model was loaded from (`model.source_dir`).

With merge=True each LoRA layer's weight is written as W + s * B @ A, computed in fp32 per tensor
and cast once to the output dtype; the model in memory is not changed. The folder is built under a
temporary name and renamed into place (lora_engine.io.atomic.atomic_dir), so an interrupted export
never leaves a half-written model under the final name. An existing folder is replaced only if it
holds nothing but the files an export writes (MODEL_FILES) and is not the folder the model was read
from: a run folder, a data folder or the base model itself is refused, with exit status 2.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from lora_engine.cli import DTYPES as DTYPE_NAMES
from lora_engine.cli import TORCH_NAMES, logs_to, option, parse_dtype, parse_size
from lora_engine.io.atomic import OutputError, Owned, atomic_dir, check_dir_replaceable, copy_file, write_json
from lora_engine.io.safetensors import FLOAT_DTYPES, dtype_name, float_dtype, write_safetensors
from lora_engine.lora import experts
from lora_engine.lora.layers import LoraLinear, lora_layers
from lora_engine.models import gpt_oss, hybrid
from lora_engine.models.families import fused_groups
from lora_engine.models.moe import checkpoint_views
from lora_engine.sources.gguf_write import GGUF_TYPES

# Files of a Hugging Face folder, besides config and weights, that a user of the export needs.
CARRIED_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                 "generation_config.json", "chat_template*")
DTYPES = FLOAT_DTYPES
# Everything save_model writes: an existing folder holding only these (and config.json) may be replaced.
MODEL_FILES = Owned("a model folder", ("config.json", "model.safetensors", "model-*-of-*.safetensors",
                                       "model.safetensors.index.json", *CARRIED_FILES), marker="config.json")


def save_model(model: nn.Module, folder: str | os.PathLike, merge: bool = False, dtype: torch.dtype | str | None = None,
               max_shard_size: int | str = "5GB") -> Path:
    """Write `model` as a Hugging Face model folder; returns the folder.

    merge: write W + s * B @ A for the LoRA layers (the in-memory model is left as it was); without
    it the base weights are written and a warning reminds you to save the adapter as well.
    dtype: the weights' dtype on disk (torch dtype or "bfloat16", ...); None keeps the model's.
    An existing `folder` is replaced only if it is empty or holds nothing but what save_model writes
    (MODEL_FILES), and is not the folder the model was loaded from; else OutputError, before any work.
    """
    folder = Path(folder)
    out_dtype = _out_dtype(model, dtype)
    limit = parse_size(max_shard_size, "max_shard_size")
    layers = dict(lora_layers(model))
    merged = [p for p, m in layers.items() if m.merged]
    if merged and not merge:
        raise ValueError(
            f"save_model: the LoRA of {merged[0]} (and {len(merged) - 1} more) is merged into the weights in "
            "memory, so merge=False cannot write the base weights; call unmerge_lora(model) first, or pass merge=True"
        )
    if (layers or experts.adapter_keys(model, "")) and not merge:
        warnings.warn(
            f"save_model: writing the base weights only; the LoRA of {len(layers)} layers is not in {folder}. "
            "Save it too with save_adapter(model, dir), or export with merge=True", stacklevel=2)
    check_out(folder, model)
    # references to the parameters, no copies; MoE experts as views of each expert's 2-D weights, the
    # layout transformers' save_pretrained writes
    state = checkpoint_views(model.config.model_type, model.state_dict())
    deltas = experts.merged_deltas(model) if merge else {}  # W_e + s B_e A_e, per stored expert tensor
    # checkpoint key -> the state-dict keys it holds: fused again where the family stores them fused (Phi-3)
    groups = dict(fused_groups(model.config.model_type, _tensor_names(model, state)))
    shards = _plan_shards(state, groups, out_dtype, limit)
    # Keys as the family stores them (Qwen3.5's multimodal layout); the tensors the model only carried
    # (MTP heads, a vision tower: models/hybrid.py) copied as read, in the last shard.
    stored = {n: hybrid.checkpoint_name(model.config.model_type, n) for n in groups}
    own = {key: name for name, key in stored.items()}
    carried = getattr(model, "carried_tensors", {})
    shards[-1] += sorted(carried)
    with atomic_dir(folder, MODEL_FILES) as tmp:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            file = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            layout = {stored.get(name, name): (carried[name].dtype, carried[name].shape) if name in carried else
                      _export_layout([state[n] for n in groups[name]], out_dtype) for name in shard}
            total += write_safetensors(tmp / file, layout, lambda key: carried[key].read() if key in carried else
                                       _export_group(state, layers, groups[own[key]], out_dtype, merge, deltas),
                                       metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(layout, file))
        if len(shards) > 1:
            write_json(tmp / "model.safetensors.index.json",
                       {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        write_json(tmp / "config.json", _hf_config(model.config, out_dtype))
        _carry_files(getattr(model, "source_dir", None), tmp)
    return folder


def check_out(folder: str | os.PathLike, model: nn.Module | None = None) -> None:
    """Raise OutputError unless save_model may write `folder`: absent, empty, or an earlier export
    (MODEL_FILES only), and not the folder `model` was loaded from (its base would be overwritten)."""
    folder = Path(folder)
    source = getattr(model, "source_dir", None)
    if source and folder.exists() and folder.resolve() == Path(source).resolve():
        raise OutputError(f"{folder} is the folder the model was loaded from; writing there would replace the base "
                          "model: choose another output folder")
    check_dir_replaceable(folder, MODEL_FILES)


def _out_dtype(model: nn.Module, dtype) -> torch.dtype:
    if dtype is None:
        return next(p.dtype for n, p in model.named_parameters() if not n.endswith(("lora_A", "lora_B")))
    try:
        return float_dtype(dtype, choices=DTYPES.values())
    except ValueError as e:
        raise ValueError(f"save_model: {e} (or None for the model's)") from None


def _tensor_names(model: nn.Module, state: dict) -> list[str]:
    """The checkpoint keys: the state dict without adapters and without a tied head (transformers re-ties it)."""
    skip_head = getattr(model.config, "tie_word_embeddings", False)
    return [n for n in state
            if not n.endswith((".lora_A", ".lora_B")) and not (skip_head and n == "lm_head.weight")]


def _plan_shards(state: dict, groups: dict[str, tuple[str, ...]], dtype: torch.dtype, limit: int) -> list[list[str]]:
    """Greedy in key order, like transformers: a shard closes before it would pass `limit` bytes."""
    shards, size = [[]], 0
    for name, parts in groups.items():
        n = sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                for t in (state[p] for p in parts))
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _export_layout(parts: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.dtype, tuple[int, ...]]:
    """The stored tensor's (dtype, shape): one tensor, or several concatenated along dim 0 (fused)."""
    t = parts[0]
    return (dtype if t.is_floating_point() else t.dtype), (sum(p.shape[0] for p in parts), *t.shape[1:])


def _export_tensor(state: dict, layers: dict[str, LoraLinear], name: str, dtype: torch.dtype,
                   merge: bool, deltas: dict) -> torch.Tensor:
    module_path, _, leaf = name.rpartition(".")
    t = state[name].detach()
    if merge and leaf == "weight" and module_path in layers and not layers[module_path].merged:
        t = t.float() + layers[module_path].delta_weight()  # fp32 sum, one rounding on the cast below
    elif name in deltas:
        t = t.float() + deltas[name]()
    if t.is_floating_point():
        t = t.to(dtype)
    return t.cpu().contiguous()


def _export_group(state: dict, layers: dict[str, LoraLinear], parts: tuple[str, ...], dtype: torch.dtype,
                  merge: bool, deltas: dict) -> torch.Tensor:
    tensors = [_export_tensor(state, layers, n, dtype, merge, deltas) for n in parts]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _hf_config(cfg, dtype: torch.dtype) -> dict:
    """The original config.json with the dtype updated, or one built from ModelConfig if there is none."""
    name = dtype_name(dtype)
    out = dict(cfg.extra) if cfg.extra else cfg.to_hf()
    if gpt_oss.is_mxfp4(out):  # the experts were read dequantized and are written so
        del out["quantization_config"]
    out["dtype"] = name
    if "torch_dtype" in out:  # files from transformers < 5 carry this key; keep both in step
        out["torch_dtype"] = name
    return out


def _carry_files(source: str | None, dest: Path) -> list[str]:
    if not source or not Path(source).is_dir():
        return []
    copied = []
    for pattern in CARRIED_FILES:
        for f in sorted(Path(source).glob(pattern)):
            if f.is_file() and not (dest / f.name).exists():
                copy_file(f, dest / f.name)  # the usual mode, not the source's
                copied.append(f.name)
    return copied


# ---- command line --------------------------------------------------------------------------------
_GGUF_NAMES = {"fp32": "f32", "fp16": "f16"}  # --gguf-type's short dtype names in GGUF's spelling


@dataclasses.dataclass
class ExportArgs:
    model: str | None = option(None, "base model folder or embedded name")
    adapter: str | None = option(None, "LoRA adapter folder (PEFT format)")
    out: str | None = option(None, "output folder")
    dtype: str | None = option(None, f"weights' dtype on disk: {', '.join(DTYPE_NAMES)} (default: the model's)")
    max_shard_size: str = option("5GB", "largest shard, e.g. 500MB")
    gguf: str | None = option(None, "also (or instead of --out) write this GGUF file for llama.cpp / Ollama, and a "
                                    "Modelfile beside it")
    gguf_type: str = option("f16", f"GGUF type of the weight matrices: {', '.join(GGUF_TYPES)}, fp32/fp16 as aliases "
                                   "of f32/f16 (norms stay f32)")
    merge_into: str | None = option(None, "QLoRA: merge into the dequantized NF4 weights training saw",
                                    choices=["dequantized"])
    base: str | None = option(None, "QLoRA: merge into this full-precision checkpoint, the one --model (NF4) was "
                                    "quantized from")
    registry: str | None = option(None, "the registry that registry:NAME@REF references in --model, --adapter and "
                                        "--base are read from (default: $LORA_ENGINE_REGISTRY, else "
                                        "~/.local/share/lora_engine/registry)")

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model is required")
        if not self.out and not self.gguf:
            raise ValueError("--out or --gguf is required: a Hugging Face folder, a GGUF file, or both")
        gguf_type = parse_dtype(self.gguf_type, "--gguf-type", GGUF_TYPES)
        self.gguf_type = _GGUF_NAMES.get(gguf_type, gguf_type)
        if self.merge_into not in (None, "dequantized"):
            raise ValueError(f"--merge-into must be 'dequantized', got {self.merge_into!r}")
        if self.merge_into and self.base:
            raise ValueError("--merge-into dequantized and --base are two different merges; pick one")
        if (self.merge_into or self.base) and not self.adapter:
            raise ValueError(f"--{'merge-into' if self.merge_into else 'base'} merges a QLoRA adapter: pass --adapter")
        if self.dtype is not None:
            self.dtype = parse_dtype(self.dtype, "--dtype")
        parse_size(self.max_shard_size, "--max-shard-size")


@logs_to("stdout")
def main(argv=None) -> Path:
    from lora_engine.cli import format_config, parse, user_input
    from lora_engine.loading import load_model
    from lora_engine.lora.adapter import load_adapter, read_adapter_config

    args, _ = parse(ExportArgs, argv, prog="python -m lora_engine.export",
                    description="Merge a LoRA adapter into its base model and write a Hugging Face folder.")
    print(format_config(args))
    if args.out:
        with user_input("--out"):
            check_out(args.out)  # before the model loads: a folder we may not replace costs nothing
    from lora_engine.registry import refs

    with user_input(""):
        args = refs.resolve_fields(args, ("model", "adapter", "base"), args.registry)
    if args.adapter:
        with user_input("--adapter"):
            read_adapter_config(args.adapter)  # a wrong folder is reported before the model loads
    if args.merge_into or args.base:
        from lora_engine.deploy import qlora

        with user_input("--base" if args.base else "--merge-into"):
            model = (qlora.load_onto_base(args.model, args.adapter, args.base) if args.base
                     else qlora.load_dequantized(args.model, args.adapter))
    else:
        with user_input("--model"):
            model = load_model(args.model)
        if args.adapter:
            with user_input("--adapter"):
                load_adapter(model, args.adapter)
    out = None
    if args.gguf:
        from lora_engine.deploy.gguf import save_gguf

        if args.out:
            with user_input("--out"):
                check_out(args.out, model)  # both outputs checked before either is written
        with user_input("--gguf"):
            out = save_gguf(model, args.gguf, args.gguf_type)
        print(f"wrote {out} and {out.with_name(out.stem + '.Modelfile')}")
    if args.out:
        with user_input("--out"):
            out = save_model(model, args.out, merge=True, dtype=TORCH_NAMES.get(args.dtype),
                             max_shard_size=args.max_shard_size)
        print(f"wrote {out}")
    return out


if __name__ == "__main__":
    import sys

    from lora_engine.cli import run_cli

    sys.exit(run_cli(main))
