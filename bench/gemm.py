"""torch.mm rates on this CPU in fp32, bf16 and fp16: the measurement behind `--precision auto`.

    python bench/gemm.py [--repeats 5]

train/precision.py picks bf16 only where the CPU multiplies bf16 natively (AVX512-BF16 or AMX):
elsewhere torch emulates half-precision GEMMs through fp32 and they run tens of times slower than
fp32 itself. This prints GFLOP/s (median of --repeats, with the spread) at the LoRA step's largest
projection shape (1024 tokens x 576 -> 1536, SmolLM2-135M's MLP) and at square 1024, for
each dtype, with the machine and versions. Recorded runs: bench/results/precision.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _env import cpu_model, header_lines, machine

# (m, k, n): (m, k) @ (k, n). Kept small: an emulated fp16 GEMM of 2048^3 takes ~25 s on a 2-core CPU.
SHAPES = [(1024, 576, 1536), (1024, 1024, 1024)]


def rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int) -> list[float]:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up: first-call dispatch and page faults
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        out.append(2 * m * k * n / (time.perf_counter() - t0) / 1e9)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    info = machine()
    info["cpu"] = cpu_model() or info["cpu"]
    print("\n".join(header_lines(info)))
    print("| m x k x n | dtype | GFLOP/s (median) | min..max |")
    print("|---|---|---|---|")
    for m, k, n in SHAPES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            r = rate(m, k, n, dtype, a.repeats)
            print(f"| {m} x {k} x {n} | {str(dtype).removeprefix('torch.')} | {statistics.median(r):.1f} | "
                  f"{min(r):.1f}..{max(r):.1f} |")


if __name__ == "__main__":
    main()
