"""Flash attention in Triton, forward and backward: causal or not, a sliding window, a logit soft-cap, GQA.

Math (kernels/ops_reference.py:attention is the oracle): q (B, H, T, hd), k and v (B, Hk, S, hd), H = G * Hk
(query head h reads key/value head h // G); the queries are the last T of the S positions (p = S - T + i).

    s = scale q k^T,  s -> c tanh(s / c) with a soft-cap c,  masked: key <= p (causal), key > p - W (window W)
    o = softmax(s) v,  lse = logsumexp(s) per query row (fp32, saved for backward)

Forward (_attn_fwd): one program per (block of BLOCK_M queries, batch x head) walks the key blocks its
queries can see with an online softmax (running max m, sum l, fp32 accumulator rescaled by exp(m_old -
m_new)); the (T, S) scores never exist. The key range is [p0 - W + 1, p0 + BLOCK_M) for a block starting at
position p0 (rounded down to BLOCK_N): blocks wholly outside every query's window are never loaded, so a
window costs O(S x W), not O(S^2), in time; memory is O(S) (lse) besides the inputs and output.

Backward, with dO the output's gradient, P = exp(s - lse), Delta = rowsum(dO * o) (computed by torch):

    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Delta) * (1 - tanh^2(s_raw / c)) [soft-cap only]
    dQ = scale dS K,  dK = scale dS^T Q

_attn_bwd_dkdv: one program per (block of keys, batch x kv head), looping over the G query heads of the
group and over the query blocks that can see its keys, so dK and dV are summed over the group in registers
(no atomics, deterministic). _attn_bwd_dq: one program per query block, over the same key range as forward.

Layout: q, k, v, o, dO contiguous (B, heads, positions, hd); head dims that are not a power of two are
masked up to BLOCK_D = next power of two (at least 16, tl.dot's minimum). Offsets go through int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_engine.kernels._common import check_device, check_float, dot_acc, interpreting, kernel_op, launch_device

__all__ = ["attention", "serves", "tiles"]

MAX_HEAD_DIM = 256  # registers: a (BLOCK_M, BLOCK_D) fp32 accumulator per program


@triton.jit
def _tanh(x):
    # tanh through exp of a non-positive argument (never overflows); absolute error ~1 ulp of 1.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _allowed(pos, cols, S, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(BLOCK_M, BLOCK_N): which keys `cols` the queries at positions `pos` see."""
    ok = (cols < S)[None, :] & (pos >= 0)[:, None]
    if CAUSAL:
        ok = ok & (cols[None, :] <= pos[:, None])
    if WINDOW:
        ok = ok & (cols[None, :] > pos[:, None] - window)
    return ok


@triton.jit
def _key_range(p0, S, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr):
    """[lo, hi): the keys that queries p0 .. p0 + BLOCK_M - 1 can see, lo a multiple of BLOCK_N."""
    lo = 0
    hi = S
    if CAUSAL:
        hi = tl.minimum(S, p0 + BLOCK_M)
    if WINDOW:
        lo = (tl.maximum(0, p0 - window + 1) // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _scores(q, k, scale, softcap, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """(s, t): the (soft-capped) scores in fp32 and tanh(s_raw / c) (1.0 without a soft-cap)."""
    s = dot_acc(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), q, tl.trans(k), UPCAST, PRECISION) * scale
    t = s
    if SOFTCAP:
        t = _tanh(s / softcap)
        s = softcap * t
    return s, t


