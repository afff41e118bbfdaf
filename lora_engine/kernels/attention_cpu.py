"""Causal self-attention on the CPU: GEMMs at the machine's BLAS rate, the softmax fused in C++.

Why: torch's CPU flash attention (what F.scaled_dot_product_attention runs for these inputs, and
what transformers runs) multiplies 32-row blocks one at a time and reaches ~10% of the fp32 GEMM
rate on a 2-core AVX2 EPYC and ~25% of the bf16 rate on a Zen 4 (bench/attention_cpu.py). Here
the products are few large batched GEMMs (torch.bmm: MKL / oneDNN) and everything between them is
one C++ pass per block of scores (csrc/cpu_fused.cpp: attn_softmax_fwd_cpu, attn_softmax_bwd_cpu).

The algorithm, for q (B, H, S, D) and k, v (B, Hk, S, D) with G = H / Hk query heads per key head:
the G heads of one key head are one matrix of G*c query rows, so K and V are never repeated, and
the queries go in chunks of c positions, so that a causal chunk only meets the keys it can see
(keys 0..st+c: 5/8 of the square at c = S/4 instead of all of it).

  forward, per chunk   s = Q_c K^T (fp32)   p, lse = softmax(s * scale) (C++)   O_c = p V
  saved                q, k, v, O and lse (B*Hk, G, S) fp32: what SDPA's flash attention saves
  backward, per chunk  s again, dp = dO_c V^T (fp32)   p, ds = p (dp - rowsum(dO*O)) scale (C++)
                       dV += p^T dO_c   dK += ds^T Q_c   dQ_c = ds K

Precision. fp32 inputs: every step in fp32. bf16 inputs: the scores and dp come from fp32 GEMMs
(q, k, dO, v widened; these two products are where a bf16 rounding would be amplified by exp and
by the cancellation in dp - delta), p and ds are rounded to bf16 for the other four GEMMs, which
accumulate in fp32 and round once on store, as FlashAttention-2 does on GPUs; dK and dV are summed
over chunks in fp32. tests/test_attention_cpu.py bounds the error against a float64 reference by
torch's own SDPA error at the same dtype.

Memory: the transient scores of one chunk, B*H*c*S fp32 values, bounded by choosing c (at most
~8 MB per buffer, _CHUNK_VALUES); nothing S x S is kept for backward. Imports torch and the
kernels package only.
"""

from __future__ import annotations

import torch

from lora_engine.kernels import cpu_fused

__all__ = ["attention", "served"]

_CHUNK_VALUES = 1 << 21  # fp32 scores per chunk (8 MB): B*H*c*S <= this, unless c would fall below 16


def served(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether attention() runs these inputs (else the caller runs SDPA): CPU, fp32 or bf16, one
    dtype, (B, H, S, D) with H a multiple of k's heads, keys as many as queries, the ops built."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.dim() == 4
            and k.dim() == 4 and v.shape == k.shape and k.dtype == q.dtype == v.dtype
            and k.device == q.device == v.device and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3]
            and k.shape[1] >= 1 and q.shape[1] % k.shape[1] == 0 and q.shape[2] == k.shape[2]
            and q.shape[2] >= 1 and q.shape[3] >= 1 and cpu_fused.available()
            and hasattr(torch.ops.lora_engine, "attn_softmax_fwd_cpu"))


