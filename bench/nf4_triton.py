"""NF4 Triton kernels on a GPU: dequantization GB/s, and where fused dequant+matmul stops paying.

Two sections, each validated before it is timed ("All results match. Starting benchmarks."):
  dequant   kernels/nf4_triton.py:nf4_dequantize against the PyTorch reference and bitsandbytes'
            dequantize_4bit, in GB/s (packed + absmax read, dense output written) and as a fraction
            of the copy bandwidth measured in the same run (clone of a 1 GiB tensor).
  matmul    for rows M in 1..8192 at weights 4096x4096 and 14336x4096 (bf16): the fused kernel
            (nf4_matmul) against dequantize + cuBLAS, forward y = x W^T and backward dX = dY W, with
            the dense cuBLAS matmul as the floor. The crossover row count is what
            nf4_triton.FUSED_MAX_ROWS should be on this GPU; the script prints both.
Median and the 20%-80% spread (triton.testing.do_bench). Results are printed and appended to
bench/results/nf4_triton.md with machine, versions, git revision and date. About a minute on an
H200 (most of it compiling the kernels).

    python bench/nf4_triton.py [--rows 1,16,...] [--out FILE]
    TRITON_INTERPRET=1 python bench/nf4_triton.py --smoke   # tiny shapes on CPU: checks the script only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine, markdown_table  # noqa: E402

from lora_engine import nf4  # noqa: E402
from lora_engine.io import atomic
from lora_engine.kernels import nf4_reference as ref  # noqa: E402
from lora_engine.kernels import nf4_triton as tri  # noqa: E402
from lora_engine.kernels.nf4_format import NF4Tensor  # noqa: E402

ROWS = [1, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
SHAPES = [(4096, 4096), (14336, 4096)]  # (out, in): a 7B-class attention projection; Llama-3-8B's up_proj


def timer(device: str):
    """fn -> (median, p20, p80) seconds. CUDA: triton's do_bench (L2 flushed); CPU: perf_counter."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: tuple(t / 1e3 for t in do_bench(fn, quantiles=[0.5, 0.2, 0.8]))

    def cpu(fn):  # only the --smoke run gets here: one call, the numbers mean nothing
        t = time.perf_counter()
        fn()
        t = time.perf_counter() - t
        return t, t, t

    return cpu


def quantize(shape, device) -> tuple[torch.Tensor, NF4Tensor]:
    """(dense fp32 weight, its double-quantized NF4 form, byte-identical to bitsandbytes')."""
    dense = (torch.randn(shape) * 0.02).to(device)
    return dense, nf4.quantize(dense, 64, True, backend="torch")


def bnb_dequantizer(dense: torch.Tensor, dtype: torch.dtype):
    """bitsandbytes' dequantize_4bit of the same weight, or None (with the reason) where it cannot run."""
    try:
        import bitsandbytes.functional as bnbF

        q, s = bnbF.quantize_4bit(dense, blocksize=64, compress_statistics=True, quant_type="nf4")
    except (ImportError, RuntimeError, OSError) as e:  # not installed, or no binary for this device
        print(f"bitsandbytes unavailable on {dense.device} ({type(e).__name__}: {e}): its row is skipped",
              file=sys.stderr)
        return None
    s.dtype = dtype  # bnb dequantizes to its state's dtype
    return lambda: bnbF.dequantize_4bit(q, s, quant_type="nf4")


def copy_gbs(device: str, time_it, nbytes: int) -> float:
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    med = time_it(lambda: x.clone())[0]
    return 2 * nbytes / med / 1e9  # read + write


def dequant_rows(device, time_it, shapes, copy) -> list[dict]:
    rows = []
    for shape in shapes:
        dense, w = quantize(shape, device)
        for dtype in (torch.bfloat16, torch.float16):
            impls = {"triton": lambda w=w, d=dtype: tri.nf4_dequantize(w, d),
                     "torch reference": lambda w=w, d=dtype: ref.nf4_dequantize(w, d)}
            bnb = bnb_dequantizer(dense, dtype)
            if bnb is not None:
                impls["bitsandbytes"] = bnb
            want = ref.nf4_dequantize(w, dtype)
            for name, fn in impls.items():
                got = fn().view(shape)
                same = torch.equal(got, want)
                if device == "cpu" and name == "triton" and dtype == torch.bfloat16:
                    same = bool(((got.float() - want.float()).abs() <= want.float().abs() / 64).all())  # truncation
                if not same:
                    raise SystemExit(f"{name} dequantization disagrees with the reference on {shape} {dtype}")
            print(f"All results match. Starting benchmarks. dequant {shape} {dtype}", file=sys.stderr)
            moved = w.packed.numel() + w.absmax.numel() + w.numel * dtype.itemsize
            for name, fn in impls.items():
                med, lo, hi = time_it(fn)
                gbs = moved / med / 1e9
                rows.append({"impl": name, "shape": f"{shape[0]}x{shape[1]}", "dtype": str(dtype)[6:],
                             "us": med * 1e6, "us_p20": lo * 1e6, "us_p80": hi * 1e6, "GB/s": gbs,
                             "of copy": gbs / copy})
    return rows


