"""The grouped expert matmul with per-expert LoRA over NF4 experts (QLoRA on an MoE layer).

Same math as kernels/moe_grouped.py, with W_e given as one NF4Tensor per expert (each a 2-D (N, K) slice, the
bytes bitsandbytes gives that slice). Each expert that has tokens is dequantized once in forward and once
again in backward (for dx = g_e W_e + s u_e A_e), used for its GEMMs and dropped before the next expert's:
at most one dense expert is alive at a time, never the layer's (E, N, K). Experts stored (K, N) (gpt-oss:
`transposed`, set by quant/nf4_experts.py's NF4ExpertWeights.transpose) are multiplied as they dequantize.
Experts without tokens are never dequantized. The base is frozen: no dW. The result equals dequantize-then-matmul
exactly (the same GEMM on the same dense values). `dequantize(w, dtype)` is the caller's (dispatch.py picks the
NF4 backend).

The expert segments are read from `counts` once, in forward, and kept as Python ints for backward: one host
read per call, and a backward that never reads a tensor's values. Counts without values (a FakeTensor, as in
the memory plan, where a recomputed layer's counts may come back fake) are split evenly over the experts
(the plan's routing, train/planning_moe.py): the shapes, hence the memory, do not depend on the split.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from lora_engine.kernels import amp
from lora_engine.kernels.moe_grouped import _segments
from lora_engine.kernels.nf4_format import NF4Tensor


def check_experts(x: torch.Tensor, counts: torch.Tensor, experts, transposed: bool = False) -> tuple[int, int]:
    """(N, K) of the experts: one 2-D NF4Tensor of one shape per count, (N, K) or, transposed, (K, N); K = x's
    features."""
    if not experts or not all(isinstance(w, NF4Tensor) and len(w.shape) == 2 for w in experts):
        raise ValueError("moe_grouped_mm: NF4 experts must be a non-empty list of 2-D NF4Tensor, one (N, K) per expert")
    shapes = {w.shape for w in experts}
    if len(shapes) != 1 or counts.shape != (len(experts),):
        raise ValueError(f"moe_grouped_mm: {len(experts)} NF4 experts of shapes {sorted(shapes)} for counts of shape "
                         f"{tuple(counts.shape)}; expected one (N, K) shape and one count per expert")
    N, K = shapes.pop()[:: -1 if transposed else 1]
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"moe_grouped_mm: x {tuple(x.shape)} does not match NF4 experts of shape ({N}, {K})")
    return N, K


def segments(counts: torch.Tensor, rows: int) -> list[tuple[int, int, int]]:
    """(expert, first row, rows) of every expert with tokens; counts without values spread `rows` evenly."""
    if not is_fake(counts):
        return list(_segments(counts))
    E = counts.shape[0]
    sizes = [rows // E + (e < rows % E) for e in range(E)]
    return [(e, sum(sizes[:e]), n) for e, n in enumerate(sizes) if n]


class MoeNF4Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, a, b, meta):
        counts, experts, scale, dequantize, transposed = meta
        N, r = experts[0].shape[1 if transposed else 0], 0 if a is None else a.shape[1]
        y, t = x.new_empty((x.shape[0], N)), x.new_empty((x.shape[0], r))
        groups = segments(counts, x.shape[0])
        for e, s, n in groups:
            we = dequantize(experts[e], x.dtype)  # (N, K), this expert's only ((K, N) transposed)
            we = we if transposed else we.t()
            xe, ye = x[s : s + n], y[s : s + n]
            if bias is None:
                torch.mm(xe, we, out=ye)
            else:
                torch.addmm(bias[e], xe, we, out=ye)
            if r:
                torch.mm(xe, a[e].t(), out=t[s : s + n])
                ye.addmm_(t[s : s + n], b[e].t(), alpha=scale)
        ctx.save_for_backward(x, a, b, t)
        ctx.meta = (groups, experts, scale, dequantize, transposed, bias is not None)
        return y

    @staticmethod
    def backward(ctx, g):
        x, a, b, t = ctx.saved_tensors
        groups, experts, scale, dequantize, transposed, has_bias = ctx.meta
        need_dx, need_bias, need_a, need_b = ctx.needs_input_grad[:4]
        lora = a is not None
        g = g.contiguous()
        dx = torch.zeros_like(x) if need_dx else None
        da = torch.zeros_like(a) if lora and need_a else None
        db = torch.zeros_like(b) if lora and need_b else None
        dbias = x.new_zeros((len(experts), g.shape[1])) if has_bias and need_bias else None
        for e, s, n in groups:
            ge, xe = g[s : s + n], x[s : s + n]
            u = ge @ b[e] if lora else None
            if dx is not None:
                we = dequantize(experts[e], x.dtype)
                torch.mm(ge, we.t() if transposed else we, out=dx[s : s + n])
                if lora:
                    dx[s : s + n].addmm_(u, a[e], alpha=scale)
            if da is not None:
                torch.mm(u.t(), xe, out=da[e]).mul_(scale)
            if db is not None:
                torch.mm(ge.t(), t[s : s + n], out=db[e]).mul_(scale)
            if dbias is not None:
                torch.sum(ge, 0, out=dbias[e])
        return dx, dbias, da, db, None


@amp.like_linear
def grouped_mm_nf4(x, counts, experts, bias, a, b, scale, dequantize) -> torch.Tensor:
    """moe_reference.grouped_lora_mm with w = stack(dequantize(W_e)) (its transpose when `experts.transposed`),
    one expert dequantized at a time."""
    from lora_engine.kernels.moe_grouped import check_args

    transposed = bool(getattr(experts, "transposed", False))  # NF4ExpertWeights of (K, N) slices (gpt-oss)
    N, K = check_experts(x, counts, experts, transposed)
    # The dense checks on a stand-in of the experts' shape and x's dtype (no data: expand of one element).
    check_args(x, counts, x.new_empty(1).expand(len(experts), N, K), bias, a, b)
    return MoeNF4Function.apply(x, bias, a, b, (counts, list(experts), float(scale), dequantize, transposed))
