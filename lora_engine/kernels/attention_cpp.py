"""Causal self-attention on the CPU: GEMMs at the machine's BLAS rate, the softmax fused in C++.

Why: torch's CPU flash attention (what F.scaled_dot_product_attention runs for these inputs, and
what transformers runs) reaches a small fraction of the bf16 GEMM rate on CPUs that multiply bf16
natively, and is a large share of the bf16 LoRA step there. Here the products are a few batched
GEMMs per chunk of queries (torch.bmm: oneDNN, at the machine's bf16 GEMM rate) and everything
between them is one C++ pass per block of scores (csrc/cpu_fused.cpp: attn_softmax_fwd_cpu,
attn_softmax_bwd_cpu). Measured against SDPA by bench/attention_cpp.py, results in
bench/results/attention_cpp.md.

The algorithm, for q (B, H, S, D) and k, v (B, Hk, S, D) with G = H / Hk query heads per key head:
the G heads that read one key head are adjacent in q, so they are one matrix of G*c query rows
against that head's keys (K and V are never repeated, and dK, dV come out summed over the G
heads), and the queries go in chunks of c positions, so that a causal chunk only meets the keys it
can see (keys 0..st+c: 5/8 of the square at c = S/4 instead of all of it). With a sliding window W
the chunk's keys start at st - W + 1 too, so it meets at most c + W - 1 keys: O(S x W) time and memory.

  forward, per chunk   s = Q_c K^T   p, lse = softmax(s * scale) (C++, fp32)   O_c = p V
  saved                q, k, v, O and lse (B*Hk, G, S) fp32: what SDPA's flash attention saves
  backward, per chunk  s again, dp = dO_c V^T   p, ds = p (dp - rowsum(dO*O)) scale (C++, fp32)
                       dV += p^T dO_c   dK += ds^T Q_c   dQ_c = ds K

Precision. fp32 inputs: every step in fp32. bf16 inputs: every GEMM takes bf16 operands and
accumulates in fp32 (oneDNN), rounding its result to bf16 once; so s and dp are rounded to bf16
before the fp32 softmax and its gradient, as in transformers' eager attention under bf16 (its
matmul, then softmax(..., dtype=float32)); p and ds are rounded to bf16 for the other products, as
FlashAttention-2 does on GPUs; dK and dV are summed over chunks in fp32. (torch has no CPU GEMM
with bf16 operands and an fp32 result; widening q, k, dO, v to fp32 for s and dp, the first
version of this file, ran those products at fp32's rate and lost to SDPA overall.)
tests/test_attention_cpp.py bounds the error against a float64 reference by twice that of
transformers' eager bf16 attention (fp32: of torch's SDPA in fp32).

Memory and speed: the transient scores of one chunk, B*H*c*S values per buffer, and the number of
chunks, S/c, set by _chunk: c = 64 query positions up to S = 1024, 128 beyond, halved (not below
16) while one buffer would pass _CHUNK_VALUES (32 MB in bf16). Small chunks keep the score
buffers in the caches (one chunk of all positions is slower from S = 256 on), and a chunk too small
turns attention into a Python loop of many small GEMMs (the earlier rule, c shrinking to 16 as S
grew, lost to SDPA at S = 2048 and 4096): the rule is the fastest measured, bench/results/attention_cpp.md.
Nothing S x S is kept for backward. Imports torch and the kernels package only.
"""

from __future__ import annotations

import torch

from lora_engine.kernels import ops_cpp

__all__ = ["attention", "served"]

_CHUNK_VALUES = 1 << 24  # at most this many scores per chunk buffer (B*H*c*S), unless c would fall below 16


def served(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether attention() runs these inputs (else the caller runs SDPA): CPU, fp32 or bf16, one
    dtype, (B, H, S, D) with H a multiple of k's heads, keys as many as queries, the ops built."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and q.dim() == 4
            and k.dim() == 4 and v.shape == k.shape and k.dtype == q.dtype == v.dtype
            and k.device == q.device == v.device and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3]
            and k.shape[1] >= 1 and q.shape[1] % k.shape[1] == 0 and q.shape[2] == k.shape[2]
            and q.shape[2] >= 1 and q.shape[3] >= 1 and ops_cpp.available()
            and hasattr(torch.ops.lora_engine, "attn_softmax_fwd_cpu"))


