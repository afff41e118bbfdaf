"""One LoRA training step on the embedded SmolLM2-135M: ours against transformers + PEFT, side by side.

    python bench/train_step.py [--rounds 3] [--steps 3] [--batch 4] [--seq 256] [--quantize none|nf4]

Setting (every run in bench/results/train_step.md uses it): CPU, batch 4 x 256 tokens, LoRA r=16,
alpha 32 on all seven projections, AdamW. Ours runs its default precision (--precision auto, train/precision.py:
bf16 with the base stored in bf16 where the CPU multiplies bf16 natively, else fp32; --ours-precision
overrides). The peer runs its default, fp32, and (without --quantize) also bf16 autocast over its fp32
weights, as a transformers user sets it. Each side runs in its own subprocess so its peak RSS
(ru_maxrss) is its own, and the workers alternate (A B C A B C ... for --rounds rounds), so a change
in the machine's load hits every side alike; the median over all timed steps of all rounds is
reported, with the spread and the ratios. Each worker first computes the loss of the same batch
with B = 0 (the base model's) and the sides must agree before anything is reported. Model-FLOP
utilisation: 4 FLOPs per linear parameter and token (a multiply-add per weight in the forward, another
for the input gradient; the frozen weights get no gradient, and LoRA's own FLOPs are small) per second,
over the rate of torch.mm measured in the same worker at the step's own GEMM shapes and dtype.
Results are appended to bench/results/train_step.md with the machine, versions, git revision, date
and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _env import cpu_model  # bench/ is the script's folder, first on sys.path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "results" / "train_step.md"


def _batch(batch: int, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def worker_ours(a) -> dict:
    import torch

    import lora_engine as le
    from lora_engine.train.precision import resolve_precision

    quantize = a.quantize if a.worker == "ours" and a.quantize != "none" else None  # "ours-dense": the LoRA step, for the QLoRA ratio
    prec = resolve_precision("cpu", a.ours_precision)
    model = le.load_model("smollm2-135m-instruct", dtype=prec.storage, quantize=quantize)
    le.apply_lora(model, le.LoraConfig(r=16, lora_alpha=32, target_modules=tuple(TARGETS)), verbose=False)
    model.gradient_checkpointing = a.checkpointing
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = _batch(a.batch, a.seq, model.config.vocab_size)
    amp = torch.autocast("cpu", dtype=prec.autocast or torch.bfloat16, enabled=prec.autocast is not None)
    with torch.no_grad(), amp:
        check = float(model.loss(ids, ids))

    def step():
        with amp:
            loss = model.loss(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = {"check_loss": check, "precision": prec.name, **_time(step, a)}
    out["gemm_gflops"] = _gemm_rate(model.config, a.batch * a.seq, prec.compute)
    out["model_gflop"] = 4 * _linear_params(model.config) * a.batch * a.seq / 1e9
    return out


def _linear_params(c) -> int:
    """Parameters of every matmul of the step: seven projections per layer and the (tied) head."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, f = c.hidden_size, c.intermediate_size
    return c.num_hidden_layers * (2 * h * q + 2 * h * kv + 3 * h * f) + c.vocab_size * h


def _gemm_rate(c, tokens: int, dtype, repeats: int = 3) -> float:
    """GFLOP/s of torch.mm on this machine at the step's shapes in `dtype`: one layer's projections and
    the head, forward (x W^T) and input gradient (dy W), weighted as the step weights them."""
    import torch

    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, f = c.hidden_size, c.intermediate_size
    shapes = [(h, q, c.num_hidden_layers), (h, kv, 2 * c.num_hidden_layers), (q, h, c.num_hidden_layers),
              (h, f, 2 * c.num_hidden_layers), (f, h, c.num_hidden_layers), (h, c.vocab_size, 1)]
    flops = secs = 0.0
    for k, n, count in shapes:  # x (tokens, k) @ W^T (k, n), and dy (tokens, n) @ W (n, k)
        w = torch.randn(n, k, dtype=dtype)
        for x, b in ((torch.randn(tokens, k, dtype=dtype), w.t()), (torch.randn(tokens, n, dtype=dtype), w)):
            x @ b  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                x @ b
            secs += (time.perf_counter() - t0) / repeats * count
            flops += 2 * tokens * k * n * count
    return flops / secs / 1e9


