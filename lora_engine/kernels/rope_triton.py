"""Rotary position embedding, Hugging Face's rotate-half convention, q and k in one launch.

Shapes: q (B, Hq, T, hd), k (B, Hk, T, hd), any strides with a contiguous last dimension (the
model passes transposed views of (B, T, H, hd)); cos, sin (B, T, hd), (1, T, hd) or (T, hd).
Outputs keep q's and k's shapes, dtypes and memory layouts. With x = [x1, x2] split at hd/2 and
cos = [c1, c2], sin = [s1, s2]:

    forward   o1 = x1 * c1 - x2 * s1          o2 = x2 * c2 + x1 * s2
    backward  d1 = g1 * c1 + g2 * s2          d2 = g2 * c2 - g1 * s1

The backward is the transpose of the forward's 2x2 blocks, i.e. the inverse rotation (cos and sin
are tables of angles, c1 = c2 and s1 = s2 for every model, but the transpose is exact for any
table). cos and sin get no gradient: they are buffers computed from positions.

Grid: (B * token blocks, Hq + Hk): a program rotates BLOCK_T tokens of one head; heads below Hq
are q's, the rest k's, so one launch serves both. Math in fp32, one rounding on
store. Saved for backward: cos and sin only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_engine.kernels._common import check_device, check_float, kernel_op, launch_device, next_pow2, row_tile


@triton.jit
def _rotate(in_ptr, out_ptr, c1, c2, s1, s2, toks, tmask, s_in_t, s_out_t, HALF,
            BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    # One head, a block of tokens: rows are tokens, columns the first (second) half of head_dim.
    cols = tl.arange(0, BLOCK_HALF)
    mask = tmask[:, None] & (cols[None, :] < HALF)
    src = in_ptr + toks[:, None] * s_in_t + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    dst = out_ptr + toks[:, None] * s_out_t + cols[None, :]
    tl.store(dst, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    T, Hq, HALF,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t,
    sqo_b, sqo_h, sqo_t, sko_b, sko_h, sko_t,
    sc_b, sc_t,
    BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr,
):
    # program (b * cdiv(T, BLOCK_T) + token block, head): heads 0..Hq-1 are q's, the rest k's.
    n_tb = tl.cdiv(T, BLOCK_T)
    b = (tl.program_id(0) // n_tb).to(tl.int64)
    toks = (tl.program_id(0) % n_tb) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    toks = toks.to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = tmask[:, None] & (cols[None, :] < HALF)
    cs = cos_ptr + b * sc_b + toks[:, None] * sc_t + cols[None, :]
    ss = sin_ptr + b * sc_b + toks[:, None] * sc_t + cols[None, :]
    c1 = tl.load(cs, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(cs + HALF, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(ss, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(ss + HALF, mask=cmask, other=0.0).to(tl.float32)
    if head < Hq:
        _rotate(q_ptr + b * sq_b + head * sq_h, qo_ptr + b * sqo_b + head * sqo_h, c1, c2, s1, s2,
                toks, tmask, sq_t, sqo_t, HALF, BLOCK_HALF, BACKWARD)
    else:
        _rotate(k_ptr + b * sk_b + (head - Hq) * sk_h, ko_ptr + b * sko_b + (head - Hq) * sko_h, c1, c2, s1, s2,
                toks, tmask, sk_t, sko_t, HALF, BLOCK_HALF, BACKWARD)


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q, k, cos, sin):
    check_float("rope", q=q, k=k, cos=cos, sin=sin)
    check_device("rope", q=q, k=k, cos=cos, sin=sin)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"rope: q and k must be (B, H, T, hd); got {tuple(q.shape)} and {tuple(k.shape)}")
    B, _, T, hd = q.shape
    if k.shape[0] != B or k.shape[2:] != q.shape[2:]:
        raise ValueError(f"rope: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch, length and head_dim")
    if q.dtype != k.dtype:
        raise ValueError(f"rope: q is {q.dtype} but k is {k.dtype}")
    if hd % 2:
        raise ValueError(f"rope: head_dim must be even, got {hd}")
    if cos.shape != sin.shape:
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ")
    c = cos if cos.dim() == 3 else cos[None]
    if c.dim() != 3 or c.shape[0] not in (1, B) or c.shape[1:] != (T, hd):
        raise ValueError(f"rope: cos/sin must be ({B}, {T}, {hd}), (1, {T}, {hd}) or ({T}, {hd}); "
                         f"got {tuple(cos.shape)}")


def rope_apply(q, k, cos, sin, backward: bool = False):
    """Rotate q and k (or their gradients with backward=True) -> (q', k') in new tensors."""
    _check(q, k, cos, sin)
    c = _last_contiguous(cos if cos.dim() == 3 else cos[None])
    s = _last_contiguous(sin if sin.dim() == 3 else sin[None])
    if c.stride() != s.stride():
        c, s = c.contiguous(), s.contiguous()
    return _rope_op(_last_contiguous(q), _last_contiguous(k), c, s, backward)


def _rope_fake(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, s: torch.Tensor,
               backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(q), torch.empty_like(k)  # same layout as the inputs


@kernel_op("rope_triton", _rope_fake)
def _rope_op(q: torch.Tensor, k: torch.Tensor, c: torch.Tensor, s: torch.Tensor,
             backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k unit last stride; c, s (1 or B, T, hd) with equal strides -> (q', k') in new tensors."""
    B, Hq, T, hd = q.shape
    Hk = k.shape[1]
    qo, ko = _rope_fake(q, k, c, s, backward)
    if q.numel() == 0:
        return qo, ko
    half = hd // 2
    # About 2048 elements of each half per program: 32 tokens of a 128-wide head.
    block_half, block_t, warps = row_tile(half, max_rows=next_pow2(T))
    grid = (B * triton.cdiv(T, block_t), Hq + Hk)
    sc_b = 0 if c.shape[0] == 1 else c.stride(0)
    with launch_device(q):
        _rope_kernel[grid](
            q, k, qo, ko, c, s, T, Hq, half,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
            sc_b, c.stride(1),
            BLOCK_T=block_t, BLOCK_HALF=block_half, BACKWARD=backward, num_warps=warps,
        )
    return qo, ko


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        qo, ko = rope_apply(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        return qo, ko

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        # An unused output's gradient arrives as zeros (autograd materializes grads by default).
        gq, gk = rope_apply(dq, dk, cos, sin, backward=True)
        return gq, gk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, Hq, T, hd), k (B, Hk, T, hd), cos/sin (B, T, hd) or (T, hd) -> (q', k'), rotate-half RoPE."""
    return RopeFunction.apply(q, k, cos, sin)


def compile_specs() -> list:
    """The GPU compilations of tests/test_kernels_compile.py (kernels/compile_spec.py): forward and
    backward for a 128-wide head as rope_apply tiles it, bf16 on every target, fp32 on sm_80, and
    the one-token-a-program variant of short sequences."""
    from lora_engine.kernels.compile_spec import TARGETS, CompileSpec, signature

    ints = ("T", "Hq", "HALF", "sq_b", "sq_h", "sq_t", "sk_b", "sk_h", "sk_t", "sqo_b", "sqo_h", "sqo_t",
            "sko_b", "sko_h", "sko_t", "sc_b", "sc_t")
    half = 64
    _, block_t, _ = row_tile(half, max_rows=4096)  # rope_apply's rule for a long sequence
    specs = []
    for t, targets in (("bf16", TARGETS), ("fp32", (80,))):
        sig = signature(_rope_kernel, t, **dict.fromkeys(ints, "i32"))
        for bwd in (False, True):
            specs.append(CompileSpec(f"rope_{'bwd' if bwd else 'fwd'}/{t}", _rope_kernel, sig,
                                     {"BLOCK_T": block_t, "BLOCK_HALF": half, "BACKWARD": bwd}, targets))
        if t == "bf16":
            specs.append(CompileSpec("rope_fwd_T1/bf16", _rope_kernel, sig,
                                     {"BLOCK_T": 1, "BLOCK_HALF": half, "BACKWARD": False}, (80,)))
    return specs
