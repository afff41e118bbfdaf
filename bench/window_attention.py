"""Sliding-window attention on the CPU, forward + backward: time and peak memory against S at a fixed W.

dispatch.attention(window=W) on the "cpp" backend (kernels/attention_cpp.py, each chunk of queries
meets at most c + W - 1 keys) and on the "torch" backend (kernels/window_attention.py, per-chunk SDPA
recomputed in backward), against the dense path the decoder took before: SDPA with a (S, S) boolean
window mask, O(S^2) in time and memory (run only up to --dense-max, where it still fits and ends).
Gemma-like heads: 8 query heads over 4 key heads, bf16, batch 1. Each case runs in its own process so
that its peak resident memory (ru_maxrss) minus that before the call is the call's own peak; time is
the median of --reps forward+backward calls after one warm-up. Prints a markdown table (the file
bench/results/window_attention.md holds a run).

    python bench/window_attention.py --seqs 4096 8192 16384 --window 512 --head-dim 128
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_model, header_lines, machine, markdown_table  # noqa: E402

from lora_engine import dispatch  # noqa: E402


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(path: str, S: int, W: int, H: int, Hk: int, D: int, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, S, D, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(1, Hk, S, D, generator=g).bfloat16().requires_grad_() for _ in range(2))
    do = torch.randn(1, H, S, D, generator=g).bfloat16()
    if path == "dense":
        pos = torch.arange(S)
        mask = (pos[None] <= pos[:, None]) & (pos[None] > pos[:, None] - W)

        def fn():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    else:
        def fn():
            return dispatch.attention(q, k, v, True, None, backend=path, window=W)
    before = _rss_mib()
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        torch.autograd.grad(fn(), (q, k, v), do)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"path": path, "S": S, "W": W, "fwd+bwd s": statistics.median(times[1:]),
            "peak MiB over inputs": peak - before}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--window", type=int, nargs="+", default=[512])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--paths", nargs="+", default=["cpp", "torch", "dense"])
    p.add_argument("--dense-max", type=int, default=4096, help="longest S the dense masked SDPA runs at")
    p.add_argument("--one", nargs=3, metavar=("PATH", "S", "W"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one[0], int(a.one[1]), int(a.one[2]), a.heads, a.kv_heads, a.head_dim, a.reps)))
        return
    rows = []
    for W in a.window:
        for S in a.seqs:
            for path in a.paths:
                if path == "dense" and a.dense_max < S:
                    continue
                cmd = [sys.executable, __file__, "--one", path, str(S), str(W), "--heads", str(a.heads),
                       "--kv-heads", str(a.kv_heads), "--head-dim", str(a.head_dim), "--reps", str(a.reps)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
                print(rows[-1], file=sys.stderr)
    info = {**machine(), "cpu_model": cpu_model() or "unknown", "heads": f"{a.heads} over {a.kv_heads}",
            "head_dim": a.head_dim, "dtype": "bf16", "batch": 1}
    print("\n".join(header_lines(info) + [""] + markdown_table(rows)))


if __name__ == "__main__":
    main()
