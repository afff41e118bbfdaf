"""NF4 benchmarks: dequantization throughput (PyTorch reference vs C++ vs bitsandbytes), quantization
time, and peak memory of load_model(quantize="nf4") against a full-precision load.

Every row is validated before it is timed (all backends give identical bytes). Throughput counts the
bytes read (packed 4-bit data, absmax) plus the bytes written (the dense output). Median with the
20%-80% spread over --repeats runs. Target on CPU: C++ >= 3x the PyTorch reference.

    python bench/nf4.py [--repeats 7] [--model smollm2-135m-instruct] [--skip-memory]

Sections are separate functions: cpu_dequantize_rows, cpu_quantize_rows, load_memory_rows, and
gpu_rows (the GPU section: the owner of kernels/nf4_triton.py adds the Triton rows there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine, markdown_table  # noqa: E402

from lora_engine import nf4  # noqa: E402
from lora_engine.kernels import nf4_cpp  # noqa: E402
from lora_engine.kernels import nf4_reference as ref  # noqa: E402

SHAPES = [(4096, 4096), (1536, 576)]  # a 7B-class projection; SmolLM2-135M's MLP up_proj


def timed(fn, repeats: int, sync=lambda: None) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) seconds of fn() after one warm-up call."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def _moved_bytes(w, dtype) -> int:
    return w.packed.numel() + w.absmax.numel() * w.absmax.element_size() + w.numel * dtype.itemsize


def _row(name, shape, dtype, w, stats):
    med, lo, hi = stats
    gbs = _moved_bytes(w, dtype) / med / 1e9
    return {"impl": name, "shape": f"{shape[0]}x{shape[1]}", "dtype": str(dtype).removeprefix("torch."),
            "ms": med * 1e3, "ms_p20": lo * 1e3, "ms_p80": hi * 1e3, "GB/s": gbs}


def _bnb():
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        return None
    return bnbF


def cpu_dequantize_rows(repeats: int) -> list[dict]:
    rows = []
    bnbF = _bnb()
    have_cpp = nf4_cpp.available()
    for shape in SHAPES:
        for dtype in (torch.bfloat16, torch.float32):
            w_dense = (torch.randn(shape) * 0.02).to(dtype)
            w = nf4.quantize(w_dense, 64, True, backend="torch")
            want = ref.nf4_dequantize(w, dtype)
            impls = {"torch reference": lambda w=w, d=dtype: ref.nf4_dequantize(w, d)}
            if have_cpp:
                impls["C++ (csrc/nf4.cpp)"] = lambda w=w, d=dtype: nf4.dequantize(w, d, backend="cpp")
            if bnbF is not None:
                packed, state = bnbF.quantize_4bit(w_dense, blocksize=64, compress_statistics=True, quant_type="nf4")
                impls["bitsandbytes"] = lambda p=packed, s=state: bnbF.dequantize_4bit(p, s)
            for name, fn in impls.items():
                got = fn().reshape(shape)
                if not torch.equal(got, want):
                    raise SystemExit(f"{name} disagrees with the reference on {shape} {dtype}: not timing it")
            print("All results match. Starting benchmarks.", shape, dtype, file=sys.stderr)
            for name, fn in impls.items():
                rows.append(_row(name, shape, dtype, w, timed(fn, repeats)))
    return rows


def cpu_quantize_rows(repeats: int) -> list[dict]:
    rows = []
    bnbF = _bnb()
    shape = SHAPES[0]
    w_dense = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    impls = {"torch reference": lambda: nf4.quantize(w_dense, backend="torch")}
    if nf4_cpp.available():
        impls["C++ (csrc/nf4.cpp)"] = lambda: nf4.quantize(w_dense, backend="cpp")
    if bnbF is not None:
        impls["bitsandbytes"] = lambda: bnbF.quantize_4bit(w_dense, blocksize=64, compress_statistics=True,
                                                           quant_type="nf4")
    for name, fn in impls.items():
        med, lo, hi = timed(fn, max(3, repeats // 2))
        rows.append({"impl": name, "shape": f"{shape[0]}x{shape[1]}", "dtype": "bfloat16", "ms": med * 1e3,
                     "ms_p20": lo * 1e3, "ms_p80": hi * 1e3})
    return rows


CHILD = r"""
import json, sys, time
import torch, lora_engine
from lora_engine.quant import nf4
from lora_engine.sources.embedded import resolve_path
resolve_path(sys.argv[1])
with open("/proc/self/status") as f:
    base = next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
