"""Sliding-window causal attention in O(S x W) memory and time, on any device (the PyTorch reference).

A query at position p (the last T of S positions: p = S - T + i) sees keys p - W < key <= p. A dense
(T, S) mask costs O(S^2) in memory and time although only W keys per row count. Here the queries go
in chunks of c positions, and a chunk starting at position p0 meets only keys max(0, p0 - W + 1) ..
p0 + c - 1: at most c + W - 1 of them. Each chunk is one F.scaled_dot_product_attention (the eager
soft-capped expression when there is a softcap) with a small (c, c + W - 1) boolean mask, so the
scores of one chunk, B*H*c*(c + W), are the largest transient.

Backward recomputes each chunk's attention under autograd and takes its gradient (checkpointing per
chunk): saved are q, k, v only, nothing T x S; dK and dV are summed over the chunks that read each key
(in fp32 for bf16/fp16 inputs, cast once). The keys a row masks out get exactly zero probability, as
in the dense masked call, so the result equals it up to the order of fp32 sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["attention", "chunk_size"]


def chunk_size(T: int, window: int) -> int:
    """Query positions per chunk: W clamped to 64..1024 (a chunk then meets at most 2W keys; smaller
    chunks make more, smaller SDPA calls), at most T."""
    return max(1, min(T, max(64, min(window, 1024))))


def _spans(T: int, S: int, window: int, c: int):
    """(st, cc, k0, k1): queries st..st+cc of the T and the keys k0..k1 of the S they can see."""
    off = S - T
    for st in range(0, T, c):
        cc = min(c, T - st)
        yield st, cc, max(0, off + st - window + 1), off + st + cc


def sdpa(q, k, v, mask, scale):
    """The default masked attention of one chunk: torch's SDPA."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _chunk(q, k, v, st, k0, window, scale, attend, off):
    cc, n = q.shape[2], k.shape[2]
    q_pos = torch.arange(off + st, off + st + cc, device=q.device)[:, None]
    k_pos = torch.arange(k0, k0 + n, device=q.device)[None, :]
    allowed = (k_pos <= q_pos) & (k_pos > q_pos - window)  # (cc, n): the window, small
    return attend(q, k, v, allowed, scale)


def _forward(q, k, v, window, scale, attend, c):
    T, S = q.shape[2], k.shape[2]
    out = torch.empty_like(q)
    for st, cc, k0, k1 in _spans(T, S, window, c):
        out[:, :, st:st + cc] = _chunk(q[:, :, st:st + cc], k[:, :, k0:k1], v[:, :, k0:k1], st, k0, window,
                                       scale, attend, S - T)
    return out


class _WindowAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, window, scale, attend, c):
        ctx.save_for_backward(q, k, v)
        ctx.args = window, scale, attend, c
        return _forward(q, k, v, window, scale, attend, c)

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        window, scale, attend, c = ctx.args
        T, S = q.shape[2], k.shape[2]
        acc = torch.float32 if k.dtype in (torch.bfloat16, torch.float16) else k.dtype
        dq = torch.empty_like(q)
        dk, dv = (torch.zeros(k.shape, dtype=acc, device=k.device) for _ in range(2))
        for st, cc, k0, k1 in _spans(T, S, window, c):
            with torch.enable_grad():
                qc, kc, vc = (t.detach().requires_grad_() for t in (q[:, :, st:st + cc], k[:, :, k0:k1],
                                                                     v[:, :, k0:k1]))
                oc = _chunk(qc, kc, vc, st, k0, window, scale, attend, S - T)
                gq, gk, gv = torch.autograd.grad(oc, (qc, kc, vc), do[:, :, st:st + cc])
            dq[:, :, st:st + cc] = gq
            dk[:, :, k0:k1] += gk
            dv[:, :, k0:k1] += gv
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float | None = None,
              attend=sdpa, chunk: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, keys p - window < key <= p) v; q (B, H, T, hd) the last T of the S
    positions of k and v (B, Hk, S, hd), H % Hk == 0 -> (B, H, T, hd). attend(q, k, v, mask, scale): one
    chunk's attention under a boolean (c, n) mask (default SDPA; kernels/ops_reference.py passes its eager
    soft-capped expression when there is a soft-cap). chunk: query positions per block (None: chunk_size's rule)."""
    T, S = q.shape[2], k.shape[2]
    if window < 1 or T > S:
        raise ValueError(f"window attention: window must be >= 1 and queries ({T}) at most keys ({S}); "
                         f"got window {window}")
    c = chunk_size(T, window) if chunk is None else max(1, min(int(chunk), T))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _WindowAttention.apply(q, k, v, int(window), scale, attend, c)
    return _forward(q, k, v, int(window), scale, attend, c)