def _chunk(B: int, H: int, S: int) -> int:
    """Query positions per chunk: S when one chunk's scores fit _CHUNK_VALUES, else S split evenly
    into as few chunks as fit (each a multiple of 16, at least 16)."""
    most = _CHUNK_VALUES // max(B * H * S, 1)
    if most >= S:
        return S
    n = -(-S // max(most, 16))
    return min(S, -(-(-(-S // n)) // 16) * 16)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _blocks(S: int, c: int):
    for st in range(0, S, c):
        yield st, min(c, S - st)


def _heads(t: torch.Tensor, G: int) -> torch.Tensor:
    """(B, Hk, S, D) -> (B*Hk*G, S, D): each key/value head once per query head that reads it."""
    B, Hk, S, D = t.shape
    return t.reshape(B * Hk, S, D) if G == 1 else t[:, :, None].expand(B, Hk, G, S, D).reshape(B * Hk * G, S, D)


def _forward(q, k, v, scale: float, causal: bool, c: int):
    B, H, S, D = q.shape
    G = H // k.shape[1]
    qf, kf, vf = q.view(B * H, S, D), _heads(k, G), _heads(v, G)
    k32 = _f32(kf)
    o = torch.empty_like(qf)
    lse = q.new_empty(B * H, S, dtype=torch.float32)
    for st, cc in _blocks(S, c):
        n = st + cc if causal else S
        s = torch.bmm(_f32(qf[:, st:st + cc]), k32[:, :n].transpose(1, 2))
        p, l = torch.ops.lora_engine.attn_softmax_fwd_cpu(s, scale, st, cc, causal, q.dtype)
        lse[:, st:st + cc] = l.view(B * H, cc)
        del s
        if cc == S:
            torch.bmm(p, vf, out=o)
        else:
            o[:, st:st + cc] = torch.bmm(p, vf[:, :n])
    return o.view(B, H, S, D), lse


def _backward(do, q, k, v, o, lse, scale: float, causal: bool, c: int):
    B, H, S, D = q.shape
    Hk = k.shape[1]
    G = H // Hk
    qf, kf, vf = q.view(B * H, S, D), _heads(k, G), _heads(v, G)
    dof = do.reshape(B * H, S, D)
    k32, v32, do32 = _f32(kf), _f32(vf), _f32(dof)
    delta = (do32 * _f32(o.view(B * H, S, D))).sum(-1)  # (B*H, S) fp32: rowsum(dO * O)
    dq = torch.empty_like(qf)
    acc = torch.float32 if causal and c < S else q.dtype  # dK, dV summed over chunks in fp32
    dk = torch.zeros(B * H, S, D, dtype=acc)
    dv = torch.zeros(B * H, S, D, dtype=acc)
    for st, cc in _blocks(S, c):
        n = st + cc if causal else S
        s = torch.bmm(_f32(qf[:, st:st + cc]), k32[:, :n].transpose(1, 2))
        dp = torch.bmm(do32[:, st:st + cc], v32[:, :n].transpose(1, 2))
        p, ds = torch.ops.lora_engine.attn_softmax_bwd_cpu(
            s, dp, lse[:, st:st + cc], delta[:, st:st + cc], scale, st, cc, causal, q.dtype)
        del s, dp
        if cc == S:
            torch.bmm(p.transpose(1, 2), dof, out=dv)
            torch.bmm(ds.transpose(1, 2), qf, out=dk)
            torch.bmm(ds, kf, out=dq)
        else:
            dv[:, :n] += torch.bmm(p.transpose(1, 2), dof[:, st:st + cc])
            dk[:, :n] += torch.bmm(ds.transpose(1, 2), qf[:, st:st + cc])
            dq[:, st:st + cc] = torch.bmm(ds, kf[:, :n])
    if G > 1:
        dk, dv = (t.view(B, Hk, G, S, D).sum(2, dtype=torch.float32) for t in (dk, dv))
    return dq.view(B, H, S, D), dk.to(k.dtype).view(k.shape), dv.to(v.dtype).view(v.shape)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, c):
        o, lse = _forward(q, k, v, scale, causal, c)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.causal, ctx.c = scale, causal, c
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.scale, ctx.causal, ctx.c)
        return dq, dk, dv, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None,
              chunk: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v for q (B, H, S, D), k and v (B, Hk, S, D), H % Hk == 0 ->
    (B, H, S, D), contiguous; what F.scaled_dot_product_attention(q, k, v, is_causal=causal,
    scale=scale, enable_gqa=True) computes. Inputs must pass served(). chunk: query positions per
    block (None: as many as keep one block's scores near 8 MB)."""
    if not served(q, k, v):
        raise ValueError(f"attention_cpu.attention does not take q {tuple(q.shape)} {q.dtype} {q.device}, "
                         f"k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype} (see served())")
    B, H, S, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    c = _chunk(B, H, S) if chunk is None else max(1, min(int(chunk), S))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Attention.apply(q, k, v, scale, causal, c)
    return _forward(q, k, v, scale, causal, c)[0]