@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
              H, G, T, S, D, scale, softcap, window,
              CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    bhk = (bh // H) * (H // G) + (bh % H) // G
    q_base = bh.to(tl.int64) * T * D
    kv_base = bhk.to(tl.int64) * S * D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = rows + (S - T)
    dcol = tl.arange(0, BLOCK_D)
    qmask = (rows < T)[:, None] & (dcol < D)[None, :]
    q = tl.load(q_ptr + q_base + rows[:, None].to(tl.int64) * D + dcol[None, :], mask=qmask, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _key_range(pid_m * BLOCK_M + S - T, S, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kvmask = (cols < S)[:, None] & (dcol < D)[None, :]
        kv_off = kv_base + cols[:, None].to(tl.int64) * D + dcol[None, :]
        k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0)
        s, t = _scores(q, k, scale, softcap, SOFTCAP, BLOCK_M, BLOCK_N, UPCAST, PRECISION)
        s = tl.where(_allowed(pos, cols, S, window, CAUSAL, WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if not UPCAST:
            p = p.to(v_ptr.dtype.element_ty)  # the 16-bit MMA on a GPU (fp32 stays fp32)
        acc = dot_acc(acc * alpha[:, None], p, v, UPCAST, PRECISION)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # only padding rows (past T) see no key
    tl.store(o_ptr + q_base + rows[:, None].to(tl.int64) * D + dcol[None, :],
             (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=qmask)
    tl.store(lse_ptr + bh.to(tl.int64) * T + rows, m_i + tl.log(l_safe), mask=rows < T)


@triton.jit
def _attn_bwd_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                   H, G, T, S, D, scale, softcap, window,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    Hk = H // G
    b = bhk // Hk
    kv_base = bhk.to(tl.int64) * S * D
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    kvmask = (cols < S)[:, None] & (dcol < D)[None, :]
    kv_off = kv_base + cols[:, None].to(tl.int64) * D + dcol[None, :]
    k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0)
    v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    off = S - T
    # The query indices that see a key of this block: position >= n0 (causal), < n0 + BLOCK_N + W - 1 (window).
    lo = 0
    hi = T
    if CAUSAL:
        lo = (tl.maximum(0, n0 - off) // BLOCK_M) * BLOCK_M
    if WINDOW:
        hi = tl.minimum(T, n0 + BLOCK_N + window - 1 - off)
    for g in range(0, G):
        bh = b * H + (bhk % Hk) * G + g
        q_base = bh.to(tl.int64) * T * D
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            qmask = (rows < T)[:, None] & (dcol < D)[None, :]
            q_off = q_base + rows[:, None].to(tl.int64) * D + dcol[None, :]
            q = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
            do = tl.load(do_ptr + q_off, mask=qmask, other=0.0)
            lse = tl.load(lse_ptr + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
            delta = tl.load(delta_ptr + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
            s, t = _scores(q, k, scale, softcap, SOFTCAP, BLOCK_M, BLOCK_N, UPCAST, PRECISION)
            ok = _allowed(rows + off, cols, S, window, CAUSAL, WINDOW) & (rows < T)[:, None]
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = dot_acc(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), do, tl.trans(v), UPCAST, PRECISION)
            ds = p * (dp - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            if not UPCAST:
                p = p.to(do_ptr.dtype.element_ty)
                ds = ds.to(q_ptr.dtype.element_ty)
            dv = dot_acc(dv, tl.trans(p), do, UPCAST, PRECISION)
            dk = dot_acc(dk, tl.trans(ds), q, UPCAST, PRECISION)
    tl.store(dk_ptr + kv_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kvmask)
    tl.store(dv_ptr + kv_off, dv.to(dv_ptr.dtype.element_ty), mask=kvmask)


@triton.jit
def _attn_bwd_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                 H, G, T, S, D, scale, softcap, window,
                 CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    bhk = (bh // H) * (H // G) + (bh % H) // G
    q_base = bh.to(tl.int64) * T * D
    kv_base = bhk.to(tl.int64) * S * D
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pos = rows + (S - T)
    dcol = tl.arange(0, BLOCK_D)
    qmask = (rows < T)[:, None] & (dcol < D)[None, :]
    q_off = q_base + rows[:, None].to(tl.int64) * D + dcol[None, :]
    q = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
    do = tl.load(do_ptr + q_off, mask=qmask, other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    lo, hi = _key_range(pid_m * BLOCK_M + S - T, S, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        kvmask = (cols < S)[:, None] & (dcol < D)[None, :]
        kv_off = kv_base + cols[:, None].to(tl.int64) * D + dcol[None, :]
        k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0)
        v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0)
        s, t = _scores(q, k, scale, softcap, SOFTCAP, BLOCK_M, BLOCK_N, UPCAST, PRECISION)
        ok = _allowed(pos, cols, S, window, CAUSAL, WINDOW) & (rows < T)[:, None]
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dp = dot_acc(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        if not UPCAST:
            ds = ds.to(k_ptr.dtype.element_ty)
        dq = dot_acc(dq, ds, k, UPCAST, PRECISION)
    tl.store(dq_ptr + q_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qmask)


def tiles(head_dim: int, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) on a GPU: 64 x 64 score tiles forward, 32 x 64 backward (which
    holds K, V, dK, dV of its key block: 64 x 64 needs 80 KiB of shared memory on sm_75, over its 64 KiB);
    8 warps for heads wider than 64."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    return 32 if backward else 64, 64, block_d, 4 if block_d <= 64 else 8


def _launch_meta(q, causal, softcap, window, block_m, block_n, backward=False):
    bm, bn, bd, warps = tiles(q.shape[-1], backward)
    return dict(CAUSAL=bool(causal or window > 0), WINDOW=window > 0, SOFTCAP=softcap > 0,
                BLOCK_M=block_m or bm, BLOCK_N=block_n or bn, BLOCK_D=bd, UPCAST=interpreting(),
                PRECISION="ieee", num_warps=warps)  # fp32 dots for fp32 inputs; 16-bit MMA ignores it


def _fwd_fake(q, k, v, causal: bool, scale: float, softcap: float, window: int, block_m: int, block_n: int):
    B, H, T, _ = q.shape
    return torch.empty_like(q), torch.empty((B, H, T), dtype=torch.float32, device=q.device)


@kernel_op("attention_fwd_triton", _fwd_fake)
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, softcap: float,
            window: int, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous q (B, H, T, hd), k, v (B, Hk, S, hd) -> (o like q, lse (B, H, T) fp32). softcap 0 and
    window 0 mean none; block_m/block_n 0 mean tiles()'s."""
    o, lse = _fwd_fake(q, k, v, causal, scale, softcap, window, block_m, block_n)
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if o.numel():
        meta = _launch_meta(q, causal, softcap, window, block_m, block_n)
        with launch_device(q):
            _attn_fwd[(triton.cdiv(T, meta["BLOCK_M"]), B * H)](q, k, v, o, lse, H, H // Hk, T, S, D, scale,
                                                                  softcap, window, **meta)
    return o, lse


def _bwd_fake(do, q, k, v, o, lse, causal: bool, scale: float, softcap: float, window: int, block_m: int,
              block_n: int):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@kernel_op("attention_bwd_triton", _bwd_fake)
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
            lse: torch.Tensor, causal: bool, scale: float, softcap: float, window: int, block_m: int,
            block_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq like q, dk like k, dv like v); dk, dv summed over the query heads of each group."""
    dq, dk, dv = _bwd_fake(do, q, k, v, o, lse, causal, scale, softcap, window, block_m, block_n)
    B, H, T, D = q.shape
    Hk, S = k.shape[1], k.shape[2]
    if q.numel():
        delta = (do.float() * o.float()).sum(-1)  # (B, H, T) fp32: rowsum(dO * o)
        meta = _launch_meta(q, causal, softcap, window, block_m, block_n, backward=True)
        args = (H, H // Hk, T, S, D, scale, softcap, window)
        with launch_device(q):
            _attn_bwd_dkdv[(triton.cdiv(S, meta["BLOCK_N"]), B * Hk)](q, k, v, do, lse, delta, dk, dv, *args, **meta)
            _attn_bwd_dq[(triton.cdiv(T, meta["BLOCK_M"]), B * H)](q, k, v, do, lse, delta, dq, *args, **meta)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, config):
        o, lse = _fwd_op(q, k, v, *config)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.config = config
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd_op(do.contiguous(), q, k, v, o, lse, *ctx.config)
        return dq, dk, dv, None


def serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, mask, window: int | None) -> bool:
    """What this kernel computes exactly as ops_reference.attention does: no mask; causal attention only
    with T == S or a window (the reference's SDPA aligns T < S causal queries to the first keys); a head
    dim up to MAX_HEAD_DIM; float q, k, v of one dtype with H a multiple of Hk; on a GPU, or under the
    interpreter."""
    if mask is not None or q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        return False
    T, S = q.shape[2], k.shape[2]
    if (is_causal and window is None and T != S) or T > S or q.shape[-1] > MAX_HEAD_DIM:
        return False
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1] or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        return False
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    if isinstance(q, torch._subclasses.fake_tensor.FakeTensor):
        return False  # the memory plan models the reference's chunks: train/memory.py has no FLOP rule for these ops
    return q.is_cuda or (q.device.type == "cpu" and interpreting())


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None = None,
              softcap: float | None = None, window: int | None = None,
              blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """softmax(scale q k^T [soft-capped, causal, windowed]) v, q (B, H, T, hd) the last T of the S positions of
    k, v (B, Hk, S, hd) -> (B, H, T, hd) in q's dtype; differentiable in q, k, v. blocks: (BLOCK_M, BLOCK_N)
    instead of tiles()'s (the tests use small ones so that several blocks, and skipped ones, occur)."""
    check_float("attention", q=q, k=k, v=v)
    check_device("attention", q=q, k=k, v=v)
    if not serves(q, k, v, is_causal, None, window):
        raise ValueError(f"attention (triton): unsupported inputs q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} "
                         f"{k.dtype}, v {tuple(v.shape)} {v.dtype}, is_causal={is_causal}, window={window}; "
                         "use dispatch.attention, which falls back to the reference")
    if window is not None and window < 1:
        raise ValueError(f"attention (triton): window must be a number of keys >= 1, got {window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"attention (triton): softcap must be positive, got {softcap}")
    bm, bn = blocks or (0, 0)
    config = (bool(is_causal), float(q.shape[-1] ** -0.5 if scale is None else scale), float(softcap or 0.0),
              int(window or 0), int(bm), int(bn))
    return _FlashAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), config)


def compile_specs() -> list:
    """The GPU compilations of tests/test_kernels_compile.py (kernels/compile_spec.py): bf16 heads of 64 on
    every target, causal with a window and a soft-cap (the variant with the most code) and plain causal, and
    heads of 128 windowed on sm_80 and sm_90, with tiles()'s tiles."""
    from lora_engine.kernels.compile_spec import TARGETS, CompileSpec, arguments, signature

    types = dict(H="i32", G="i32", T="i32", S="i32", D="i32", scale="fp32", softcap="fp32", window="i32",
                 lse_ptr="*fp32", delta_ptr="*fp32")
    specs = []
    for d, targets, variants in ((64, TARGETS, (True, False)), (128, (80, 90), (True,))):
        for window, kernel in ((w, k) for w in variants for k in (_attn_fwd, _attn_bwd_dkdv, _attn_bwd_dq)):
            bm, bn, bd, warps = tiles(d, backward=kernel is not _attn_fwd)
            const = dict(CAUSAL=True, WINDOW=window, SOFTCAP=window, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
                         UPCAST=False, PRECISION="ieee")
            names = {a for a, _ in arguments(kernel)}
            sig = signature(kernel, "bf16", **{n: t for n, t in types.items() if n in names})
            specs.append(CompileSpec(f"{kernel.fn.__name__}/d{d}/window={window}/bf16", kernel, sig, const, targets,
                                     {"num_warps": warps}))
    return specs
