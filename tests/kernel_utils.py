"""Helpers of the kernel tests: when Triton can run here, and the one accuracy rule.

The rule (STYLE.md), scale-aware: a kernel computing in dtype d is right when, elementwise,

    |ours - ref64| <= 2 |torch_d - ref64| + rtol_d |ref64| + atol_d * scale

where ref64 is the PyTorch reference in float64 and torch_d the same reference run in d. So a
kernel may be as wrong as PyTorch itself in that dtype, twice over, plus one rounding of each
element (rtol) and a summation-order error relative to the magnitude of what was summed (atol
times scale: max |ref64| over the tensor, or |a| @ |b| for a product a @ b). An absolute atol
would pass anything on tensors much smaller than 1 and nothing on tensors much larger; this one
scales with the data. (rtol_d, atol_d) and their reasons: TOLERANCE["kernel_<d>"], tests/conftest.py.
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


def assert_accurate(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, *,
                    same: torch.Tensor | None = None, scale: torch.Tensor | float | None = None,
                    name: str = "output"):
    """The rule above: |ours - ref| <= 2 |same - ref| + rtol |ref| + atol * scale, elementwise.

    ref: the reference, in float64 where there is one; same: the reference run in ours' dtype (omit
    it when ref is itself computed at ours' precision, e.g. an fp32 op against the fp32 reference);
    scale: the magnitude rounding errors scale with, max |ref| by default. rtol and atol are those
    of dtype, the precision the inputs were computed in (default ours' dtype): an fp32 result
    computed from bf16 inputs went through bf16 roundings on the way.
    """
    if ours.shape != ref.shape or (same is not None and (same.dtype != ours.dtype or same.shape != ours.shape)):
        raise AssertionError(f"{name}: ours {tuple(ours.shape)} {ours.dtype}, reference {tuple(ref.shape)}"
                             + ("" if same is None else f", same-dtype reference {tuple(same.shape)} {same.dtype}"))
    rtol, atol = TOLERANCE[DTYPE_KIND[dtype or ours.dtype]]
    r = ref.detach().double()  # on ref's device: the GPU tests' tensors are large
    err = (ours.detach().double().to(r.device) - r).abs()
    torch_err = 0 if same is None else (same.detach().double().to(r.device) - r).abs()
    if scale is None:
        scale = r.abs().max() if r.numel() else 0.0
    elif isinstance(scale, torch.Tensor):
        scale = scale.detach().double().to(r.device)
    bound = 2 * torch_err + rtol * r.abs() + atol * scale
    bad = ~(err <= bound)  # also catches NaN
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        r, bound = r.cpu(), bound.cpu()
        torch_at = "" if same is None else f", torch {same.double().cpu()[i]:.6g}"
        raise AssertionError(
            f"{name} ({ours.dtype}): {int(bad.sum())} of {err.numel()} elements off; first at {i}: ours "
            f"{ours.double().cpu()[i]:.6g}{torch_at}, reference {r[i]:.6g}, allowed error {bound[i]:.3g}; "
            f"worst error {err.max():.3g}"
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
        assert_accurate(a, c, dtype, same=b, name=f"output {i}")
    for i, (a, b, c) in enumerate(zip(o_g, s_g, r_g)):
        assert_accurate(a, c, dtype, same=b, name=f"grad of {names[i] if names else i}")


class LaunchSpy:
    """Stands in for a @triton.jit kernel of a module and records each launch (grid, arguments,
    meta-parameters) before running the real kernel: the proof of which kernel ran, with which tiles.

        spy = LaunchSpy(monkeypatch, rms_norm_triton, "_rms_fwd")
        ...; assert spy.launches[0]["BLOCK_D"] == 8192
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module, name: str):
        self.kernel = getattr(module, name)
        self.launches: list[dict] = []
        monkeypatch.setattr(module, name, self)

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append({"grid": grid, "args": args, **meta})
            return self.kernel[grid](*args, **meta)

        return launch
