"""Planned peaks of a LoRA / QLoRA training step for Llama-3.x 1B / 8B / 70B shapes (lora_engine/plan.py).

    python bench/plan_table.py            # writes bench/results/plan_table.md (and plan.json beside it)
    python bench/plan_table.py --long     # only the long-context rows: plan_long_table.md, plan_long.json
    python bench/plan_table.py --short    # only the 4k-in-6-GiB row (every memory option): plan_short_table.md
    python bench/plan_table.py --fsdp     # per-rank QLoRA under FSDP (8B on 2, 70B on 2 and 8): plan_fsdp_table.md
    python bench/plan_table.py --qwen35   # Qwen3.5-9B / 27B QLoRA at long context: plan_qwen35_table.md
    python bench/plan_table.py --moe      # QLoRA on Qwen3-30B-A3B and gpt-oss-20b: plan_moe_table.md

Configs are the published config.json numbers (Llama-3.2-1B, Llama-3.1-8B, Llama-3.1-70B); r=16 on
all seven projections, batch 1, bf16, gradient checkpointing, --device cuda. Shapes only: no weights,
no GPU; each plan is two fake training steps (about 30 s for 8B on one CPU core).
The long-context rows (Llama-3.1-8B QLoRA) add what issue 11 item 4 built: each layer's checkpointed
input offloaded to CPU memory and the MLP run 4,096 tokens at a time (LONG below).
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
# Qwen3.5 (qwen3_5_text: the text model of the released checkpoints), the published config.json numbers:
# three Gated DeltaNet layers to one gated full-attention layer; 16 key heads and 32 (9B) or 48 (27B) value
# heads of 128 in the DeltaNet; partial RoPE over a quarter of each 256-dim head.
QWEN35_COMMON = {"model_type": "qwen3_5_text", "vocab_size": 248320, "head_dim": 256, "num_key_value_heads": 4,
                 "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
                 "linear_value_head_dim": 128, "linear_num_key_heads": 16, "rms_norm_eps": 1e-6,
                 "max_position_embeddings": 262144, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
                 "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25}}
QWEN35 = {
    "Qwen3.5-9B": {**QWEN35_COMMON, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
                   "num_attention_heads": 16, "linear_num_value_heads": 32},
    "Qwen3.5-27B": {**QWEN35_COMMON, "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 64,
                    "num_attention_heads": 24, "linear_num_value_heads": 48},
}
# The projections PEFT targets for the family: attention's, the DeltaNet's input/output, the MLP's.
QWEN35_TARGETS = "q_proj,k_proj,v_proj,o_proj,in_proj_qkv,in_proj_z,out_proj,gate_proj,up_proj,down_proj"
QWEN35_CONTEXTS = {"Qwen3.5-9B": (32768, 131072), "Qwen3.5-27B": (32768,)}
CONTEXTS = (2048, 8192, 32768, 131072)
LONG = {"offload_activations": True, "mlp_chunk_size": 4096}
LONG_CONTEXTS = (4096, 32768, 100000, 131072)
# 4,096 tokens within 6 GiB: besides LONG, the frozen embedding and head in CPU memory (the head copied to
# the GPU for the loss only), the loss 256 tokens at a time and the MLP 1,024 (models/decoder.py).
SHORT = {**LONG, "mlp_chunk_size": 1024, "loss_chunk_size": 256, "embedding_on_cpu": True, "head_on_cpu": True}


# Per rank under FSDP (lora_engine.plan --world-size N --distributed fsdp), at Answer.AI's FSDP+QLoRA setting:
# 2,048 tokens, batch 2 per GPU, gradient checkpointing (they add CPU offload of parameters; we do not).
FSDP = (("Llama-3.1-8B", 2), ("Llama-3.1-70B", 2), ("Llama-3.1-70B", 8))

# Mixture-of-experts QLoRA (issue 30): the published config.json numbers of Qwen3-30B-A3B and gpt-oss-20b (its
# alternating 128-token sliding window, sinks, biases, YaRN; MXFP4 experts quantized to NF4 on load).
# LoRA on q/k/v/o and, with MOE_LORA, on every expert's gate_up_proj and down_proj (PEFT's target_parameters).
MOE_COMMON = {"model_type": "qwen3_moe", "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": False, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
              "torch_dtype": "bfloat16"}
MOE_MODELS = {
    "Qwen3-30B-A3B": {**MOE_COMMON, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8,
                      "max_position_embeddings": 40960},
    "gpt-oss-20b": {"model_type": "gpt_oss", "attention_bias": True, "head_dim": 64, "hidden_act": "silu",
                    "hidden_size": 2880, "initial_context_length": 4096, "intermediate_size": 2880,
                    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
                    "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
                    "num_key_value_heads": 8, "num_local_experts": 32, "rms_norm_eps": 1e-5,
                    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                     "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
                    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
                    "tie_word_embeddings": False, "vocab_size": 201088, "torch_dtype": "bfloat16"},
}
ATTENTION_LORA = {"target_modules": "q_proj,k_proj,v_proj,o_proj"}
MOE_LORA = {**ATTENTION_LORA, "target_parameters": "mlp.experts.gate_up_proj,mlp.experts.down_proj"}
OFFLOAD, ON_CPU = {"offload_activations": True}, {"embedding_on_cpu": True, "head_on_cpu": True}
# (model, tokens, r, LoRA targets, memory options, the layer counts planned)
MOE_ROWS = (("Qwen3-30B-A3B", 2048, 16, MOE_LORA, {}, (2, 3, 4)),
            ("Qwen3-30B-A3B", 16384, 16, MOE_LORA, OFFLOAD, (2, 3)),
            ("Qwen3-30B-A3B", 16384, 4, MOE_LORA, OFFLOAD, (2, 3, 4)),
            ("gpt-oss-20b", 2048, 8, MOE_LORA, {}, (2, 4)),
            ("gpt-oss-20b", 2048, 8, MOE_LORA, ON_CPU, (2, 4, 6)),
            ("gpt-oss-20b", 2048, 8, ATTENTION_LORA, ON_CPU, (2, 4)),
            ("gpt-oss-20b", 2048, 8, ATTENTION_LORA, {**ON_CPU, "loss_chunk_size": 256}, (2, 4)),
            ("gpt-oss-20b", 2048, 8, ATTENTION_LORA, {**ON_CPU, "loss_chunk_size": 256, **OFFLOAD}, (2, 4)))
PARTS = ("peak_bytes", "weights", "adapters_and_optimizer", "activations", "transient", "offloaded_bytes", "flops")


def _moe_row(name, n, r, lora, options, layers):
    """The row of the whole model from plans of its first few layers: every layer is the same, so each part of the
    peak is affine in the layer count (the peak falls at the same op of the first layer's backward); the two
    largest counts give the line, a third (when given) checks it to the byte. Planning all 48 layers of
    Qwen3-30B-A3B is ~16x the 3-layer plan's time (its 128 NF4 experts per layer run one by one on fake tensors)."""
    hf = MOE_MODELS[name]
    got = {}
    for L in layers:
        cfg = P.PlanConfig(model=name, seq_len=n, quantize="nf4", r=r, precision="bf16", device="cuda",
                           gradient_checkpointing=True, **lora, **options)
        got[L] = P.plan_step(cfg, ModelConfig.from_hf({**hf, "num_hidden_layers": L,
                                                       **({"layer_types": hf["layer_types"][:L]}
                                                          if "layer_types" in hf else {})}))
    a, b = sorted(layers)[-2:]
    full = hf["num_hidden_layers"]
    row = {k: got[b][k] + (got[b][k] - got[a][k]) // (b - a) * (full - b) for k in PARTS}
    if len(layers) > 2:  # the line through a and b, at the smallest count: its error in bytes
        c = sorted(layers)[0]
        slope = (got[b]["peak_bytes"] - got[a]["peak_bytes"]) // (b - a)
        row["check_bytes"] = got[c]["peak_bytes"] - (got[b]["peak_bytes"] - slope * (b - c))
    targets = "attention + experts" if "target_parameters" in lora else "attention"
    flags = "".join(f", --{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in options.items())
    row.update(model=name, seq_len=n, method=f"QLoRA r={r}, {targets}{flags}",
               peak_phase=got[b]["peak_phase"], host_weight_bytes=got[b]["host_weight_bytes"],
               layers_planned=list(layers), total_bytes=row["peak_bytes"] + P.cuda_overhead(row["peak_bytes"]))
    print(name, row["method"], n, f"{row['total_bytes'] / 2**30:.2f} GiB", flush=True)
    return row


def _row(name, hf, quantize, n, method, batch_size=1, **options):
    cfg = P.PlanConfig(model=name, seq_len=n, batch_size=batch_size, quantize=quantize, r=16, precision="bf16",
                       device="cuda", gradient_checkpointing=True, **options)
    t0 = time.perf_counter()
    r = P.plan_step(cfg, ModelConfig.from_hf(hf))
    print(name, method, n, f"{r['total_bytes'] / 2**30:.2f} GiB", flush=True)
    return {"model": name, "method": method + (f", {r['world_size']} x {r['strategy']}" if r["world_size"] > 1 else ""),
            **r, "plan_seconds": round(time.perf_counter() - t0, 1)}


def write(rows, stem):
    out = ROOT / "bench" / "results"
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    g = 2**30
    lines = ["| model | method | context | peak (GiB) | weights | adapters+AdamW | activations | transient | "
             "+ CUDA overhead = total (GiB) | offloaded to CPU (GiB) | TFLOPs/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['seq_len']:,} | {r['peak_bytes'] / g:.2f} | "
                     f"{r['weights'] / g:.2f} | {r['adapters_and_optimizer'] / g:.2f} | {r['activations'] / g:.2f} | "
                     f"{r['transient'] / g:.2f} | {r['total_bytes'] / g:.2f} | {r.get('offloaded_bytes', 0) / g:.2f} | "
                     f"{r['flops'] / 1e12:.0f} |")
        if r.get("host_weight_bytes"):
            lines[-1] += f" host weights {r['host_weight_bytes'] / g:.2f} GiB |"
    (out / f"{stem}_table.md").write_text("\n".join(lines) + "\n")


def main(argv):
    if "--moe" in argv:
        write([_moe_row(*row) for row in MOE_ROWS], "plan_moe")
        return
    if "--fsdp" in argv:
        write([_row(name, MODELS[name], "nf4", 2048, "QLoRA", batch_size=2, world_size=n, distributed="fsdp")
               for name, n in FSDP], "plan_fsdp")
        return
    if "--qwen35" in argv:
        write([_row(name, QWEN35[name], "nf4", n, "QLoRA, offload + MLP chunks", target_modules=QWEN35_TARGETS,
                    **LONG) for name in QWEN35 for n in QWEN35_CONTEXTS[name]], "plan_qwen35")
        return
    if "--short" in argv:
        write([_row("Llama-3.1-8B", MODELS["Llama-3.1-8B"], "nf4", 4096, "QLoRA, every memory option", **SHORT)],
              "plan_short")
        return
    if "--long" not in argv:
        write([_row(name, hf, q, n, "QLoRA" if q == "nf4" else "LoRA")
               for name, hf in MODELS.items() for q in ("none", "nf4") for n in CONTEXTS], "plan")
    write([_row("Llama-3.1-8B", MODELS["Llama-3.1-8B"], "nf4", n, "QLoRA, offload + MLP chunks", **LONG)
           for n in LONG_CONTEXTS], "plan_long")


if __name__ == "__main__":
    main(sys.argv[1:])