def worker_hf(a) -> dict:
    import peft
    import torch
    import transformers as tf

    from lora_engine.sources.embedded import ensure_converted

    kw = {}
    if a.quantize == "nf4":  # QLoRA the usual way: bitsandbytes NF4 with double quantization
        kw["quantization_config"] = tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = tf.AutoModelForCausalLM.from_pretrained(ensure_converted("smollm2-135m-instruct"), dtype=torch.float32,
                                                    **kw)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                       lora_dropout=0.0, task_type="CAUSAL_LM"))
    if a.checkpointing:
        model.gradient_checkpointing_enable()
    # train() before the check: bitsandbytes 0.50.2 takes its CPU fast path (weights repacked in
    # place, an inexact bf16 4-bit matmul; docs/bitsandbytes_cpu.md) only in eval mode without grad, on
    # AVX512-BF16 CPUs. In train mode its Linear4bit dequantizes and runs an fp32 linear, the same
    # arithmetic as ours (SmolLM2's rows are whole 64-blocks, so bnb's AVX512F dequantize bug of
    # tests/bnb_oracle.py does not apply).
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = _batch(a.batch, a.seq, model.config.vocab_size)
    # "hf-bf16": bf16 autocast over the fp32 model, as a transformers user sets it (Trainer's bf16=True).
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.worker == "hf-bf16")
    with torch.no_grad(), amp:
        check = float(model(input_ids=ids, labels=ids).loss)

    def step():
        with amp:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"check_loss": check, "precision": "bf16 autocast" if a.worker == "hf-bf16" else "fp32", **_time(step, a)}