t = time.perf_counter()
kw = {"quantize": "nf4", "verbose": False} if sys.argv[2] == "nf4" else {}
model = lora_engine.load_model(sys.argv[1], dtype=torch.float32, **kw)
dt = time.perf_counter() - t
params = {id(p): p for p in model.parameters()}.values()
r = nf4.memory_report(model)
def hwm_mb():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's peak across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
print(json.dumps({"seconds": dt, "peak_mb": hwm_mb(), "runtime_mb": base,
                  "weights_mb": (r["quantized_bytes"] + r["other_bytes"]) / 2**20,
                  "bits_per_param": r["bits_per_param"]}))
"""


def load_memory_rows(model: str) -> list[dict]:
    """Peak RSS of a fresh process loading `model` in fp32, and quantizing it to NF4 while loading."""
    rows = []
    for mode in ("fp32", "nf4"):
        out = subprocess.run([sys.executable, "-c", CHILD, model, mode], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"load ({mode}) failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"load": mode, **r})
    return rows


def gpu_rows(repeats: int) -> list[dict]:
    """GPU section: dequantization GB/s per NF4 backend available on the CUDA device (torch, triton via
    dispatch, cpp = csrc/nf4_dequant.cu when built with CUDA). The Triton NF4 engineer extends this."""
    if not torch.cuda.is_available():
        return []
    rows = []
    sync = torch.cuda.synchronize
    for shape in SHAPES:
        w = nf4.quantize((torch.randn(shape) * 0.02).cuda(), 64, True, backend="torch")
        want = ref.nf4_dequantize(w, torch.bfloat16)
        for backend in ("torch", "triton", "cpp"):
            try:
                got = nf4.dequantize(w, torch.bfloat16, backend=backend)
            except (RuntimeError, NotImplementedError, ImportError) as e:
                print(f"gpu: backend {backend} unavailable ({e})", file=sys.stderr)
                continue
            if not torch.equal(got, want):
                raise SystemExit(f"gpu: backend {backend} disagrees with the reference on {shape}")
            stats = timed(lambda b=backend, w=w: nf4.dequantize(w, torch.bfloat16, backend=b), repeats, sync)
            rows.append(_row(f"{backend} (GPU)", shape, torch.bfloat16, w, stats))
    return rows


def _speedups(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        base = next(b for b in rows if b["impl"] == "torch reference" and b["shape"] == r["shape"]
                    and b["dtype"] == r["dtype"])
        if r is not base:
            out.append(f"- {r['impl']} {r['shape']} {r['dtype']}: {base['ms'] / r['ms']:.2f}x the reference")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--skip-memory", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nf4_cpu.md"))
    a = ap.parse_args()
    info = machine()
    import bitsandbytes

    info["bitsandbytes"] = bitsandbytes.__version__
    info["cpp_extension"] = nf4_cpp.available()
    info["loadavg_1m"] = os.getloadavg()[0]  # a shared machine slows every row; ratios stay comparable
    deq = cpu_dequantize_rows(a.repeats)
    qua = cpu_quantize_rows(a.repeats)
    mem = [] if a.skip_memory else load_memory_rows(a.model)
    lines = ["# NF4 on CPU", "", *header_lines(info), "",
             "## Dequantization (blocksize 64, double quantization)", "", *markdown_table(deq, ".3f"), "", *_speedups(deq), "",
             "## Quantization", "", *markdown_table(qua, ".3f"), "", *_speedups(qua), "",
             f"## Peak memory of load_model({a.model!r}) in a fresh process", "",
             "peak_mb: the process's peak RSS (VmHWM); runtime_mb: its RSS after imports, before loading; "
             "weights_mb: what the loaded model holds. The fp32 weights are ~513 MB: the NF4 load never holds them.",
             "",
             *markdown_table(mem, ".3f"), ""]
    gpu = gpu_rows(a.repeats)
    if gpu:
        lines += ["## GPU dequantization", "", *markdown_table(gpu, ".3f"), ""]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
