"""The fused CPU ops of csrc/cpu_fused.cpp (RMSNorm, RoPE, SwiGLU, the cross-entropy gradient) behind
kernels/ops_reference.py's functions.

lora_engine.dispatch runs this module for backend "cpp" on bf16 activations, and
`exact_forward_ops` on fp32 ones: the reference's forward (the exact path against transformers)
with the fused backward. The same functions, signatures and contracts as the reference, with one
C++ pass over memory per op (fp32 math, one rounding on store) where the reference's eager ops make
one pass, and in bf16 one bf16 -> fp32 -> bf16 round trip, per elementwise step. Each op is a
torch.library custom op (torch.ops.lora_engine.*_cpu) with a fake implementation, so torch.compile
and FakeTensorMode trace through it; autograd is the autograd.Functions below, which save what the
reference's Functions save, no more:

  rms_norm  y = w * round(x * rstd), rstd = 1/sqrt(mean(x^2) + eps)   saves x, w and the fp32 rstd (rows,)
  rope      q' = q cos + rotate_half(q) sin (and k')                   saves cos and sin
  swiglu    silu(g) * u                                                saves g and u (silu recomputed)
  linear_cross_entropy  the reference's chunked loop; on bf16 each (chunk, V) block of logits turns
            into softmax - onehot in one C++ pass, in place (ce_grad_cpu), where the reference widens
            it to an fp32 copy and makes seven passes over that; saves dh, as the reference

The C++ ops take CPU tensors of one dtype, fp32 or bf16. Anything else (fp16, an fp32 weight beside
bf16 activations, a GPU or meta tensor, an odd head_dim, the extension not built) runs the reference
itself, so every call is served. Results agree with the reference within the rounding of the dtype
(tests/test_ops_cpp.py), not bit for bit: the reductions sum in another order and bf16
intermediates are not rounded. Imports torch and the kernels package only.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from lora_engine.kernels import amp, nf4_cpp
from lora_engine.kernels import ops_reference as reference
from lora_engine.kernels.ops_reference import lora_linear

__all__ = ["available", "rms_norm", "rope", "swiglu", "linear_cross_entropy", "lora_linear", "exact_forward_ops"]

_DTYPES = (torch.float32, torch.bfloat16)
_ready: bool | None = None  # the one probe's answer (a plain global: torch.compile reads it as a constant)


def available() -> bool:
    """Whether the extension is built with these ops (an older build may have the NF4 ops only)."""
    global _ready
    if _ready is None:
        _ready = nf4_cpp.available() and hasattr(torch.ops.lora_engine, "swiglu_fwd_cpu")
        if _ready:
            _register_fakes()
    return _ready


def _register_fakes() -> None:
    """Outputs of the C++ ops (shapes, strides, dtypes) for tracing without running them."""
    @torch.library.register_fake("lora_engine::rms_norm_fwd_cpu")
    def _rms_fwd(x, weight, eps):
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((rows,), dtype=torch.float32)

    @torch.library.register_fake("lora_engine::rms_norm_bwd_cpu")
    def _rms_bwd(gy, x, weight, rstd, need_dw):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                weight.new_empty((weight.shape[0] if need_dw else 0,)))

    @torch.library.register_fake("lora_engine::rope_cpu")
    def _rope(q, k, cos, sin, backward):
        def like(t):
            return torch.empty_like(t if t.stride(-1) == 1 else t.contiguous())
        return like(q), like(k)

    @torch.library.register_fake("lora_engine::swiglu_fwd_cpu")
    def _swiglu_fwd(gate, up):
        return torch.empty_like(gate, memory_format=torch.contiguous_format)

    if hasattr(torch.ops.lora_engine, "attn_softmax_fwd_cpu"):  # kernels/attention_cpp.py's ops
        @torch.library.register_fake("lora_engine::attn_softmax_fwd_cpu")
        def _attn_fwd(s, scale, start, period, causal, out_dtype):
            rows = s.numel() // s.shape[-1] if s.shape[-1] else 0
            return s.new_empty(s.shape, dtype=out_dtype), s.new_empty((rows,), dtype=torch.float32)

        @torch.library.register_fake("lora_engine::attn_softmax_bwd_cpu")
        def _attn_bwd(s, dp, lse, delta, scale, start, period, causal, out_dtype):
            return s.new_empty(s.shape, dtype=out_dtype), s.new_empty(s.shape, dtype=out_dtype)

    if hasattr(torch.ops.lora_engine, "ce_grad_cpu"):
        @torch.library.register_fake("lora_engine::ce_grad_cpu")
        def _ce_grad(logits, labels):
            return logits.new_empty((logits.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("lora_engine::swiglu_bwd_cpu")
    def _swiglu_bwd(dy, gate, up):
        return (torch.empty_like(gate, memory_format=torch.contiguous_format),
                torch.empty_like(up, memory_format=torch.contiguous_format))


def _served(*tensors: torch.Tensor) -> bool:
    """The C++ ops take these tensors: CPU, one dtype among fp32 and bf16, and the ops are built."""
    t0 = tensors[0]
    return (t0.device.type == "cpu" and t0.dtype in _DTYPES
            and all(t.device == t0.device and t.dtype == t0.dtype for t in tensors) and available())


def _wants_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---- RMSNorm -------------------------------------------------------------------------------------

class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.lora_engine.rms_norm_fwd_cpu(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = torch.ops.lora_engine.rms_norm_bwd_cpu(gy, x, weight, rstd, ctx.needs_input_grad[1])
        return dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, None


class ExactForwardRMSNorm(RMSNormFunction):
    """The reference's forward (LlamaRMSNorm's ops), RMSNormFunction's fused backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = reference._rms_norm_forward(x, weight, eps)
        rstd = rstd.reshape(-1)  # (rows,), as the C++ backward takes it
        ctx.save_for_backward(x, weight, rstd)
        return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, exact_forward: bool = False) -> torch.Tensor:
    """reference.rms_norm: x (..., D), weight (D,) -> (..., D); fused when x and weight share fp32 or bf16.
    exact_forward: forward in the reference's ops (its values bit for bit), only backward fused."""
    if not _served(x, weight) or x.dim() == 0 or weight.shape != x.shape[-1:]:
        return reference.rms_norm(x, weight, eps)
    if _wants_grad(x, weight):
        return (ExactForwardRMSNorm if exact_forward else RMSNormFunction).apply(x, weight, eps)
    if exact_forward:
        return reference.rms_norm(x, weight, eps)
    return torch.ops.lora_engine.rms_norm_fwd_cpu(x, weight, eps)[0]


