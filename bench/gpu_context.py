"""Llama-3.1-8B-shaped QLoRA context lengths on a GPU, real steps against the plan (lora_engine.plan).

    python bench/gpu_context.py --out-dir DIR --part 24g [--budget-s 100] [--dry-run]
    python bench/gpu_context.py --out-dir DIR --part 4k [--dry-run]

Setting (the README's): random weights drawn by name (no download), NF4 base, r=16 on all seven
projections, batch 1, bf16, gradient checkpointing, one step at a short length first so AdamW's state
exists (the plan's second step holds it too), then the measured step; every token a target.

--part 24g: the longest context under a 24 GiB cap with the long-context flags (--gradient-checkpointing
  --offload-activations --mlp-chunk-size 4096; plan_table.LONG). The allocator is capped with
  torch.cuda.set_per_process_memory_fraction at 24 GiB less the CUDA context the plan adds for it
  (train/planning.py CUDA_CONTEXT_BYTES), so "fits" means what the plan's total means. The planned
  figure is probed first (bench/results/plan_long.json: the longest row whose total fits 24 GiB); if it
  does not fit, bisection over real steps (4,096-token resolution) while the next probe's estimated time
  (the last fitting probe's, scaled by length: an overestimate below it) ends within --budget-s of the
  start, each probe a row. The first probe always runs: on an H100 a 131,072-token 8B step takes about a
  minute, which is most of the step's limit in bench/gpu_check.sh. The result is the longest length measured to fit, with the bound it stopped at.
--part 4k: 4,096 tokens with every memory option (plan_table.SHORT): max_memory_allocated against the
  plan's peak and total (bench/results/plan_short.json).
--dry-run: tiny shapes on CPU without the options that move tensors off a GPU (refused on a CPU); a CPU has
  no cap, so the bisection runs real steps under a pretend one (any length over 160 tokens "does not fit").
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from gpu_common import ROOT, GiB, Rows, add_common_args, fill_by_name, oom_or_error, shapes  # noqa: E402
from gpu_common import device as pick_device  # noqa: E402
from plan_table import LONG, SHORT  # noqa: E402

from lora_engine import plan as P  # noqa: E402
from lora_engine.models.config import ModelConfig  # noqa: E402
from lora_engine.train import step as trainer  # noqa: E402

CAP = 24 * GiB
T0 = time.perf_counter()  # the process's start: --budget-s counts from it, model building included
MODEL = "Llama-3.1-8B"


CUDA_ONLY = ("offload_activations", "embedding_on_cpu", "head_on_cpu")  # refused on --device cpu: moot there


def build(hf: dict, dev: str, options: dict):
    if dev == "cpu":
        options = {k: v for k, v in options.items() if k not in CUDA_ONLY}
    cfg = P.PlanConfig(model=MODEL, quantize="nf4", r=16, precision="bf16", device=dev,
                       gradient_checkpointing=True, **options)
    model = P.meta_model(cfg, ModelConfig.from_hf(hf)).to_empty(device=dev)
    model.tie_weights()
    model.reset_buffers()
    fill_by_name(model.named_parameters())
    model, opt, amp = P.build(cfg, model)
    sched = trainer.make_scheduler(opt, 0, 1000)
    vocab = hf["vocab_size"]
    trainer.train_step(model, opt, sched, [_batch(64, vocab, dev)], amp=amp)  # AdamW's state, as step 2 has it

    def step(n):
        try:
            return trainer.train_step(model, opt, sched, [_batch(n, vocab, dev)], amp=amp)
        finally:  # an out-of-memory step leaves gradients behind: the next probe starts clean
            opt.zero_grad(set_to_none=True)

    return cfg, model, step


def _batch(n: int, vocab: int, dev: str) -> dict:
    return {k: v.to(dev) for k, v in P.batch_of(1, n, vocab).items()}


def probe(step, n: int, dev: str) -> tuple[bool, float, str]:
    """One real step at n tokens: (fits, peak GiB or nan, error)."""
    if dev == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        step(n)
    except torch.cuda.OutOfMemoryError as e:
        return False, float("nan"), str(e).splitlines()[0][:120]
    if dev == "cuda":
        torch.cuda.synchronize()
        return True, torch.cuda.max_memory_allocated() / GiB, ""
    return True, float("nan"), ""


def planned(stem: str, fits) -> dict:
    """The recorded plan row (bench/results/<stem>.json) chosen by `fits` among the rows."""
    rows = [r for r in json.loads((ROOT / "bench" / "results" / f"{stem}.json").read_text()) if fits(r)]
    return max(rows, key=lambda r: r["seq_len"])


def bisect(probe_at, planned_n: int, deadline: float, rows: Rows, grain: int = 4096) -> tuple[int, int | None]:
    """The longest length measured to fit, and the shortest measured not to (None: none failed). The planned
    length first (it is the model's maximum, max_position_embeddings: when it fits there is nothing longer
    to find), then bisection at `grain` tokens while the next probe's estimate ends before `deadline`.
    probe_at(n) -> (fits, peak GiB, error); each probe is a row."""
    lo, hi = 0, None
    n, est, fit_n, fit_s = planned_n, 0.0, 0, 0.0
    while n and (n == planned_n or time.perf_counter() + est < deadline):  # the planned length is always probed
        t0 = time.perf_counter()
        ok, peak, err = probe_at(n)
        last = time.perf_counter() - t0
        rows.add(None, f"probe {n:,} tokens under the cap: {f'fits, peak {peak:.2f} GiB' if ok else 'OOM'} "
                 f"({last:.0f} s){'' if ok else ': ' + err}", tokens=n, fits=ok, peak_gib=peak)
        if ok:
            lo, fit_n, fit_s = max(lo, n), n, last
        else:
            hi = n if hi is None else min(hi, n)
        if ok and n == planned_n:
            break
        n = (lo + (hi or 2 * lo)) // 2 // grain * grain
        if n <= lo or (hi is not None and hi - lo <= grain):
            break
        est = fit_s * n / fit_n if fit_n else last  # a longer fitting probe's time, scaled: an overestimate
    return lo, hi


def part_24g(a, rows: Rows, dev: str, hf: dict):
    claim = "context-24g longest"
    if a.dry_run:  # a CPU has no cap: real tiny steps, a pretend cap at 160 tokens, and the plan at 64 tokens
        cfg, _, step = build(hf, dev, LONG)

        def probe_at(n):
            return (False, float("nan"), "pretend cap (dry run)") if n > 160 else probe(step, n, dev)

        lo, hi = bisect(probe_at, 256, T0 + a.budget_s, rows, grain=32)
        plan = P.plan_step(dataclasses.replace(cfg, seq_len=64), ModelConfig.from_hf(hf))
        rows.add(claim, f"bisection under a pretend cap of 160 tokens found {lo} (next {hi}); planned peak at 64 "
                 f"tokens {plan['peak_bytes'] / 2**20:.1f} MiB", ok=lo == 160, why=f"bisection found {lo}, not 160")
        return
    plan = planned("plan_long", lambda r: r["total_bytes"] <= CAP)
    cfg, model, step = build(hf, dev, LONG)
    gc.collect()
    torch.cuda.empty_cache()
    limit = CAP - P.CUDA_CONTEXT_BYTES
    torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)
    print(f"model built in {time.perf_counter() - T0:.0f} s; allocator capped at {limit / GiB:.2f} GiB",
          flush=True)
    lo, hi = bisect(lambda n: probe(step, n, dev), plan["seq_len"], T0 + a.budget_s, rows)
    bound = "the planned length fits" if lo == plan["seq_len"] else (
        f"{hi:,} did not fit" if hi is not None and hi - lo <= 4096 else "stopped by the time budget"
        + (f"; {hi:,} did not fit" if hi else ""))
    rows.add(claim, f"longest measured to fit 24 GiB: {lo:,} tokens ({bound}); planned {plan['seq_len']:,} tokens "
             f"at {plan['total_bytes'] / GiB:.2f} GiB total ({plan['peak_bytes'] / GiB:.2f} GiB peak), same flags",
             ok=lo > 0, why="no probed length fit under the cap", longest=lo, planned=plan["seq_len"])


def part_4k(a, rows: Rows, dev: str, hf: dict):
    claim = "context-4k every memory option"
    n = 64 if a.dry_run else 4096
    cfg, _, step = build(hf, dev, SHORT)
    ok, peak, err = probe(step, n, dev)
    if a.dry_run:
        plan = P.plan_step(dataclasses.replace(cfg, seq_len=n), ModelConfig.from_hf(hf))
        rows.add(claim, f"{n} tokens, every memory option: real step {'ran' if ok else 'failed ' + err}; planned peak "
                 f"{plan['peak_bytes'] / 2**20:.1f} MiB", ok=ok, why=err)
        return
    plan = planned("plan_short", lambda r: r["seq_len"] == 4096)
    rows.add(claim, f"4,096 tokens, every memory option: max_memory_allocated {peak:.2f} GiB; planned peak "
             f"{plan['peak_bytes'] / GiB:.2f} GiB (plan/measured {plan['peak_bytes'] / GiB / peak:.3f}), planned total "
             f"with the CUDA context {plan['total_bytes'] / GiB:.2f} GiB", ok=ok, why=f"OOM: {err}", peak_gib=peak)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--part", choices=["24g", "4k"], required=True)
    ap.add_argument("--budget-s", type=float, default=100.0,
                    help="seconds from the start: no probe is begun that is estimated to end later")
    a = ap.parse_args(argv)
    dev = pick_device(a.dry_run)
    rows = Rows(a.out_dir, f"context-{a.part}", a.dry_run)
    hf = shapes(a.dry_run)[MODEL]
    try:
        (part_24g if a.part == "24g" else part_4k)(a, rows, dev, hf)
    except Exception as e:  # noqa: BLE001  (the row says why; the script's other steps still run)
        rows.add(f"context-{a.part}" + (" longest" if a.part == "24g" else " every memory option"),
                 "the step failed", ok=False, why=oom_or_error(e))
        raise


if __name__ == "__main__":
    main()
