"""Helpers of the kernel tests: when Triton can run here, and the one comparison rule.

The rule (STYLE.md): a kernel in dtype d is right when |ours - ref64| <= 2 * |torch_d - ref64| + eps,
elementwise, where ref64 is the PyTorch reference in float64 and torch_d the same reference run in
d. So a kernel may be as wrong as PyTorch itself in that dtype, twice over, and no more; eps
(rtol * |ref64| + atol, from tests/conftest.py's TOLERANCE) covers the one rounding on store
(and, for bf16 under TRITON_INTERPRET, the store that truncates instead of rounding).
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.conftest import TOLERANCE

DTYPE_KIND = {torch.float32: "kernel_fp32", torch.float16: "kernel_fp16", torch.bfloat16: "kernel_bf16"}

needs_triton = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="run with TRITON_INTERPRET=1 (CI does)",
)


def device() -> str:
    """Where the kernels under test run: the GPU when there is one and the interpreter is off."""
    return "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def assert_as_accurate(ours: torch.Tensor, same: torch.Tensor, ref64: torch.Tensor, name: str = "output",
                       compute_dtype: torch.dtype | None = None):
    """|ours - ref64| <= 2 |same - ref64| + rtol |ref64| + atol, elementwise; same is torch in ours' dtype.

    rtol and atol are those of compute_dtype (the inputs' precision; default ours' dtype): an fp32
    result computed from bf16 inputs went through bf16 roundings on the way.
    """
    if ours.shape != ref64.shape or ours.dtype != same.dtype:
        raise AssertionError(f"{name}: ours {tuple(ours.shape)} {ours.dtype}, reference {tuple(ref64.shape)} "
                             f"{same.dtype}")
    rtol, atol = TOLERANCE[DTYPE_KIND[compute_dtype or ours.dtype]]
    r = ref64.double()
    err = (ours.double().to(r.device) - r).abs()
    bound = 2 * (same.double().to(r.device) - r).abs() + rtol * r.abs() + atol
    bad = ~(err <= bound)  # also catches NaN
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        err, r = err.cpu(), r.cpu()
        raise AssertionError(
            f"{name} ({ours.dtype}): {int(bad.sum())} of {err.numel()} elements off; first at {i}: ours "
            f"{ours.double().cpu()[i]:.6g}, torch {same.double().cpu()[i]:.6g}, fp64 {r[i]:.6g}; worst error "
            f"{err.max():.3g}"
        )


def run_with_grads(fn, inputs: list[torch.Tensor], grad_outs: list[torch.Tensor] | None, dtype: torch.dtype,
                   dev: str = "cpu", needs_grad: tuple[bool, ...] | None = None):
    """Cast inputs (float ones to dtype), run fn, backpropagate grad_outs; -> (outputs, input grads).

    inputs and grad_outs are float64 masters, so the same values feed every dtype (the low-precision
    copies are the masters rounded once). Non-float inputs pass through unchanged.
    """
    xs = []
    for i, t in enumerate(inputs):
        t = t.to(dev)
        if t.is_floating_point():
            t = t.to(dtype).requires_grad_(needs_grad[i] if needs_grad else True)
        xs.append(t)
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads_in = [x for x in xs if x.requires_grad]
    if grad_outs is None:
        grads = torch.autograd.grad(outs[0], grads_in)
    else:
        gos = [g.to(dev).to(o.dtype) for g, o in zip(grad_outs, outs)]
        grads = torch.autograd.grad(outs, grads_in, gos)
    return [o.detach() for o in outs], list(grads)


def check_op(ours_fn, ref_fn, inputs, grad_outs, dtype, dev, needs_grad=None, names=None, ref_dev="cpu"):
    """Forward and backward of ours_fn in dtype against ref_fn in dtype and in float64 (the rule above)."""
    o_out, o_g = run_with_grads(ours_fn, inputs, grad_outs, dtype, dev, needs_grad)
    s_out, s_g = run_with_grads(ref_fn, inputs, grad_outs, dtype, ref_dev, needs_grad)
    r_out, r_g = run_with_grads(ref_fn, inputs, grad_outs, torch.float64, ref_dev, needs_grad)
    for i, (a, b, c) in enumerate(zip(o_out, s_out, r_out)):
        assert_as_accurate(a, b, c, f"output {i}", dtype)
    for i, (a, b, c) in enumerate(zip(o_g, s_g, r_g)):
        assert_as_accurate(a, b, c, f"grad of {names[i] if names else i}", dtype)
