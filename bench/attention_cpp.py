"""Causal attention on the CPU: kernels/attention_cpp.py against torch's SDPA, fwd and fwd+bwd.

The attention of the LoRA step of bench/train_step.py: SmolLM2-135M's 9 query heads over 3 key
heads, head_dim 64, batch 4 x 256, q a transposed view of (B, T, H, hd) as the decoder passes it.
Ours at its default chunk and at one chunk per call (half the default beyond 1024 positions); each provider validated against SDPA first,
then timed alternately (ours, SDPA, ours, ...): median and 20th/80th percentiles of --reps calls,
the ratio of medians, and ours' GEMM work (FLOPs of its seven products) per second. Prints a
markdown table (append it to bench/results/attention_cpp.md).

    python bench/attention_cpp.py --dtype bf16 --reps 20
    python bench/attention_cpp.py --dtype bf16 --reps 5 --batch 1 --seq 2048
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_model, header_lines, machine  # noqa: E402

from lora_engine.kernels import attention_cpp as ac  # noqa: E402
from lora_engine.kernels import ops_reference as ref  # noqa: E402


def _gemm_flops(B, H, S, D, chunk, mode):
    """FLOPs of ours' products: per chunk of c queries against the n = st + c keys it sees, 2 in
    forward (q k^T, p v), 5 more in backward (q k^T again, dO v^T, p^T dO, ds^T q, ds k)."""
    per = sum(2 * B * H * min(chunk, S - st) * (st + min(chunk, S - st)) * D for st in range(0, S, chunk))
    return per * (2 if mode == "fwd" else 7)


def _run(fn, inputs, grad, mode):
    if mode == "fwd":
        with torch.no_grad():
            return [fn(*inputs)]
    xs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*xs)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in xs]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    B, H, Hk, S, D = args.batch, 9, 3, args.seq, 64
    torch.manual_seed(0)
    q = torch.randn(B, S, H, D).to(dtype).transpose(1, 2)
    k, v = torch.randn(B, Hk, S, D).to(dtype), torch.randn(B, Hk, S, D).to(dtype)
    grad = torch.randn(B, H, S, D).to(dtype)
    if not ac.served(q, k, v):
        raise SystemExit("kernels/attention_cpp.py does not serve these inputs here (C++ extension not built?)")
    default = ac._chunk(B, H, S)
    other = S if S <= 1024 else default // 2  # one chunk of all positions only where that is affordable
    providers = {f"ours, chunk {default}": (lambda q, k, v: ac.attention(q, k, v, True), default),
                 f"ours, chunk {other}": (lambda q, k, v: ac.attention(q, k, v, True, chunk=other), other)}
    sdpa = lambda q, k, v: ref.attention(q, k, v, True)  # noqa: E731
    tol = {torch.bfloat16: 2**-5, torch.float32: 1e-5}[dtype]
    for name, (fn, _) in providers.items():
        for mode in ("fwd", "full"):
            for a, b in zip(_run(fn, [q, k, v], grad, mode), _run(sdpa, [q, k, v], grad, mode)):
                err = float((a.double() - b.double()).abs().max() / b.double().abs().max())
                if not err <= tol:
                    raise SystemExit(f"{name} ({mode}): relative error {err:.3g} against SDPA > {tol}")
    print("All results match. Starting benchmarks.", file=sys.stderr)
    from lora_engine.train.precision import cpu_bf16_matmul

    print("\n".join(header_lines({**machine(), "cpu_model": cpu_model() or "unknown", "native_bf16_matmul": cpu_bf16_matmul(),
                                   "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg())})))
    print(f"- dtype {args.dtype}, q ({B}, 9, {S}, 64) over k, v ({B}, 3, {S}, 64), causal; {args.reps} alternating "
          "calls per provider; times in ms: median (p20..p80)\n")
    print("| provider | mode | ours | SDPA | SDPA / ours | ours' GEMM GFLOP/s |")
    print("|---|---|---|---|---|---|")
    for name, (fn, chunk) in providers.items():
        for mode in ("fwd", "full"):
            times = {"ours": [], "sdpa": []}
            for _ in range(2):
                _run(fn, [q, k, v], grad, mode), _run(sdpa, [q, k, v], grad, mode)
            for _ in range(args.reps):
                for key, f in (("ours", fn), ("sdpa", sdpa)):
                    t0 = time.perf_counter()
                    _run(f, [q, k, v], grad, mode)
                    times[key].append(time.perf_counter() - t0)
            cells = []
            for key in ("ours", "sdpa"):
                qs = statistics.quantiles(times[key], n=5)
                cells.append(f"{1e3 * statistics.median(times[key]):.1f} ({1e3 * qs[0]:.1f}..{1e3 * qs[3]:.1f})")
            ratio = statistics.median(times["sdpa"]) / statistics.median(times["ours"])
            rate = _gemm_flops(B, H, S, D, chunk, mode) / statistics.median(times["ours"]) / 1e9
            print(f"| {name} | {mode} | {cells[0]} | {cells[1]} | {ratio:.2f}x | {rate:.0f} |")


if __name__ == "__main__":
    main()
