"""The grouped expert matmul with per-expert LoRA, differentiable, on CPU GEMMs or on Triton kernels.

Math (kernels/moe_reference.py:grouped_lora_mm is the oracle): x (M, K) holds the tokens grouped by
expert, expert e owning the contiguous rows [o_e, o_e + counts[e]); w (E, N, K) (any strides: gpt-oss's
(E, K, N) storage arrives as a transposed view), bias (E, N), a (E, r, K), b (E, N, r), s = scale:

    t_e = x_e A_e^T                      (n_e, r)   the LoRA shrink, kept for backward
    y_e = x_e W_e^T (+ bias_e) + s t_e B_e^T

Backward, with g_e = dL/dy_e:
    u_e   = g_e B_e                      (n_e, r)
    dx_e  = g_e W_e + s u_e A_e
    dA_e  = s u_e^T x_e,   dB_e = s g_e^T t_e     (zero for an expert without tokens)
    dbias_e = sum of g_e's rows;  dW_e = g_e^T x_e only when w requires grad (full fine-tuning): the
    frozen case never forms an (E, N, K) gradient.

Two implementations of the same forward/backward pair ("impl" below), chosen by dispatch.py:
  CPU   (this file) one torch.mm per expert with tokens over its contiguous rows, written into
        preallocated outputs (torch.mm(out=), addmm_), empty experts skipped; the host reads counts.
  Triton (kernels/moe_triton.py) a grouped GEMM with the shrink fused, and a per-expert reduction
        kernel for dA, dB, dW; counts stay on the device.
Both are torch.library custom ops with fakes, so torch.compile and the meta-device plan see them.
"""

from __future__ import annotations

import torch

from lora_engine.kernels import amp


