"""Two kernel figures against what the device itself can do, measured in the same run.

    python bench/gpu_kernels.py --out-dir DIR [--dry-run]

nf4 dequant: kernels/nf4_triton.py:nf4_dequantize of Llama-3-8B's up_proj (14336 x 4096, double-quantized,
  64-blocks) to bf16, checked equal to the PyTorch reference, in GB/s counting 0.5 byte read and 2 bytes
  written per weight, as a fraction of the copy bandwidth measured here (clone of a 1 GiB tensor: read + write).
fused LoRA: kernels/lora_linear_triton.py:lora_linear (r=16, scale 2) forward + backward (dx, dA, dB) at
  8,192 tokens of the same projection, as a multiple of the base matmuls alone (x W^T forward, dy W
  backward: W is frozen, so the base has no weight gradient); 1.0x would make the adapter free.
Medians and the 20%-80% spread of triton.testing.do_bench (bench/kernel_bench.py: bench). --dry-run: the
PyTorch references on CPU at tiny shapes, checking the code only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from gpu_common import Rows, add_common_args, oom_or_error  # noqa: E402
from gpu_common import device as pick_device  # noqa: E402
from kernel_bench import bench  # noqa: E402

from lora_engine import dispatch  # noqa: E402
from lora_engine.kernels import nf4_reference, ops_reference  # noqa: E402
from lora_engine.quant import nf4  # noqa: E402


def copy_gbs(dev: str, reps: int) -> float:
    x = torch.empty((1 << 30) if dev == "cuda" else (1 << 24), dtype=torch.uint8, device=dev)
    ms = bench(lambda: x.clone(), dev == "cuda", reps)[0]
    return 2 * x.numel() / ms / 1e6


def nf4_dequant(dev: str, shape, copy: float, reps: int) -> str:
    w = nf4.quantize((torch.randn(shape) * 0.02).to(dev), 64, True, backend="torch")
    impl = nf4_reference.nf4_dequantize
    if dev == "cuda":
        from lora_engine.kernels import nf4_triton

        impl = nf4_triton.nf4_dequantize
    want = nf4_reference.nf4_dequantize(w, torch.bfloat16)
    if not torch.equal(impl(w, torch.bfloat16), want):
        raise SystemExit(f"nf4_dequantize disagrees with the reference at {shape}: not timing it")
    ms, lo, hi = bench(lambda: impl(w, torch.bfloat16), dev == "cuda", reps)
    gbs = w.numel * 2.5 / ms / 1e6  # 0.5 byte read + 2 bytes written per weight
    return (f"NF4 dequantize {shape[0]}x{shape[1]} -> bf16 ({'triton' if dev == 'cuda' else 'torch reference'}): "
            f"{ms * 1e3:.0f} us ({lo * 1e3:.0f}..{hi * 1e3:.0f}), {gbs:.3g} GB/s = {gbs / copy:.0%} of the copy "
            f"bandwidth {copy:.3g} GB/s")


def fused_lora(dev: str, tokens: int, shape, r: int, reps: int) -> str:
    n_out, n_in = shape
    dt = torch.bfloat16
    x = torch.randn(tokens, n_in, device=dev, dtype=dt, requires_grad=True)
    w = torch.randn(n_out, n_in, device=dev, dtype=dt) * n_in**-0.5
    a = (torch.randn(r, n_in, device=dev, dtype=dt) * n_in**-0.5).requires_grad_()
    b = (torch.randn(n_out, r, device=dev, dtype=dt) * r**-0.5).requires_grad_()
    dy = torch.randn(tokens, n_out, device=dev, dtype=dt)
    lora = dispatch.triton_ops().lora_linear if dev == "cuda" else ops_reference.lora_linear
    ref = ops_reference.lora_linear(x, w, None, a, b, 2.0)
    got = lora(x, w, None, a, b, 2.0)
    err = float((got.detach().float() - ref.detach().float()).abs().max())
    if err > 2e-2 * float(ref.detach().float().abs().max()) + 1e-3:
        raise SystemExit(f"fused lora_linear differs from the reference by {err:.3g}: not timing it")

    def fused():
        torch.autograd.backward(lora(x, w, None, a, b, 2.0), dy, inputs=[x, a, b])

    def base():
        x.detach() @ w.t()
        dy @ w

    t_fused, lo, hi = bench(fused, dev == "cuda", reps)
    t_base = bench(base, dev == "cuda", reps)[0]
    return (f"fused LoRA forward+backward, {tokens:,} tokens x {n_in}->{n_out}, r={r} "
            f"({'triton' if dev == 'cuda' else 'torch reference'}): {t_fused * 1e3:.0f} us ({lo * 1e3:.0f}.."
            f"{hi * 1e3:.0f}) = {t_fused / t_base:.2f}x the base matmuls alone ({t_base * 1e3:.0f} us)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    dev = pick_device(a.dry_run)
    rows = Rows(a.out_dir, "gpu-kernels", a.dry_run)
    reps = 2 if a.dry_run else a.reps
    shape = (256, 128) if a.dry_run else (14336, 4096)
    failed = 0
    try:
        copy = copy_gbs(dev, reps)
        rows.add("kernels nf4 dequant", nf4_dequant(dev, shape, copy, reps), copy_gbs=copy)
    except Exception as e:  # noqa: BLE001  (the next figure still runs)
        rows.add("kernels nf4 dequant", "NF4 dequantize", ok=False, why=oom_or_error(e))
        failed = 1
    try:
        rows.add("kernels fused lora", fused_lora(dev, 64 if a.dry_run else 8192, shape, 16, reps))
    except Exception as e:  # noqa: BLE001
        rows.add("kernels fused lora", "fused LoRA", ok=False, why=oom_or_error(e))
        failed = 1
    sys.exit(failed)


if __name__ == "__main__":
    main()
