"""Peak RSS of a LoRA step with and without rebuilding activations in backward (models/rebuild.py).

SmolLM2-135M (the embedded model) at our default precision, LoRA r=16 on the 7 projections, AdamW,
sequence 256, for each --batch: one fresh process per (batch, mode) runs a warm-up step and one
timed step and reports its peak RSS (ru_maxrss, which includes the model itself). Modes: "plain"
keeps everything the projections save (the normed inputs of q, k, v and of gate, up; the SwiGLU
output of down_proj); "swiglu" rebuilds only the SwiGLU output (rebuild.swiglu_into, the path
before the norms were rebuilt); "recompute" is the model's path, which rebuilds all three. The
differences per layer and token are what each saves.

    python bench/mlp_memory.py --batch 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def worker(batch: int, seq: int, mode: str) -> dict:
    import torch

    import lora_engine as le
    from lora_engine import dispatch
    from lora_engine.models import rebuild
    from lora_engine.train.precision import resolve_precision

    if mode == "plain":  # nothing rebuilt: the projections keep what they read
        rebuild.rebuilt_into = lambda make, fn: fn(make())
    elif mode == "swiglu":  # the norms' outputs kept, the SwiGLU output rebuilt
        rebuild.rms_norm_into = lambda x, w, eps, fn, backend=None: fn(dispatch.rms_norm(x, w, eps, backend=backend))
    torch.manual_seed(0)  # the same LoRA A init in both modes: equal losses
    prec = resolve_precision("cpu", "auto")
    model = le.load_model("smollm2-135m-instruct", dtype=prec.storage)
    le.apply_lora(model, le.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), verbose=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    amp = torch.autocast("cpu", dtype=prec.autocast or torch.bfloat16, enabled=prec.autocast is not None)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with amp:
            loss = model.loss(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return {"batch": batch, "mode": mode, "precision": prec.name, "loss": float(loss),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "step_s": times[-1],
            "layers": model.config.num_hidden_layers, "ffn": model.config.intermediate_size,
            "hidden": model.config.hidden_size}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--worker", nargs=2, metavar=("BATCH", "MODE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(int(a.worker[0]), a.seq, a.worker[1])))
        return
    print(f"- load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    print("| batch x seq | mode | precision | peak RSS MB | step s | loss |")
    print("|---|---|---|---|---|---|")
    rows = {}
    for batch in a.batch:
        for mode in ("plain", "swiglu", "recompute"):
            out = subprocess.run([sys.executable, __file__, "--seq", str(a.seq), "--worker", str(batch), mode],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            rows[batch, mode] = r
            print(f"| {batch} x {a.seq} | {mode} | {r['precision']} | {r['peak_rss_mb']:.0f} | {r['step_s']:.2f} | "
                  f"{r['loss']:.4f} |")
    for batch in a.batch:
        p, w, r = rows[batch, "plain"], rows[batch, "swiglu"], rows[batch, "recompute"]
        per = batch * a.seq * p["layers"] * (2 if p["precision"] == "bf16" else 4) / 2**20  # MB: one value a token and layer
        print(f"- batch {batch}: the SwiGLU outputs rebuilt save {p['peak_rss_mb'] - w['peak_rss_mb']:.0f} MB of peak "
              f"RSS (their size in all layers: {per * p['ffn']:.0f} MB); the two norms' outputs "
              f"{w['peak_rss_mb'] - r['peak_rss_mb']:.0f} MB more ({per * 2 * p['hidden']:.0f} MB)")
    print(f"- load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