def _time(step, a) -> dict:
    step()  # warm-up: allocator, optimizer state
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    tokens = a.batch * a.seq
    return {"step_s": times, "tokens_per_s": [tokens / t for t in times],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run_worker(name: str, a) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(a.steps), "--batch", str(a.batch),
           "--seq", str(a.seq), "--quantize", a.quantize, "--ours-precision", a.ours_precision]
    cmd += ["--checkpointing"] if a.checkpointing else []
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(f"{name} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def _pool(runs: list[dict]) -> dict | None:
    """The rounds of one worker as one result: every timed step, the median peak RSS, the last GEMM rate."""
    runs = [r for r in runs if r is not None]
    if not runs:
        return None
    out = dict(runs[-1])
    out["step_s"] = [t for r in runs for t in r["step_s"]]
    out["tokens_per_s"] = [t for r in runs for t in r["tokens_per_s"]]
    out["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
    if "gemm_gflops" in out:
        out["gemm_gflops"] = statistics.median(r["gemm_gflops"] for r in runs)
    return out


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "peft", "lora_engine"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "not installed"
    return out


def _summary(r: dict) -> str:
    t = r["tokens_per_s"]
    s = r["step_s"]
    return (f"{statistics.median(s):.2f} s/step ({min(s):.2f}..{max(s):.2f}), {statistics.median(t):.0f} tokens/s "
            f"({min(t):.0f}..{max(t):.0f}), peak RSS {r['peak_rss_mb']:.0f} MB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all workers in turn (A B C A B C ...)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per worker and round, after one warm-up")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the workers (0 = torch default)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--quantize", choices=["none", "nf4"], default="none",
                    help="nf4: QLoRA (ours on NF4, theirs on bitsandbytes NF4), plus our LoRA step for the ratio")
    ap.add_argument("--ours-precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="our --precision (default auto, what a user gets)")
    ap.add_argument("--worker", choices=["ours", "ours-dense", "hf", "hf-bf16"], help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results/train_step.md")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps((worker_ours if a.worker.startswith("ours") else worker_hf)(a)))
        return
    load = os.getloadavg()
    from lora_engine.train.precision import cpu_bf16_matmul

    bf16_unit = cpu_bf16_matmul()
    skip_bf16_peer = bf16_unit is None and a.quantize == "none"  # bf16 GEMMs emulated here, ~50x slower than fp32
    names = ["ours", "hf", "ours-dense"] if a.quantize == "nf4" else ["ours", "hf", "hf-bf16"]
    if skip_bf16_peer:
        names.remove("hf-bf16")
    runs: dict[str, list] = {n: [] for n in names}
    for _ in range(a.rounds):
        for n in names:
            runs[n].append(_run_worker(n, a))
    res = {n: _pool(r) for n, r in runs.items()}
    ours = res["ours"]
    if ours is None:
        sys.exit("our worker failed; nothing to report")
    peer = "transformers + PEFT" + (" + bitsandbytes" if a.quantize == "nf4" else "")
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- machine: {cpu_model()} x{os.cpu_count()}, native bf16 matmul: {bf16_unit or 'none'} (train/precision.py), shared with other "
             f"agents' jobs (load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f}); threads: "
             f"{a.threads or 'torch default'}",
             f"- versions: {json.dumps(_versions())}; git {_git()}",
             f"- command: python bench/train_step.py --rounds {a.rounds} --steps {a.steps}"
             + (f" --quantize {a.quantize}" if a.quantize != "none" else "")
             + (f" --ours-precision {a.ours_precision}" if a.ours_precision != "auto" else ""),
             f"- setting: {'QLoRA (NF4 base, double quantization), ' if a.quantize == 'nf4' else ''}CPU, batch "
             f"{a.batch} x {a.seq}, LoRA r=16 alpha 32 on {len(TARGETS)} projections, AdamW"
             f"{', gradient checkpointing' if a.checkpointing else ''}; {a.rounds} rounds x {a.steps} timed steps "
             "per worker (each after one warm-up), workers interleaved; medians over all timed steps",
             f"- ours (--precision {a.ours_precision} -> {ours['precision']}): {_summary(ours)}",
             f"- ours, model-FLOP utilisation: {ours['model_gflop'] / statistics.median(ours['step_s']):.0f} GFLOP/s of "
             f"{ours['gemm_gflops']:.0f} GFLOP/s measured for torch.mm at the step's shapes in {ours['precision']}: "
             f"{ours['model_gflop'] / statistics.median(ours['step_s']) / ours['gemm_gflops']:.0%} (goal >= 85%)"]
    # A sanity check that both sides run the same model on the same batch, not an exactness test
    # (tests/ hold those): fp32 against fp32 differs by summation order only, 1e-3 relative is far
    # above that; a bf16 side by a few roundings of bf16 (tests/conftest.py amp_loss_bf16: 2 * 2**-8).
    for name in ("hf", "hf-bf16"):
        theirs = res.get(name)
        if theirs is None:
            continue
        rtol = 1e-3 if ours["precision"] == theirs["precision"] == "fp32" else 2 * 2**-8
        diff = abs(ours["check_loss"] - theirs["check_loss"])
        if diff > rtol * abs(theirs["check_loss"]):
            sys.exit(f"losses disagree before timing: ours {ours['check_loss']:.6f}, {name} {theirs['check_loss']:.6f}")
    print("All results match. Timings follow.")
    targets = {"hf": ">= 2.5x", "hf-bf16": ">= 1.3x"}
    for name in ("hf", "hf-bf16"):
        if name not in res:
            continue
        theirs = res[name]
        if theirs is None:
            lines.append(f"- {peer} ({name}): not measured (not installed or failed; see stderr)")
            continue
        speed = statistics.median(ours["tokens_per_s"]) / statistics.median(theirs["tokens_per_s"])
        mem = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
        lines += [f"- {peer}, {theirs['precision']}: {_summary(theirs)}",
                  f"- ratio ours / theirs ({theirs['precision']}): tokens/s {speed:.2f}x (target {targets[name]}), "
                  f"peak RSS {mem:.2f}x" + (" (target <= 0.4x)" if name == "hf" else "")]
    if skip_bf16_peer:
        lines.append(f"- {peer}, bf16 autocast: not run, this CPU has no native bf16 matmul (its bf16 GEMMs are "
                     "emulated); ours ran its default here, fp32")
    dense = res.get("ours-dense")
    if dense is not None:
        ratio = statistics.median(ours["step_s"]) / statistics.median(dense["step_s"])
        lines += [f"- ours, LoRA on the dense base ({dense['precision']}): {_summary(dense)}",
                  f"- QLoRA step / LoRA step (ours): {ratio:.2f}x (target <= 1.15x)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_record:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        with open(RESULTS, "a") as f:
            f.write(("" if RESULTS.exists() and RESULTS.stat().st_size else "# bench/train_step.py results\n\n")
                    + text + "\n")


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip() or "-"
    except OSError:
        return "-"


if __name__ == "__main__":
    main()