def _chunk(B: int, H: int, S: int) -> int:
    """Query positions per chunk: 64 up to S = 1024, 128 beyond (the fastest measured), at most S,
    halved while B*H*c*S passes _CHUNK_VALUES, but not below 16."""
    c = min(S, 64 if S <= 1024 else 128)
    while c > 16 and B * H * c * S > _CHUNK_VALUES:
        c //= 2
    return max(1, c)


def _blocks(S: int, c: int):
    for st in range(0, S, c):
        yield st, min(c, S - st)


def _rows(t: torch.Tensor, st: int, cc: int, S: int) -> torch.Tensor:
    """(B*Hk, G, S, D) -> the G*cc query rows of positions st..st+cc, (B*Hk, G*cc, D): a view when
    they are all of S, else a copy of that slice."""
    R, G, _, D = t.shape
    return t.reshape(R, G * S, D) if cc == S else t[:, :, st:st + cc].reshape(R, G * cc, D)


def _keys(st: int, cc: int, causal: bool, S: int, window: int | None):
    """The keys k0..n that queries st..st+cc can see (causal: up to st+cc; window: from st - W + 1), and
    the (cc, n - k0) mask of those a row's window leaves out (True: out), or None when there are none.
    The C++ pass knows the causal diagonal only; the window's lower edge is this mask, applied around it
    in torch (scores -inf before the softmax, p and ds zeroed after: the C++ exp clamps -inf to a tiny
    positive value rather than 0), on a (c, c + W) block, not S x S."""
    n = st + cc if causal else S
    if window is None:
        return 0, n, None
    k0 = max(0, st - window + 1)
    if st + cc - 1 - window < k0:  # even the chunk's last query sees key k0: nothing to mask
        return k0, n, None
    rows = torch.arange(st, st + cc)[:, None]
    return k0, n, torch.arange(k0, n)[None, :] <= rows - window


def _masked(t: torch.Tensor, out: torch.Tensor | None, value: float) -> torch.Tensor:
    """t (R, G*cc, n) with rows G blocks of cc positions; fill `value` where out (cc, n) is True."""
    if out is not None:
        t.view(t.shape[0], -1, *out.shape).masked_fill_(out, value)
    return t


def _forward(q, k, v, scale: float, causal: bool, c: int, window: int | None = None):
    B, H, S, D = q.shape
    Hk = k.shape[1]
    G = H // Hk
    qg = q.view(B * Hk, G, S, D)  # the G query heads that read key head h are adjacent in q
    kf, vf = k.view(B * Hk, S, D), v.view(B * Hk, S, D)
    # O stored (B, S, H, D), returned as its (B, H, S, D) transpose (as torch's CPU flash attention
    # does): the (B, S, H*D) input of the output projection is then a view of it, not a copy that
    # backward would keep beside O.
    o = q.new_empty(B, S, H, D).transpose(1, 2)
    o5 = o.view(B, Hk, G, S, D)
    lse = q.new_empty(B * Hk, G, S, dtype=torch.float32)
    for st, cc in _blocks(S, c):
        k0, n, out = _keys(st, cc, causal, S, window)
        s = torch.bmm(_rows(qg, st, cc, S), kf[:, k0:n].transpose(1, 2))  # (B*Hk, G*cc, n - k0) in q's dtype
        p, l = torch.ops.lora_engine.attn_softmax_fwd_cpu(_masked(s, out, float("-inf")), scale, st - k0, cc,
                                                           causal, q.dtype)
        _masked(p, out, 0.0)
        del s
        if cc == S:
            lse.view(-1).copy_(l)
        else:
            lse[:, :, st:st + cc] = l.view(B * Hk, G, cc)
        o5[:, :, :, st:st + cc] = torch.bmm(p, vf[:, k0:n]).view(B, Hk, G, cc, D)
    return o, lse


