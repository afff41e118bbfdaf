"""Trainable LoRA parameters and their training memory, per target set and rank.

For each target set (attention q/k/v/o, q/v only, all seven projections) and rank (8, 16, 64) we
count the adapter parameters of the embedded model (SmolLM2-135M) and the memory they need while
training: fp32 parameters (4 B), fp32 gradients (4 B) and AdamW's two fp32 moments (8 B).

The counts come from the real code path without any weights: the model is built on the meta
device and apply_lora puts the adapters on it, and each count is checked against the closed form
sum over targeted layers of r * (in + out) before it is reported. The config is read from the
GGUF header of the embedded package (no conversion), or from --model PATH (a config.json folder).

    python bench/lora_params.py [--model PATH] [--ranks 8 16 64]

Prints a markdown table and writes it to bench/results/lora_params.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine  # noqa: E402

from lora_engine import LoraConfig, ModelConfig, apply_lora  # noqa: E402
from lora_engine.lora.layers import count_parameters  # noqa: E402
from lora_engine.models.decoder import CausalLM  # noqa: E402

TARGET_SETS = {
    "q, v": ("q_proj", "v_proj"),
    "attention (q, k, v, o)": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all seven projections": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
BYTES = {"params": 4, "grads": 4, "adamw": 8}  # fp32 weights, fp32 grads, AdamW exp_avg + exp_avg_sq
OUT = Path(__file__).resolve().parent / "results" / "lora_params.md"


def embedded_config(name: str = "smollm2-135m-instruct") -> ModelConfig:
    """The embedded model's config from its GGUF header alone (the tensors are never read)."""
    from lora_engine.sources.embedded import gguf_path
    from lora_engine.sources.gguf import GGUFFile, hf_config

    return ModelConfig.from_hf(hf_config(GGUFFile(gguf_path(name)), name_or_path=name))


def shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one layer."""
    D, F, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": (D, q), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (q, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


def closed_form(cfg: ModelConfig, targets, r: int) -> int:
    return cfg.num_hidden_layers * sum(r * sum(shapes(cfg)[t]) for t in targets)


def measure(cfg: ModelConfig, targets, r: int) -> dict[str, int]:
    with torch.device("meta"):
        model = CausalLM(cfg)
        apply_lora(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), verbose=False)
        counts = count_parameters(model)
    want = closed_form(cfg, targets, r)
    if counts["trainable"] != want:
        raise RuntimeError(f"apply_lora made {counts['trainable']} trainable parameters, the closed form says {want}")
    return counts


def table(cfg: ModelConfig, ranks) -> list[str]:
    mib = 2**20
    rows = ["| targets | r | trainable params | % of model | fp32 params MiB | + grads MiB | + AdamW MiB | total MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, targets in TARGET_SETS.items():
        for r in ranks:
            c = measure(cfg, targets, r)
            n = c["trainable"]
            p, g, a = (n * BYTES[k] / mib for k in ("params", "grads", "adamw"))
            rows.append(f"| {label} | {r} | {n:,} | {100 * n / (c['total'] - n):.2f} | {p:.2f} | {g:.2f} | "
                        f"{a:.2f} | {p + g + a:.2f} |")
    return rows


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a Hugging Face folder (config.json); default: the embedded model")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 64])
    args = ap.parse_args(argv)
    cfg = ModelConfig.from_hf(args.model) if args.model else embedded_config()
    name = args.model or "smollm2-135m-instruct (embedded)"
    lines = [f"# LoRA trainable parameters: {name}", "",
             f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, FFN {cfg.intermediate_size}, "
             f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads of {cfg.head_dim}. Memory while "
             "training = fp32 adapters + fp32 gradients + AdamW's two fp32 moments (16 bytes per parameter); "
             "activations and the frozen base are not included.", "", *table(cfg, args.ranks), "",
             *header_lines(machine()), ""]
    text = "\n".join(lines)
    print(text)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    from lora_engine.io.atomic import write_text

    write_text(OUT, text)
    return text


if __name__ == "__main__":
    main()
