"""Training-step cost of the fine-tuning methods: LoRA, DoRA and full fine-tuning, ours against
transformers (+ PEFT), side by side on the embedded SmolLM2-135M.

    python bench/methods.py [--rounds 3] [--steps 2] [--batch 2] [--seq 128]

fp32 on CPU, AdamW, LoRA/DoRA r=16 alpha 32 on all seven projections. Each (engine, method) runs in
its own subprocess (its peak RSS is its own), and the rounds interleave them (A B C ... A B C ...), so
a change of machine load hits every method alike; each reports the median step time of its round and
the result is the median over rounds. Both engines first compute the loss of the same batch at
initialisation (B = 0, so the base model's loss) and must agree before anything is timed. Results are
appended to bench/results/methods.md with the machine, versions, git revision and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine, markdown_table  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULTS = Path(__file__).resolve().parent / "results" / "methods.md"
METHODS = ("lora", "dora", "full")


def _batch(a, vocab: int):
    import torch

    return torch.randint(0, vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))


def _time(step, a) -> dict:
    step()  # warm-up (allocations, AdamW state)
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def worker_ours(a) -> dict:
    import torch

    import lora_engine as le

    model = le.load_model("smollm2-135m-instruct", dtype=torch.float32)
    if a.method == "full":
        le.trainer.full_finetuning(model)
    else:
        le.apply_lora(model, le.LoraConfig(r=16, lora_alpha=32, target_modules=tuple(TARGETS),
                                           use_dora=a.method == "dora"), verbose=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = _batch(a, model.config.vocab_size)
    with torch.no_grad():
        check = float(model.loss(ids, ids))

    def step():
        model.loss(ids, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"check_loss": check, **_time(step, a)}


def worker_hf(a) -> dict:
    import torch
    import transformers as tf

    from lora_engine.sources.embedded import ensure_converted

    model = tf.AutoModelForCausalLM.from_pretrained(ensure_converted("smollm2-135m-instruct"), dtype=torch.float32)
    if a.method != "full":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                           lora_dropout=0.0, use_dora=a.method == "dora"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = _batch(a, model.config.vocab_size)
    with torch.no_grad():  # transformers shifts the labels itself, as our loss does
        check = float(model(input_ids=ids, labels=ids).loss)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"check_loss": check, **_time(step, a)}


def _run(engine: str, method: str, a) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--method", method, "--steps", str(a.steps),
           "--batch", str(a.batch), "--seq", str(a.seq)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{engine}/{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--worker", choices=["ours", "hf"])
    ap.add_argument("--method", choices=METHODS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps((worker_ours if a.worker == "ours" else worker_hf)(a)))
        return
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(a.rounds):
        for method in METHODS:
            for engine in ("ours", "hf"):
                runs.setdefault((engine, method), []).append(_run(engine, method, a))
    rows = []
    for method in METHODS:
        ours, hf = runs[("ours", method)], runs[("hf", method)]
        lo, lh = ours[0]["check_loss"], hf[0]["check_loss"]
        if abs(lo - lh) > 1e-3 * abs(lh):
            raise SystemExit(f"{method}: the initial losses disagree (ours {lo:.6f}, transformers {lh:.6f})")
        t_o = statistics.median(r["step_s"] for r in ours)
        t_h = statistics.median(r["step_s"] for r in hf)
        m_o = statistics.median(r["peak_rss_mb"] for r in ours)
        m_h = statistics.median(r["peak_rss_mb"] for r in hf)
        rows.append({"method": method, "ours step (s)": t_o, "peer step (s)": t_h, "speed vs peer": t_h / t_o,
                     "ours RSS (MB)": m_o, "peer RSS (MB)": m_h, "RSS vs peer": m_o / m_h})
    lora = next(r for r in rows if r["method"] == "lora")["ours step (s)"]
    for r in rows:
        r["vs our LoRA step"] = r["ours step (s)"] / lora
    info = machine()
    info["load_average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["setting"] = f"fp32, batch {a.batch} x {a.seq}, r=16 on 7 projections (DoRA: same), AdamW, " \
                      f"{a.rounds} interleaved rounds x {a.steps} timed steps"
    try:
        import peft
        import transformers

        info["peers"] = f"transformers {transformers.__version__}, peft {peft.__version__}"
    except ImportError:
        pass
    lines = ["", f"## {info['date']}", "", *header_lines(info), "", *markdown_table(rows), ""]
    print("\n".join(lines))
    if not RESULTS.exists():
        RESULTS.write_text("# Fine-tuning methods: step time and peak RSS (bench/methods.py)\n\n"
                           "peer = transformers + PEFT (LoRA, DoRA) or plain transformers (full); "
                           "the peer's peers are PEFT's own DoRA and transformers' full fine-tuning.\n")
    with RESULTS.open("a") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