def _backward(do, q, k, v, o, lse, scale: float, causal: bool, c: int, window: int | None = None):
    B, H, S, D = q.shape
    Hk = k.shape[1]
    G = H // Hk
    qg, dog = q.view(B * Hk, G, S, D), do.reshape(B * Hk, G, S, D)
    kf, vf = k.view(B * Hk, S, D), v.view(B * Hk, S, D)
    delta = (do.float() * o.float()).sum(-1).reshape(B * Hk, G, S)  # fp32: rowsum(dO * O)
    dq = torch.empty_like(qg)
    if c >= S:
        dk, dv = torch.empty_like(kf), torch.empty_like(vf)
    else:  # summed over chunks in fp32
        dk, dv = (torch.zeros(B * Hk, S, D, dtype=torch.float32) for _ in range(2))
    for st, cc in _blocks(S, c):
        k0, n, out = _keys(st, cc, causal, S, window)
        qb, dob = _rows(qg, st, cc, S), _rows(dog, st, cc, S)
        s = _masked(torch.bmm(qb, kf[:, k0:n].transpose(1, 2)), out, float("-inf"))
        dp = torch.bmm(dob, vf[:, k0:n].transpose(1, 2))
        l, e = (_rows(t[..., None], st, cc, S).view(B * Hk, G * cc) for t in (lse, delta))
        p, ds = torch.ops.lora_engine.attn_softmax_bwd_cpu(s, dp, l, e, scale, st - k0, cc, causal, q.dtype)
        _masked(p, out, 0.0)
        _masked(ds, out, 0.0)
        del s, dp
        if cc == S:  # one chunk: k0 = 0, n = S
            torch.bmm(p.transpose(1, 2), dob, out=dv)
            torch.bmm(ds.transpose(1, 2), qb, out=dk)
            torch.bmm(ds, kf, out=dq.view(B * Hk, G * S, D))
        else:
            dv[:, k0:n] += torch.bmm(p.transpose(1, 2), dob)
            dk[:, k0:n] += torch.bmm(ds.transpose(1, 2), qb)
            dq[:, :, st:st + cc] = torch.bmm(ds, kf[:, k0:n]).view(B * Hk, G, cc, D)
    return dq.view(B, H, S, D), dk.to(k.dtype).view(k.shape), dv.to(v.dtype).view(v.shape)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, c, window):
        o, lse = _forward(q, k, v, scale, causal, c, window)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.causal, ctx.c, ctx.window = scale, causal, c, window
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.scale, ctx.causal, ctx.c, ctx.window)
        return dq, dk, dv, None, None, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float | None = None,
              chunk: int | None = None, window: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, causal) v for q (B, H, S, D), k and v (B, Hk, S, D), H % Hk == 0 ->
    (B, H, S, D), the transpose of a contiguous (B, S, H, D) tensor; what
    F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True) computes.
    Inputs must pass served(). chunk: query positions per block (None: _chunk's rule, 64 up to
    S = 1024 and 128 beyond, smaller for a large B*H*S). window: keys p - window < key <= p only (causal
    implied): each chunk then meets at most c + window - 1 keys, O(S x W) time and memory."""
    if not served(q, k, v):
        raise ValueError(f"attention_cpp.attention does not take q {tuple(q.shape)} {q.dtype} {q.device}, "
                         f"k {tuple(k.shape)} {k.dtype}, v {tuple(v.shape)} {v.dtype} (see served())")
    B, H, S, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    c = _chunk(B, H, S) if chunk is None else max(1, min(int(chunk), S))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if window is not None and window < 1:
        raise ValueError(f"attention_cpp.attention: window must be >= 1, got {window}")
    if window is not None:
        causal, window = True, (None if window >= S else int(window))
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _Attention.apply(q, k, v, scale, causal, c, window)
    return _forward(q, k, v, scale, causal, c, window)[0]
