"""SwiGLU: y = silu(gate) * up, elementwise, with its backward.

Shapes: gate and up are any (..., F) tensors of the same shape and dtype (fp32, fp16, bf16); y has
that shape and dtype. Both are flattened to one contiguous vector of n elements; one program
handles BLOCK consecutive elements.

Backward, with s = sigmoid(gate), silu(gate) = gate * s and dsilu/dgate = s * (1 + gate * (1 - s)):

    d gate = dy * up * s * (1 + gate * (1 - s))
    d up   = dy * gate * s

Saved: gate and up (the inputs; the model keeps them alive anyway as the down_proj input's
parents). Recomputed in backward: s. Math in fp32, one rounding on store.

Memory-bound: forward reads 2n and writes n elements, backward reads 3n and writes 2n; the
benchmark (bench/kernel_bench.py) reports GB/s against the measured copy bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_engine.kernels._common import check_float, check_same, kernel_op, launch_device

BLOCK = 1024


@triton.jit
def _swiglu_fwd(gate_ptr, up_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # Load and widen at once: under TRITON_INTERPRET bf16 is held as raw uint16 and bf16 arithmetic
    # gives garbage; the conversion to fp32 is exact (docs/triton_interpreter.md).
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * g * s
    tl.store(dgate_ptr + offs, dg.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, du.to(dup_ptr.dtype.element_ty), mask=mask)


def _swiglu_fwd_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@kernel_op("swiglu_fwd_triton", _swiglu_fwd_fake)
def _swiglu_fwd_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(gate)  # gate, up contiguous (swiglu_forward)
    n = gate.numel()
    if n:
        with launch_device(gate):
            _swiglu_fwd[(triton.cdiv(n, BLOCK),)](gate, up, y, n, BLOCK=BLOCK)
    return y


def _swiglu_bwd_fake(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
            torch.empty(up.shape, dtype=up.dtype, device=up.device))


@kernel_op("swiglu_bwd_triton", _swiglu_bwd_fake)
def _swiglu_bwd_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        with launch_device(gate):
            _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dy, gate, up, dgate, dup, n, BLOCK=BLOCK)
    return dgate, dup


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    check_float("swiglu", gate=gate, up=up)
    check_same("swiglu", gate=gate, up=up)
    return _swiglu_fwd_op(gate.contiguous(), up.contiguous())


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    return _swiglu_bwd_op(dy.contiguous(), gate, up)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        y = swiglu_forward(gate, up)
        ctx.save_for_backward(gate.contiguous(), up.contiguous())
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up. gate, up: (..., F), same shape, dtype and device -> (..., F) in that dtype."""
    return SwiGLUFunction.apply(gate, up)


def compile_specs() -> list:
    """The GPU compilations of tests/test_kernels_compile.py (kernels/compile_spec.py): both kernels
    in bf16 for every target, fp32 on sm_80. The dtype changes only loads and stores here."""
    from lora_engine.kernels.compile_spec import TARGETS, CompileSpec, signature

    return [CompileSpec(f"{k.fn.__name__}/{t}", k, signature(k, t, n="i32"), {"BLOCK": BLOCK}, targets)
            for t, targets in (("bf16", TARGETS), ("fp32", (80,))) for k in (_swiglu_fwd, _swiglu_bwd)]
