"""One LoRA training step on the embedded SmolLM2-135M: ours against transformers + PEFT, side by side.

    python bench/train_step.py [--steps 3] [--batch 4] [--seq 256] [--threads N]

Setting (FACTS.md's peer figures use the same): fp32 on CPU, batch 4 x 256 tokens, LoRA r=16,
alpha 32 on all seven projections, AdamW. Each side runs in its own subprocess so its peak RSS
(ru_maxrss) is its own. Both first compute the loss of the same batch with B = 0 (so the loss is
the base model's) and must agree before anything is timed. Then one warm-up step and --steps timed
steps; the median and the spread (min..max) are reported, with the ratios. Results are appended
to bench/results/train_step.md with the machine, versions, git revision, date and load average.
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "results" / "train_step.md"


def _batch(batch: int, seq: int, vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def worker_ours(a) -> dict:
    import torch

    import lora_engine as le

    quantize = a.quantize if a.worker == "ours" else None  # "ours-dense": the LoRA step, for the QLoRA ratio
    model = le.load_model("smollm2-135m-instruct", dtype=torch.float32, quantize=quantize)
    le.apply_lora(model, le.LoraConfig(r=16, lora_alpha=32, target_modules=tuple(TARGETS)), verbose=False)
    model.gradient_checkpointing = a.checkpointing
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = _batch(a.batch, a.seq, model.config.vocab_size)
    with torch.no_grad():
        check = float(model.loss(ids, ids))

    def step():
        loss = model.loss(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"check_loss": check, **_time(step, a)}


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
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = _batch(a.batch, a.seq, model.config.vocab_size)
    with torch.no_grad():
        check = float(model(input_ids=ids, labels=ids).loss)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"check_loss": check, **_time(step, a)}


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
           "--seq", str(a.seq), "--quantize", a.quantize] + (["--checkpointing"] if a.checkpointing else [])
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        print(f"{name} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "peft", "lora_engine"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "not installed"
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor()} x{os.cpu_count()}"


def _summary(r: dict) -> str:
    t = r["tokens_per_s"]
    s = r["step_s"]
    return (f"{statistics.median(s):.2f} s/step ({min(s):.2f}..{max(s):.2f}), {statistics.median(t):.0f} tokens/s "
            f"({min(t):.0f}..{max(t):.0f}), peak RSS {r['peak_rss_mb']:.0f} MB")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for the workers (0 = torch default)")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on both sides")
    ap.add_argument("--quantize", choices=["none", "nf4"], default="none",
                    help="nf4: QLoRA (ours on NF4, theirs on bitsandbytes NF4), plus our LoRA step for the ratio")
    ap.add_argument("--worker", choices=["ours", "ours-dense", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results/train_step.md")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps((worker_hf if a.worker == "hf" else worker_ours)(a)))
        return
    load = os.getloadavg()
    ours = _run_worker("ours", a)
    hf = _run_worker("hf", a)
    dense = _run_worker("ours-dense", a) if a.quantize == "nf4" else None
    if ours is None:
        sys.exit("our worker failed; nothing to report")
    lines = [f"## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- machine: {_cpu()}, load average at start {load[0]:.1f}; threads: {a.threads or 'torch default'}",
             f"- versions: {json.dumps(_versions())}; git {_git()}",
             f"- setting: {'QLoRA (NF4 base, double quantization), ' if a.quantize == 'nf4' else ''}fp32 CPU, batch {a.batch} x {a.seq}, LoRA r=16 alpha 32 on {len(TARGETS)} projections, AdamW"
             f"{', gradient checkpointing' if a.checkpointing else ''}; {a.steps} timed steps after one warm-up",
             f"- ours: {_summary(ours)}"]
    if hf is not None:
        diff = abs(ours["check_loss"] - hf["check_loss"])
        if diff > 1e-3 * abs(hf["check_loss"]):
            sys.exit(f"losses disagree before timing: ours {ours['check_loss']:.6f}, HF {hf['check_loss']:.6f}")
        print(f"All results match (loss {ours['check_loss']:.5f} vs {hf['check_loss']:.5f}). Timings follow.")
        speed = statistics.median(ours["tokens_per_s"]) / statistics.median(hf["tokens_per_s"])
        mem = ours["peak_rss_mb"] / hf["peak_rss_mb"]
        peer = "transformers + PEFT" + (" + bitsandbytes" if a.quantize == "nf4" else "")
        lines += [f"- {peer}: {_summary(hf)}",
                  f"- ratio: tokens/s {speed:.2f}x theirs (target >= 1.5x), peak RSS {mem:.2f}x theirs (target <= 0.5x)"]
    else:
        lines.append("- transformers + PEFT: not measured (not installed or failed; see stderr)")
    if dense is not None:
        ratio = statistics.median(ours["step_s"]) / statistics.median(dense["step_s"])
        lines += [f"- ours, LoRA on the fp32 base: {_summary(dense)}",
                  f"- QLoRA step / LoRA step (ours): {ratio:.2f}x (target <= 1.3x)"]
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
