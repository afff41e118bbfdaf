"""The gated delta rule, forward + backward on CPU: ours (kernels/delta_rule_chunked.py, through
dispatch.gated_delta_rule) against transformers' torch_chunk_gated_delta_rule (Qwen3.5's pure-PyTorch
path), at Qwen3.5's linear-attention head shapes (16 value heads, dk = dv = 128, batch 1), chunk 64.

Validate, then time: at a short sequence both outputs and all gradients are compared to each other
(and ours to the fp64 recurrence in the tests). Then each (implementation, S) runs in a fresh process:
one warm-up step and --reps timed steps of forward + backward (fp32 inputs, both upcast to fp32
anyway), reporting the median and spread in tokens/s and the step's peak memory as the growth of the
process's peak RSS (ru_maxrss) over its RSS once the inputs exist (after a
small step has done the imports): what the step itself allocates.

    python bench/delta_rule.py --seq 1024 2048 4096 8192 16384 --out bench/results/delta_rule.md
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

IMPLS = ("ours", "transformers")
H, DK, DV = 16, 128, 128


def inputs(S: int, seed: int = 0):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(1, S, H, DK, generator=gen), dim=-1)
    k = F.normalize(torch.randn(1, S, H, DK, generator=gen), dim=-1)
    v = torch.randn(1, S, H, DV, generator=gen)
    g = -F.softplus(torch.randn(1, S, H, generator=gen) - 2)
    beta = torch.rand(1, S, H, generator=gen)
    return [t.requires_grad_() for t in (q, k, v, g, beta)]


def step(impl: str, xs):
    """One forward + backward; returns the output and the gradients."""
    import torch

    if impl == "ours":
        from lora_engine import dispatch

        o, _ = dispatch.gated_delta_rule(*xs, backend="torch")
    else:
        from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

        o, _ = torch_chunk_gated_delta_rule(*xs, chunk_size=64)
    grads = torch.autograd.grad(o.square().sum(), xs)
    return [o.detach(), *grads]


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def worker(impl: str, S: int, reps: int) -> dict:
    step(impl, inputs(64))  # imports and one-time setup, outside the measured memory
    xs = inputs(S)
    before = _rss_kib()
    times = []
    for i in range(reps + 1):  # the first is the warm-up, untimed (its peak is the same step's peak)
        t0 = time.perf_counter()
        step(impl, xs)
        if i:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    med = statistics.median(times)
    return {"impl": impl, "S": S, "tok_s": S / med, "tok_s_min": S / max(times), "tok_s_max": S / min(times),
            "step_s": med, "peak_MiB": (peak - before) / 1024}


def validate(S: int = 200) -> float:
    """Largest relative difference between the two implementations' outputs and gradients."""
    xs = inputs(S, seed=1)
    a, b = step("ours", xs), step("transformers", xs)
    return max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--peer-max", type=int, default=2048,
                    help="time transformers only up to this S (its step takes ~14 s per 1k tokens here)")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "S"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.reps)))
        return 0
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _env import header_lines, machine, markdown_table

    diff = validate()
    if diff > 1e-4:
        print(f"ours and transformers differ by {diff:.3g} (relative): not timing", file=sys.stderr)
        return 1
    print(f"All results match (max relative difference {diff:.2g}). Starting benchmarks.", file=sys.stderr)
    load = os.getloadavg()[0]  # the machine may be shared: a load above its cores slows every row alike
    rows = []
    for seq in args.seq:
        for impl in (IMPLS if seq <= args.peer_max else IMPLS[:1]):
            r = subprocess.run([sys.executable, __file__, "--worker", impl, str(seq), "--reps", str(args.reps)],
                               capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr)
    lines = ["# Gated delta rule, forward + backward on CPU", "", *header_lines(machine()), "",
             f"B=1, H={H}, dk={DK}, dv={DV}, chunk 64, fp32; {args.reps} timed steps after one warm-up, median "
             f"tokens/s with [min, max]; peak_MiB: growth of peak RSS during the steps. Outputs and gradients of the "
             f"two agree to {diff:.2g} (relative) at S=200. transformers is timed up to S={args.peer_max} only: its "
             f"step (Python loops over chunks and over the rows of each chunk's inverse, all kept for autograd) took "
             f"14 to 20 s per 1k tokens on this machine, past the ~30 s a run may take beyond 2k. Load average when the run started: {load:.1f} on {os.cpu_count()} cores "
             f"(the machine was shared; compare rows of one run only).", "", *markdown_table(rows)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
