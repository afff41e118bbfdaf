"""Planned peaks of a LoRA / QLoRA training step for Llama-3.x 1B / 8B / 70B shapes (lora_engine/plan.py).

    python bench/plan_table.py            # writes bench/results/plan.md (and plan.json beside it)

Configs are the published config.json numbers (Llama-3.2-1B, Llama-3.1-8B, Llama-3.1-70B); r=16 on
all seven projections, batch 1, bf16, gradient checkpointing, --device cuda. Shapes only: no weights,
no GPU; each plan is two fake training steps (about 30 s for 8B on one CPU core).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lora_engine import plan as P  # noqa: E402
from lora_engine.models.config import ModelConfig  # noqa: E402

ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
COMMON = {"model_type": "llama", "vocab_size": 128256, "hidden_act": "silu", "rms_norm_eps": 1e-5,
          "max_position_embeddings": 131072, "torch_dtype": "bfloat16"}
MODELS = {
    "Llama-3.2-1B": {**COMMON, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "tie_word_embeddings": True, "rope_parameters": ROPE},
    "Llama-3.1-8B": {**COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "rope_parameters": {**ROPE, "factor": 8.0}},
    "Llama-3.1-70B": {**COMMON, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "rope_parameters": {**ROPE, "factor": 8.0}},
}
CONTEXTS = (2048, 8192, 32768, 131072)


def main():
    rows = []
    for name, hf in MODELS.items():
        mc = ModelConfig.from_hf(hf)
        for quantize in ("none", "nf4"):
            for n in CONTEXTS:
                cfg = P.PlanConfig(model=name, seq_len=n, quantize=quantize, r=16, precision="bf16", device="cuda",
                                   gradient_checkpointing=True)
                t0 = time.perf_counter()
                r = P.plan_step(cfg, mc)
                rows.append({"model": name, "method": "QLoRA" if quantize == "nf4" else "LoRA", **r,
                             "plan_seconds": round(time.perf_counter() - t0, 1)})
                print(name, quantize, n, f"{r['total_bytes'] / 2**30:.2f} GiB", flush=True)
    out = ROOT / "bench" / "results"
    (out / "plan.json").write_text(json.dumps(rows, indent=1))
    g = 2**30
    lines = ["| model | method | context | peak (GiB) | weights | adapters+AdamW | activations | transient | "
             "+ CUDA overhead = total (GiB) | TFLOPs/step |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['seq_len']:,} | {r['peak_bytes'] / g:.2f} | "
                     f"{r['weights'] / g:.2f} | {r['adapters_and_optimizer'] / g:.2f} | {r['activations'] / g:.2f} | "
                     f"{r['transient'] / g:.2f} | {r['total_bytes'] / g:.2f} | {r['flops'] / 1e12:.0f} |")
    (out / "plan_table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
