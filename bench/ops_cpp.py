"""The fused C++ CPU ops (kernels/ops_cpp.py) against the PyTorch reference, per op, fwd and fwd+bwd.

Shapes of the LoRA step of bench/train_step.py (SmolLM2-135M, batch 4 x 256): RMSNorm over (1024,
576), RoPE on q (4, 9, 256, 64) and k (4, 3, 256, 64) laid out as the model passes them (transposed
views of (B, T, H, hd)), SwiGLU on (1024, 1536). Each provider is validated against the reference
first, then timed alternately (ours, reference, ours, ...): median and 20th/80th percentiles of
--reps calls, and the ratio of medians. Prints a markdown table (append it to a results file).

    python bench/ops_cpp.py --dtype bf16 --reps 50
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
from _env import header_lines, machine  # noqa: E402

from lora_engine.kernels import ops_cpp as cf  # noqa: E402
from lora_engine.kernels import ops_reference as ref  # noqa: E402


def _cases(dtype):
    def r(*shape):
        return torch.randn(*shape).to(dtype)

    x, w = r(4, 256, 576), (1 + 0.1 * torch.randn(576)).to(dtype)
    q = r(4, 256, 9, 64).transpose(1, 2)
    k = r(4, 256, 3, 64).transpose(1, 2)
    ang = torch.randn(4, 256, 64)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    g, u = r(4, 256, 1536) * 3, r(4, 256, 1536)
    return {
        "rms_norm (1024, 576)": (lambda m, x, w: m.rms_norm(x, w, 1e-5), [x, w]),
        "rope q (4,9,256,64) k (4,3,256,64)": (lambda m, q, k: m.rope(q, k, cos, sin), [q, k]),
        "swiglu (1024, 1536)": (lambda m, g, u: m.swiglu(g, u), [g, u]),
    }


def _run(mod, fn, inputs, mode):
    if mode == "fwd":
        with torch.no_grad():
            return fn(mod, *inputs)
    xs = [t.detach().requires_grad_() for t in inputs]
    out = fn(mod, *xs)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return [t.grad for t in xs]


def _validate(fn, inputs, dtype):
    tol = {torch.bfloat16: 2**-6, torch.float32: 1e-5}[dtype]
    for mode in ("fwd", "full"):
        a, b = _run(cf, fn, inputs, mode), _run(ref, fn, inputs, mode)
        for x, y in zip(a if isinstance(a, (tuple, list)) else [a], b if isinstance(b, (tuple, list)) else [b]):
            err = (x.double() - y.double()).abs().max() / y.double().abs().max()
            if not err <= tol:
                raise SystemExit(f"validation failed ({mode}): relative error {err:.3g} > {tol}")


def _time(mod, fn, inputs, mode):
    t0 = time.perf_counter()
    _run(mod, fn, inputs, mode)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    if not cf.available():
        raise SystemExit("the C++ extension is not built with the fused ops (pip install --no-build-isolation -e .)")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    cases = _cases(dtype)
    for fn, inputs in cases.values():
        _validate(fn, inputs, dtype)
    print("All results match. Starting benchmarks.", file=sys.stderr)
    print("\n".join(header_lines({**machine(), "load_average": " ".join(f"{v:.1f}" for v in os.getloadavg())})))
    print(f"- dtype {args.dtype}, {args.reps} alternating calls per provider, times in ms: median (p20..p80)\n")
    print("| op | mode | fused C++ | reference | reference / fused |")
    print("|---|---|---|---|---|")
    for name, (fn, inputs) in cases.items():
        for mode in ("fwd", "full"):
            times = {"ours": [], "ref": []}
            for _ in range(3):  # warm-up
                _time(cf, fn, inputs, mode), _time(ref, fn, inputs, mode)
            for _ in range(args.reps):
                times["ours"].append(_time(cf, fn, inputs, mode))
                times["ref"].append(_time(ref, fn, inputs, mode))
            cells = []
            for key in ("ours", "ref"):
                q = statistics.quantiles(times[key], n=5)
                cells.append(f"{1e3 * statistics.median(times[key]):.2f} ({1e3 * q[0]:.2f}..{1e3 * q[3]:.2f})")
            ratio = statistics.median(times["ref"]) / statistics.median(times["ours"])
            print(f"| {name} | {mode} | {cells[0]} | {cells[1]} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
