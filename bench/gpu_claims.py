"""The README's GPU claims, the bench/gpu_check.sh step that measures each, and the summary's Claims table.

    python bench/gpu_claims.py DIR [--dry-run]   # prints the Claims table and the rows of DIR

DIR holds gpu_steps.tsv (one line per step run: name, status) and gpu_rows.jsonl (gpu_common.Rows). A claim is
"measured" when its step ran on a GPU and wrote its row (or, for the steps that write their own tables, passed),
"failed: why" when its step or its row failed, and "planned" otherwise: no GPU run yet, or a dry run (whose
rows check the code at tiny shapes on a CPU and measure nothing).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine  # noqa: E402

# (claim id, the claim as the README states it, the step of bench/gpu_check.sh that measures it)
CLAIMS = (
    ("context-24g longest", "Llama-3.1-8B QLoRA at 131,072 tokens in 21.2 GiB (--gradient-checkpointing "
     "--offload-activations --mlp-chunk-size 4096): the longest context under a 24 GiB cap", "context-24g"),
    ("context-4k every memory option", "Llama-3.1-8B QLoRA at 4,096 tokens in 5.64 GiB with every memory option",
     "context-4k"),
    ("plan-vs-gpu", "the plan's peak against torch.cuda.max_memory_allocated of real 8B QLoRA steps", "plan-vs-gpu"),
    ("train-step SmolLM2-135M LoRA bf16", "SmolLM2-135M LoRA step: tokens/s and peak memory against "
     "transformers + PEFT, loss and gradient-norm parity", "train-step"),
    ("train-step SmolLM2-135M QLoRA NF4", "SmolLM2-135M QLoRA step against the QLoRA peer", "train-step"),
    ("train-step Llama-3.1-8B LoRA bf16", "Llama-3.1-8B LoRA step against transformers + PEFT", "train-step"),
    ("train-step Llama-3.1-8B QLoRA NF4", "Llama-3.1-8B QLoRA step against the QLoRA peer", "train-step"),
    ("kernels nf4 dequant", "NF4 dequantization GB/s as a fraction of the copy bandwidth", "gpu-kernels"),
    ("kernels fused lora", "fused LoRA forward+backward as a multiple of the base matmuls alone", "gpu-kernels"),
    ("moe grouped mm", "MoE grouped GEMM Triton vs reference: forward+backward at OLMoE-1B-7B shapes, time, "
     "TFLOP/s and relative error against the per-expert torch loop", "gpu-new-kernels"),
    ("delta rule", "delta rule Triton vs chunked torch: forward+backward at Qwen3.5 shapes, 4k and 16k tokens, "
     "time, peak memory and relative error", "gpu-new-kernels"),
    ("gpu-tests", "every Triton kernel equal to its reference at Llama-3-8B shapes, bf16 and fp16", "gpu-tests"),
    ("kernel-bench", "the Triton kernels' speed against their references and torch.compile", "kernel-bench"),
    ("nf4-triton-bench", "NF4 fused dequant+matmul against dequantize + cuBLAS, and its crossover",
     "nf4-triton-bench"),
)
STATUSES = ("measured", "planned", "failed")


# the steps that write gpu_rows.jsonl
ROW_STEPS = ("context-24g", "context-4k", "train-step", "gpu-kernels", "gpu-new-kernels")


def claim_status(claim: str, step: str, steps: dict, rows: list[dict], dry_run: bool) -> str:
    mine = [r["status"] for r in rows if r.get("claim") == claim]
    failed = [s for s in mine if s.startswith("failed")]
    if failed:
        return failed[0]
    if "measured" in mine:  # kept even when a time limit stopped the step later
        return "measured"
    if step in steps and steps[step] != "ok":
        return f"failed: step {step} {steps[step]}"
    if dry_run or step not in steps:
        return "planned"
    # a step that passed: the older steps write their own tables (passing is measuring); ours must write a row
    return "failed: no row written" if step in ROW_STEPS else "measured"


def summary(out_dir: Path, dry_run: bool) -> str:
    steps = {}
    if (out_dir / "gpu_steps.tsv").exists():
        for line in (out_dir / "gpu_steps.tsv").read_text().splitlines():
            name, _, status = line.partition("\t")
            steps[name] = status
    rows = []
    if (out_dir / "gpu_rows.jsonl").exists():
        rows = [json.loads(line) for line in (out_dir / "gpu_rows.jsonl").read_text().splitlines() if line.strip()]
    lines = ["## Machine", "", *header_lines(machine()), "", "## Claims", "", "Every GPU claim of README.md, the step that measures it, and where it stands"
             + (" (a dry run on CPU: nothing is measured, so every claim stays planned)" if dry_run else "") + ".", "",
             "| claim | README | step | status |", "|---|---|---|---|"]
    for claim, text, step in CLAIMS:
        lines.append(f"| {claim} | {text} | {step} | {claim_status(claim, step, steps, rows, dry_run)} |")
    lines += ["", "## Rows", ""]
    lines += [f"- {r['step']}: {r['status']}: {r['text']}" for r in rows] or ["(none written)"]
    return "\n".join(lines) + "\n"


def main(argv):
    print(summary(Path(argv[0]), "--dry-run" in argv), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