# ---- RoPE ----------------------------------------------------------------------------------------

class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return torch.ops.lora_engine.rope_cpu(q, k, cos, sin, False)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        dq, dk = torch.ops.lora_engine.rope_cpu(gq, gk, cos, sin, True)
        return dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None, None, None


class ExactForwardRope(RopeFunction):
    """The reference's forward (q cos + rotate_half(q) sin), RopeFunction's fused backward."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return reference._rope_forward(q, k, cos.unsqueeze(1), sin.unsqueeze(1))  # (B, 1, T, hd): over heads


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, exact_forward: bool = False):
    """reference.rope: q (B, Hq, T, hd), k (B, Hk, T, hd), cos/sin (B, T, hd) or (T, hd) -> (q', k').
    exact_forward: forward in the reference's ops (its values bit for bit), only backward fused."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    ok = (q.dim() == 4 and k.dim() == 4 and cos.dim() == 3 and q.shape[-1] % 2 == 0
          and cos.shape[0] in (1, q.shape[0]) and cos.shape[1:] == (q.shape[2], q.shape[3]) and sin.shape == cos.shape)
    if not ok or not _served(q, k, cos, sin):
        return reference.rope(q, k, cos, sin)
    if _wants_grad(q, k):
        return (ExactForwardRope if exact_forward else RopeFunction).apply(q, k, cos, sin)
    if exact_forward:
        return reference.rope(q, k, cos, sin)
    return torch.ops.lora_engine.rope_cpu(q, k, cos, sin, False)


# ---- SwiGLU --------------------------------------------------------------------------------------

class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return torch.ops.lora_engine.swiglu_fwd_cpu(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.ops.lora_engine.swiglu_bwd_cpu(dy, gate, up)
        return dgate if ctx.needs_input_grad[0] else None, dup if ctx.needs_input_grad[1] else None


class ExactForwardSwiGLU(SwiGLUFunction):
    """The reference's forward (F.silu(gate) * up), SwiGLUFunction's fused backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, exact_forward: bool = False) -> torch.Tensor:
    """reference.swiglu: silu(gate) * up for gate, up of one shape and dtype.
    exact_forward: forward in the reference's ops (its values bit for bit), only backward fused."""
    if not _served(gate, up) or gate.shape != up.shape:
        return reference.swiglu(gate, up)
    if _wants_grad(gate, up):
        return (ExactForwardSwiGLU if exact_forward else SwiGLUFunction).apply(gate, up)
    if exact_forward:
        return reference.swiglu(gate, up)
    return torch.ops.lora_engine.swiglu_fwd_cpu(gate, up)


# ---- linear cross-entropy ------------------------------------------------------------------------

def _ce_grad_in_place(block: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.ops.lora_engine.ce_grad_cpu(block, labels)


@amp.like_linear
def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk_size: int | None = None) -> torch.Tensor:
    """reference.linear_cross_entropy; bf16 hidden and weight on the CPU get the fused per-chunk
    gradient (lora_engine::ce_grad_cpu), fp32 ones the reference's exact loop. The loss agrees with
    the reference to fp32 rounding (its exp is a polynomial, its sums in another order) and the
    gradient within one bf16 rounding (tests/test_ops_cpp.py)."""
    fused = (hidden.dtype == torch.bfloat16 and _served(hidden, weight)
             and hasattr(torch.ops.lora_engine, "ce_grad_cpu"))
    return reference.chunked_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size,
                                           _ce_grad_in_place if fused else None)


# What the "cpp" backend runs on fp32 CPU tensors (dispatch._impl): forward values are the reference's
# bit for bit (transformers' logits to 2e-5 over 30 layers, tests/test_embedded.py); backward is the
# fused C++ ops, whose gradients agree with the reference's within fp32 rounding.
exact_forward_ops = SimpleNamespace(
    linear_cross_entropy=reference.linear_cross_entropy,
    lora_linear=lora_linear,
    rms_norm=functools.partial(rms_norm, exact_forward=True),
    rope=functools.partial(rope, exact_forward=True),
    swiglu=functools.partial(swiglu, exact_forward=True),
)
