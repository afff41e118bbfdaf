"""Kernel benchmarks: Triton vs the PyTorch reference vs torch.compile(reference), per op and mode.

For each op (fused LoRA linear, RMSNorm, RoPE, SwiGLU, chunked linear cross-entropy) and each mode
(fwd, bwd, full = fwd + bwd): median and 20th/80th percentile times (triton.testing.do_bench with
quantiles=[0.5, 0.2, 0.8] on a GPU, a simple timer on CPU), TFLOP/s or GB/s, and that rate as a
fraction of the device ceiling measured in the same run (copy bandwidth of a 1 GiB clone, bf16 /
fp32 matmul rate). Beside them: PEFT's unfused LoRA path (reference.lora_linear: three matmuls)
and the base matmul alone (the LoRA target is fused fwd+bwd <= 1.1x base), the unfused
cross-entropy (full logits) with the peak memory of each CE path (GPU only).

Every provider is validated against the reference before it is timed. Rows are appended to
bench/results/kernels.csv (date, git revision, device, versions) and a markdown table is written
to bench/results/kernels_<gpu|cpu>.md (atomically).

    python bench/kernel_bench.py                       # GPU: Llama-3-8B shapes; CPU: small shapes
    python bench/kernel_bench.py --tokens 512 2048 --no-compile --out-dir $OUT
    python bench/kernel_bench.py --tokens 512 2048 8192 --compile-tokens 2048   # what bench/gpu_check.sh runs

Targets (GPU only, checked by reading the table, not asserted): LoRA full <= 1.1x base; RMSNorm,
RoPE, SwiGLU >= 85% of copy bandwidth; chunked CE <= 1.1x the unfused time with >= 4x less memory.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine  # noqa: E402

from lora_engine.kernels import ops_reference as ref  # noqa: E402

GPU_SHAPES = dict(hidden=4096, inter=14336, vocab=128256, r=16, heads=32, kv_heads=8, head_dim=128)
CPU_SHAPES = dict(hidden=256, inter=688, vocab=2048, r=16, heads=4, kv_heads=2, head_dim=64)
MODES = ("fwd", "bwd", "full")


# ---- timing -------------------------------------------------------------------------------------

def bench(fn, cuda: bool, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) milliseconds."""
    if cuda:
        import triton.testing

        return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=reps * 10))
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=5, method="inclusive") if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def ceilings(dev: str, dtype: torch.dtype, reps: int) -> dict:
    """Measured copy bandwidth (GB/s) and matmul rate (TFLOP/s) of this device."""
    cuda = dev == "cuda"
    n = (1 << 30) // 4 if cuda else (1 << 26) // 4
    a = torch.empty(n, dtype=torch.float32, device=dev)
    ms = bench(lambda: a.clone(), cuda, reps)[0]
    copy_gbs = 2 * a.numel() * 4 / ms / 1e6
    m = 8192 if cuda else 1024
    x = torch.randn(m, m, dtype=dtype, device=dev)
    ms = bench(lambda: x @ x, cuda, reps)[0]
    return {"copy_GB/s": copy_gbs, "matmul_TFLOP/s": 2 * m**3 / ms / 1e9}


# ---- ops: (inputs, providers, work) -------------------------------------------------------------

def _randn(*shape, dev, dtype, grad=True, scale=1.0):
    return (torch.randn(*shape, device=dev, dtype=dtype) * scale).requires_grad_(grad)