def check_args(x, counts, w, bias, a, b) -> None:
    """ValueError naming the tensor and the numbers: a grouped kernel fed a wrong shape reads out of bounds."""
    op = "moe_grouped_mm"
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"{op}: x must be (M, K) and w (E, N, K); got x {tuple(x.shape)} and w {tuple(w.shape)}")
    E, N, K = w.shape
    if x.shape[1] != K:
        raise ValueError(f"{op}: x has {x.shape[1]} features but w is {tuple(w.shape)} (E, N, K={K})")
    if counts.shape != (E,) or counts.dtype not in (torch.int32, torch.int64) or counts.device != x.device:
        raise ValueError(f"{op}: counts must be an integer ({E},) tensor on {x.device}, one count per expert; got "
                         f"{tuple(counts.shape)} {counts.dtype} on {counts.device}")
    if w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"{op}: w is {w.dtype} on {w.device} but x is {x.dtype} on {x.device}; cast them to one")
    if bias is not None and (bias.shape != (E, N) or bias.dtype != x.dtype):
        raise ValueError(f"{op}: bias must be ({E}, {N}) in {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if (a is None) != (b is None):
        raise ValueError(f"{op}: pass both LoRA factors a and b, or neither")
    if a is not None:
        r = a.shape[1] if a.dim() == 3 else -1
        if a.shape != (E, r, K) or b.shape != (E, N, r) or r < 1:
            raise ValueError(f"{op}: a must be ({E}, r, {K}) and b ({E}, {N}, r) with r >= 1; got a "
                             f"{tuple(a.shape)} and b {tuple(b.shape)}")
        if a.dtype != x.dtype or b.dtype != x.dtype:
            raise ValueError(f"{op}: a is {a.dtype} and b {b.dtype} but x is {x.dtype}; cast them to one dtype")


# ---- the CPU implementation ------------------------------------------------------------------------


def _segments(counts: torch.Tensor):
    """(expert, first row, rows) of every expert that has tokens."""
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            yield e, start, n
        start += n


@torch.library.custom_op("lora_engine::moe_mm_cpu", mutates_args=())
def _fwd_cpu(x: torch.Tensor, counts: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
             a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    M, N, r = x.shape[0], w.shape[1], 0 if a is None else a.shape[1]
    y = x.new_empty((M, N))
    t = x.new_empty((M, r))
    for e, s, n in _segments(counts):
        xe, ye = x[s : s + n], y[s : s + n]
        if bias is None:
            torch.mm(xe, w[e].t(), out=ye)
        else:
            torch.addmm(bias[e], xe, w[e].t(), out=ye)
        if r:
            te = t[s : s + n]
            torch.mm(xe, a[e].t(), out=te)
            ye.addmm_(te, b[e].t(), alpha=scale)
    return y, t


@_fwd_cpu.register_fake
def _(x, counts, w, bias, a, b, scale):
    return x.new_empty((x.shape[0], w.shape[1])), x.new_empty((x.shape[0], 0 if a is None else a.shape[1]))


@torch.library.custom_op("lora_engine::moe_mm_bwd_cpu", mutates_args=())
def _bwd_cpu(g: torch.Tensor, x: torch.Tensor, counts: torch.Tensor, w: torch.Tensor, a: torch.Tensor | None,
             b: torch.Tensor | None, t: torch.Tensor, scale: float, needs: list[bool]
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, da, db, dw, dbias); needs = [dx, lora, dw, dbias], an unneeded gradient is an empty tensor."""
    need_dx, need_lora, need_dw, need_bias = needs
    E, N, K = w.shape
    lora = a is not None
    dx = torch.zeros_like(x) if need_dx else x.new_empty(0)
    da = x.new_zeros(a.shape) if (need_lora and lora) else x.new_empty(0)
    db = x.new_zeros(b.shape) if (need_lora and lora) else x.new_empty(0)
    dw = x.new_zeros((E, N, K)) if need_dw else x.new_empty(0)
    dbias = x.new_zeros((E, N)) if need_bias else x.new_empty(0)
    for e, s, n in _segments(counts):
        ge, xe = g[s : s + n], x[s : s + n]
        u = ge @ b[e] if lora else None  # (n, r)
        if need_dx:
            torch.mm(ge, w[e], out=dx[s : s + n])
            if lora:
                dx[s : s + n].addmm_(u, a[e], alpha=scale)
        if need_lora and lora:
            torch.mm(u.t(), xe, out=da[e]).mul_(scale)
            torch.mm(ge.t(), t[s : s + n], out=db[e]).mul_(scale)
        if need_dw:
            torch.mm(ge.t(), xe, out=dw[e])
        if need_bias:
            torch.sum(ge, 0, out=dbias[e])
    return dx, da, db, dw, dbias


@_bwd_cpu.register_fake
def _(g, x, counts, w, a, b, t, scale, needs):
    need_dx, need_lora, need_dw, need_bias = needs
    lora = a is not None
    return (x.new_empty(x.shape if need_dx else 0), x.new_empty(a.shape if need_lora and lora else 0),
            x.new_empty(b.shape if need_lora and lora else 0), x.new_empty(w.shape if need_dw else 0),
            x.new_empty((w.shape[0], w.shape[1]) if need_bias else 0))


def cpu_forward(x, counts, w, bias, a, b, scale):
    return _fwd_cpu(x, counts, w, bias, a, b, float(scale))


def cpu_backward(g, x, counts, w, a, b, t, scale, needs):
    return _bwd_cpu(g.contiguous(), x, counts, w, a, b, t, float(scale), list(needs))


# ---- autograd ------------------------------------------------------------------------------------------


class MoeGroupedMMFunction(torch.autograd.Function):
    """impl = (forward, backward) of one implementation: forward(x, counts, w, bias, a, b, scale) -> (y, t),
    backward(g, x, counts, w, a, b, t, scale, needs) -> (dx, da, db, dw, dbias)."""

    @staticmethod
    def forward(ctx, x, w, bias, a, b, meta):
        counts, scale, impl = meta
        y, t = impl[0](x, counts, w, bias, a, b, scale)
        ctx.save_for_backward(x, counts, w, a, b, t)
        ctx.meta = (scale, impl, bias is not None)
        return y

    @staticmethod
    def backward(ctx, g):
        x, counts, w, a, b, t = ctx.saved_tensors
        scale, impl, has_bias = ctx.meta
        need = ctx.needs_input_grad
        needs = (need[0], a is not None and (need[3] or need[4]), need[1], has_bias and need[2])
        dx, da, db, dw, dbias = impl[1](g, x, counts, w, a, b, t, scale, needs)
        return (dx if need[0] else None, dw if need[1] else None, dbias if needs[3] else None,
                da if needs[1] and need[3] else None, db if needs[1] and need[4] else None, None)


CPU = (cpu_forward, cpu_backward)


@amp.like_linear
def grouped_mm(x, counts, w, bias, a, b, scale, impl) -> torch.Tensor:
    """grouped_lora_mm's result through `impl` (CPU or moe_triton.IMPL), differentiable in x, w, bias, a, b."""
    check_args(x, counts, w, bias, a, b)
    return MoeGroupedMMFunction.apply(x, w, bias, a, b, (counts, float(scale), impl))
