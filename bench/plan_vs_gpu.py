"""The plan against the GPU: torch.cuda.max_memory_allocated of real Llama-3.1-8B-shaped QLoRA steps
(random weights, r=16 on all linear layers, bf16, batch 1, gradient checkpointing) next to
lora_engine.plan's planned peak of the same step, at a few context lengths.

    python bench/plan_vs_gpu.py --out $OUT/plan_vs_gpu.md [--lengths 2048 8192] [--layers 32]

Each length: a fresh AdamW, two train_step calls (train/step.py), the peak since a reset. Both the
reference kernels (the path the plan runs today) and the default GPU backend are measured.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from plan_table import MODELS  # noqa: E402

from lora_engine import dispatch  # noqa: E402
from lora_engine import plan as P  # noqa: E402
from lora_engine.models.config import ModelConfig  # noqa: E402
from lora_engine.train import step as trainer  # noqa: E402


def real_peak(model, cfg, backend) -> int:
    dispatch.set_backend(model, backend)
    opt = trainer.make_optimizer(model, 1e-4)
    sched = trainer.make_scheduler(opt, 0, 10)
    batch = {k: v.cuda() for k, v in P.batch_of(1, cfg.seq_len, model.config.vocab_size).items()}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        trainer.train_step(model, opt, sched, [batch], amp=torch.bfloat16)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del opt, sched
    for p in model.parameters():
        p.grad = None
    return peak


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32: the real 8B shape)")
    a = ap.parse_args()
    mc = ModelConfig.from_hf({**MODELS["Llama-3.1-8B"], "num_hidden_layers": a.layers})
    base = P.PlanConfig(model="Llama-3.1-8B", quantize="nf4", r=16, precision="bf16", device="cuda",
                        gradient_checkpointing=True)
    torch.manual_seed(0)
    model = P.meta_model(base, mc).to_empty(device="cuda")
    model.tie_weights()
    model.reset_buffers()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model, _, _ = P.build(base, model)
    rows = ["| tokens | planned peak (GiB) | measured, reference kernels (GiB) | plan/measured | "
            "measured, default backend (GiB) |", "|---:|---:|---:|---:|---:|"]
    for n in a.lengths:
        cfg = P.PlanConfig(**{**base.__dict__, "seq_len": n})
        t0 = time.perf_counter()
        planned = P.plan_step(cfg, mc)["peak_bytes"]
        ref = real_peak(model, cfg, "torch")
        auto = real_peak(model, cfg, None)
        g = 2**30
        rows.append(f"| {n:,} | {planned / g:.2f} | {ref / g:.2f} | {planned / ref:.3f} | {auto / g:.2f} |")
        print(rows[-1], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    text = (f"# Plan vs GPU ({torch.cuda.get_device_name()}, torch {torch.__version__}, {a.layers} layers)\n\n"
            + "\n".join(rows) + "\n")
    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