def op_cases(name: str, tokens: int, s: dict, dev: str, dtype: torch.dtype):
    """-> (inputs, {provider: fn(*inputs)}, {mode: flops} or None, bytes moved fwd, bytes moved bwd)."""
    from lora_engine import dispatch

    tri = dispatch.triton_ops()

    use_triton = dev == "cuda"
    H, F, V, r = s["hidden"], s["inter"], s["vocab"], s["r"]
    it = torch.tensor([], dtype=dtype).element_size()
    if name == "lora_linear":  # the MLP's up projection: (tokens, H) -> (tokens, F)
        x = _randn(tokens, H, dev=dev, dtype=dtype)
        w = _randn(F, H, dev=dev, dtype=dtype, grad=False, scale=H**-0.5)
        a = _randn(r, H, dev=dev, dtype=dtype, scale=H**-0.5)
        b = _randn(F, r, dev=dev, dtype=dtype, scale=r**-0.5)
        provs = {"reference (PEFT unfused)": lambda x, w, a, b: ref.lora_linear(x, w, None, a, b, 2.0),
                 "base matmul only": lambda x, w, a, b: x @ w.t()}
        if use_triton:
            provs["triton (fused)"] = lambda x, w, a, b: tri.lora_linear(x, w, None, a, b, 2.0)
        one = 2 * tokens * H * F + 2 * tokens * r * (H + F)  # W frozen: backward is dx alone, one matmul
        return [x, w, a, b], provs, {"fwd": one, "bwd": one, "full": 2 * one}, None, None
    if name == "rms_norm":
        x = _randn(tokens, H, dev=dev, dtype=dtype)
        w = _randn(H, dev=dev, dtype=dtype, grad=False)
        provs = {"reference": lambda x, w: ref.rms_norm(x, w, 1e-5)}
        if use_triton:
            provs["triton"] = lambda x, w: tri.rms_norm(x, w, 1e-5)
        return [x, w], provs, None, 2 * tokens * H * it, 3 * tokens * H * it
    if name == "rope":
        hd, hq, hk = s["head_dim"], s["heads"], s["kv_heads"]
        b, t = max(1, tokens // 2048), min(tokens, 2048)
        q = _randn(b, t, hq, hd, dev=dev, dtype=dtype).transpose(1, 2)  # the model's layout
        k = _randn(b, t, hk, hd, dev=dev, dtype=dtype).transpose(1, 2)
        ang = torch.rand(b, t, hd // 2, device=dev) * 6.28
        cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
        provs = {"reference": lambda q, k, c, s_: ref.rope(q, k, c, s_)}
        if use_triton:
            provs["triton"] = lambda q, k, c, s_: tri.rope(q, k, c, s_)
        moved = 2 * b * t * (hq + hk) * hd * it
        return [q, k, cos, sin], provs, None, moved, moved
    if name == "swiglu":
        g, u = _randn(tokens, F, dev=dev, dtype=dtype), _randn(tokens, F, dev=dev, dtype=dtype)
        provs = {"reference": ref.swiglu}
        if use_triton:
            provs["triton"] = tri.swiglu
        return [g, u], provs, None, 3 * tokens * F * it, 5 * tokens * F * it
    if name == "linear_cross_entropy":
        h = _randn(tokens, H, dev=dev, dtype=dtype)
        w = _randn(V, H, dev=dev, dtype=dtype, grad=False, scale=H**-0.5)
        labels = torch.randint(0, V, (tokens,), device=dev)
        provs = {"reference (chunked)": lambda h, w: ref.linear_cross_entropy(h, w, labels),
                 "unfused (full logits)": lambda h, w: ref.cross_entropy_unfused(h, w, labels)}
        if use_triton:
            provs["triton (chunked)"] = lambda h, w: tri.linear_cross_entropy(h, w, labels)
        # Head matmul + dh matmul (head frozen). The chunked paths do both in forward, so only "full"
        # compares like with like; fwd/bwd get no rate.
        return [h, w], provs, {"fwd": None, "bwd": None, "full": 4 * tokens * H * V}, None, None
    raise ValueError(name)


OPS = ("lora_linear", "rms_norm", "rope", "swiglu", "linear_cross_entropy")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def run_op(name, tokens, shapes, dev, dtype, reps, compile_ref, ceil, sink):
    cuda = dev == "cuda"
    inputs, provs, flops, bytes_fwd, bytes_bwd = op_cases(name, tokens, shapes, dev, dtype)
    base_key = next(iter(provs))
    if compile_ref:
        provs[f"torch.compile({base_key.split(' ')[0]})"] = torch.compile(provs[base_key])
    grads_of = [t for t in inputs if t.requires_grad]
    # Validate, then time.
    want = _first(provs[base_key](*inputs)).float()
    for pname, fn in provs.items():
        if "base" in pname:
            continue
        got = _first(fn(*inputs)).float()
        err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-6)
        if not err < 5e-2:
            raise RuntimeError(f"{name}/{pname}: result differs from the reference by {err:.3g} (relative max)")
    for pname, fn in provs.items():
        def fwd(fn=fn):
            return fn(*inputs)

        out = fwd()
        outs = out if isinstance(out, tuple) else (out,)
        douts = [torch.randn_like(o) for o in outs]

        def bwd(outs=outs, douts=douts):
            torch.autograd.grad(outs, grads_of, douts, retain_graph=True, allow_unused=True)

        def full(fn=fn):
            o = fn(*inputs)
            o = o if isinstance(o, tuple) else (o,)
            torch.autograd.grad(o, grads_of, [torch.ones_like(t) for t in o], allow_unused=True)

        for mode, f in (("fwd", fwd), ("bwd", bwd), ("full", full)):
            peak_mb = float("nan")
            if cuda:  # one call alone: do_bench's own 256 MB cache-flush buffer must not count
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base_mem = torch.cuda.memory_allocated()
                f()
                torch.cuda.synchronize()
                peak_mb = (torch.cuda.max_memory_allocated() - base_mem) / 2**20
            med, lo, hi = bench(f, cuda, reps)
            if flops is not None:
                work = flops[mode]
                rate = work / med / 1e9 if work else float("nan")
                unit, frac = "TFLOP/s", rate / ceil["matmul_TFLOP/s"]
            else:
                moved = bytes_fwd if mode == "fwd" else bytes_bwd if mode == "bwd" else bytes_fwd + bytes_bwd
                rate, unit, frac = moved / med / 1e6, "GB/s", moved / med / 1e6 / ceil["copy_GB/s"]
            sink.append(dict(op=name, tokens=tokens, dtype=str(dtype).removeprefix("torch."), provider=pname,
                             mode=mode, ms=med, ms_p20=lo, ms_p80=hi, rate=rate, unit=unit, of_ceiling=frac,
                             peak_MiB=peak_mb))
            print(f"{name:22s} {tokens:6d} {pname:28s} {mode:4s} {med:9.3f} ms  {rate:9.1f} {unit:7s} "
                  f"{100 * frac:5.1f}%  peak {peak_mb:9.1f} MiB", flush=True)
        del out, outs, douts


# ---- output -------------------------------------------------------------------------------------

FIELDS = ["date", "git", "device", "torch", "triton", "op", "tokens", "dtype", "provider", "mode", "ms",
          "ms_p20", "ms_p80", "rate", "unit", "of_ceiling", "peak_MiB"]


def append_csv(rows: list[dict], info: dict, out_dir: Path):
    """Append rows to kernels.csv (one run adds rows, never rewrites others')."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / "kernels.csv"
    new = not csv_path.exists()
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"date": info["date"], "git": info["git"], "device": info.get("gpu", "cpu"),
                        "torch": info["torch"], "triton": info["triton"],
                        **{k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}})


def write_table(rows: list[dict], info: dict, ceil: dict, out_dir: Path, failures: list[str]) -> Path:
    """The markdown table of this run so far, written atomically (temp file, fsync, rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"# Kernel benchmarks ({info.get('gpu', 'cpu')})", "", *header_lines(info),
             f"- ceilings measured in this run: copy {ceil['copy_GB/s']:.3g} GB/s, "
             f"matmul {ceil['matmul_TFLOP/s']:.3g} TFLOP/s",
             "- a fraction above 100% means the ceiling was measured while something else used the device "
             "(a shared CPU); compare providers within one run, not against the ceiling, then", "",
             "| op | tokens | dtype | provider | mode | ms (median) | p20-p80 | rate | % of ceiling | peak MiB |",
             "|---|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['tokens']} | {r['dtype']} | {r['provider']} | {r['mode']} | {r['ms']:.3f} | "
                     f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f} | {r['rate']:.3g} {r['unit']} | "
                     f"{100 * r['of_ceiling']:.1f} | {r['peak_MiB']:.0f} |")
    if failures:
        lines += ["", "## Failures", "", *[f"- {f}" for f in failures]]
    md = out_dir / f"kernels_{'gpu' if 'gpu' in info else 'cpu'}.md"
    with tempfile.NamedTemporaryFile("w", dir=out_dir, delete=False, suffix=".tmp") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(f.name, md)
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--tokens", type=int, nargs="+", help="default: 512 2048 8192 on GPU, 128 512 on CPU")
    ap.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="default bf16 on GPU, fp32 on CPU")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also time torch.compile of the reference")
    ap.add_argument("--compile-tokens", type=int, nargs="+",
                    help="token counts at which torch.compile is timed (default: all); each shape recompiles")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"))
    a = ap.parse_args(argv)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/kernel_bench.py: --device cuda but no CUDA GPU is visible")
    dtype = getattr(torch, a.dtype or ("bfloat16" if dev == "cuda" else "float32"))
    shapes = GPU_SHAPES if dev == "cuda" else CPU_SHAPES
    tokens = a.tokens or ([512, 2048, 8192] if dev == "cuda" else [128, 512])
    info = machine()
    ceil = ceilings(dev, dtype, a.reps)
    print(f"ceilings: {ceil}")
    rows, failures = [], []
    out_dir = Path(a.out_dir)
    for name in a.ops:
        for n in tokens:
            new: list[dict] = []
            try:
                with_compile = a.compile and (a.compile_tokens is None or n in a.compile_tokens)
                run_op(name, n, shapes, dev, dtype, a.reps, with_compile, ceil, new)
            except Exception as e:  # one op failing must not lose the others' numbers
                failures.append(f"{name} tokens={n}: {type(e).__name__}: {str(e)[:300]}")
                print("FAILED", failures[-1], flush=True)
            # Written after every case, so a run stopped by a time limit keeps what it measured.
            append_csv(new, info, out_dir)
            rows += new
            md = write_table(rows, info, ceil, out_dir, failures)
            if dev == "cuda":
                torch.cuda.empty_cache()
    print(f"wrote {md} and appended {len(rows)} rows to {out_dir / 'kernels.csv'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