def _close(a, b, what):
    err = float((a.float() - b.float()).abs().max())
    if err > 2e-2 * float(b.float().abs().max()) + 1e-3:
        raise SystemExit(f"{what}: fused and dequantize+matmul differ by {err:.3g}: not timing it")


def matmul_rows(device, time_it, shapes, row_counts) -> list[dict]:
    rows = []
    dtype = torch.bfloat16
    for shape in shapes:
        w = quantize(shape, device)[1]
        n_out, n_in = shape
        dense = tri.nf4_dequantize(w, dtype)
        for m in row_counts:
            x = torch.randn(m, n_in, device=device, dtype=dtype)
            dy = torch.randn(m, n_out, device=device, dtype=dtype)
            impls = {
                ("fwd", "fused"): lambda x=x, w=w: tri.nf4_matmul(x, w, transpose=True),
                ("fwd", "dequant+matmul"): lambda x=x, w=w: F.linear(x, tri.nf4_dequantize(w, dtype)),
                ("fwd", "dense matmul"): lambda x=x, d=dense: F.linear(x, d),
                ("bwd dX", "fused"): lambda dy=dy, w=w: tri.nf4_matmul(dy, w, transpose=False),
                ("bwd dX", "dequant+matmul"): lambda dy=dy, w=w: dy @ tri.nf4_dequantize(w, dtype),
                ("bwd dX", "dense matmul"): lambda dy=dy, d=dense: dy @ d,
            }
            for op in ("fwd", "bwd dX"):
                _close(impls[(op, "fused")](), impls[(op, "dense matmul")](), f"{op} {shape} M={m}")
            flops = 2 * m * n_out * n_in
            for (op, name), fn in impls.items():
                med, lo, hi = time_it(fn)
                rows.append({"op": op, "impl": name, "shape": f"{shape[0]}x{shape[1]}", "M": m, "us": med * 1e6,
                             "us_p20": lo * 1e6, "us_p80": hi * 1e6, "TFLOP/s": flops / med / 1e12})
        print(f"All results match. matmul {shape} timed", file=sys.stderr)
    return rows


def crossover(rows: list[dict]) -> list[str]:
    """Per shape and op: the row counts at which fused beats dequant+matmul, and the time ratios."""
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for op in ("fwd", "bwd dX"):
            t = {(r["impl"], r["M"]): r["us"] for r in rows if r["shape"] == shape and r["op"] == op}
            ms = sorted({m for _, m in t})
            wins = [m for m in ms if t[("fused", m)] < t[("dequant+matmul", m)]]
            ratios = ", ".join(f"M={m}: {t[('dequant+matmul', m)] / t[('fused', m)]:.2f}x" for m in ms)
            out.append(f"- {shape} {op}: fused faster at M in {wins or 'none'} "
                       f"(FUSED_MAX_ROWS = {tri.FUSED_MAX_ROWS}); dequant+matmul time / fused time: {ratios}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated row counts M")
    ap.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False,
                    help="tiny shapes on CPU under TRITON_INTERPRET=1: exercises the script, measures nothing")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "nf4_triton.md"))
    a = ap.parse_args(argv)
    row_counts = [int(r) for r in a.rows.split(",")]
    if a.smoke:
        device, shapes, row_counts, copy_bytes = "cpu", [(40, 72)], [1, 20], 1 << 20
    elif torch.cuda.is_available():
        device, shapes, copy_bytes = "cuda", SHAPES, 1 << 30
    else:
        raise SystemExit("bench/nf4_triton.py measures the Triton kernels on a CUDA GPU and none is visible; "
                         "use --smoke with TRITON_INTERPRET=1 to check the script on CPU")
    time_it = timer(device)
    info = machine()
    copy = copy_gbs(device, time_it, copy_bytes)
    deq = dequant_rows(device, time_it, shapes, copy)
    mm = matmul_rows(device, time_it, shapes, row_counts)
    lines = [f"# NF4 Triton kernels ({'smoke run on CPU, numbers meaningless' if a.smoke else device})", "",
             *header_lines(info), f"- copy bandwidth (clone of {copy_bytes >> 20} MiB): {copy:.1f} GB/s", "",
             "## Dequantization (blocksize 64, double-quantized absmax)", "", *markdown_table(deq, ".3g"), "",
             "## Fused dequant+matmul vs dequantize + cuBLAS (bf16)", "", *markdown_table(mm, ".3g"), "", *crossover(mm), "", ""]
    text = "\n".join(lines)
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out, (out.read_text() if out.exists() else "") + text)  # append, atomically
    return deq, mm


if __name__ == "__main__":
    main()
