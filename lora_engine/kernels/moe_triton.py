"""Triton grouped GEMM over experts with the LoRA path fused, and its backward (kernels/moe_grouped.py has the math).

Rows are grouped by expert (expert e owns rows [o_e, o_e + counts[e])), so every row block belongs to one
expert. The block -> (expert, first row) table is built on the device from counts (cumsum, searchsorted):
ceil(M / BLOCK_M) + E blocks bound the count of any grouping, and the blocks past the last expert's do
nothing (their loops run zero times, their stores are masked). counts never reaches the host.

_moe_lora_mm  C = P Q_e + s (P S_e) U_e (+ bias_e), T = P S_e stored by the first column block.
              The shrink P S_e is accumulated in the K loop from the same P tile the base product loads.
                forward:  P = x, Q_e = W_e^T, S_e = A_e^T, U_e = B_e^T  -> y, t
                backward: P = g, Q_e = W_e,   S_e = B_e,   U_e = A_e    -> dx, u = g B_e
_moe_seg_mm   D_e = s L_e^T P_e over expert e's rows, one program per (expert, R block, C block):
                dA_e = s u_e^T x_e,  dB_e^T = s t_e^T g_e,  dW_e = g_e^T x_e (full fine-tuning only)
              An expert without tokens gets zeros (the loop runs zero times).
Every per-expert operand is addressed by (expert, row, column) strides, so w may be a transposed view.
fp32 accumulation; t and u are rounded to the input dtype before the expand, like the reference's
(x_e A_e^T) in x's dtype. Under TRITON_INTERPRET the operands are widened to fp32 (dot_acc's UPCAST).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_engine.kernels._common import check_device, dot_acc, interpreting, kernel_op, launch_device, next_pow2


@triton.jit
def _moe_lora_mm(
    p_ptr, q_ptr, s_ptr, u_ptr, bias_ptr, c_ptr, t_ptr, blk_e_ptr, blk_row_ptr, ends_ptr,
    N, K, R, scale,
    s_pm, s_pk, s_qe, s_qk, s_qn, s_se, s_sk, s_sr, s_ue, s_ur, s_un, s_be, s_cm, s_cn, s_tm, s_tr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(blk_e_ptr + pid_m).to(tl.int64)  # a block past the last expert has first row == end
    row0 = tl.load(blk_row_ptr + pid_m).to(tl.int64)
    end = tl.load(ends_ptr + e).to(tl.int64)
    k_hi = tl.where(row0 < end, K, 0)  # nothing to do: skip the K loop

    rm = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    mmask = rm < end
    p_ptrs = p_ptr + rm[:, None] * s_pm + rk[None, :] * s_pk
    q_ptrs = q_ptr + e * s_qe + rk[:, None] * s_qk + rn[None, :] * s_qn
    s_ptrs = s_ptr + e * s_se + rk[:, None] * s_sk + rr[None, :] * s_sr
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_hi, BLOCK_K):
        kmask = rk + k0 < K
        p = tl.load(p_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
        acc = dot_acc(acc, p, q, UPCAST, PRECISION)
        if HAS_LORA:  # the shrink from the P tile already loaded
            sh = tl.load(s_ptrs, mask=kmask[:, None] & (rr[None, :] < R), other=0.0)
            t_acc = dot_acc(t_acc, p, sh, UPCAST, PRECISION)
            s_ptrs += BLOCK_K * s_sk
        p_ptrs += BLOCK_K * s_pk
        q_ptrs += BLOCK_K * s_qk

    if HAS_LORA:
        t = t_acc.to(c_ptr.dtype.element_ty)  # rounded like the reference's (x_e A_e^T)
        if pid_n == 0:  # one column block stores the shrink for backward
            tl.store(t_ptr + rm[:, None] * s_tm + rr[None, :] * s_tr, t, mask=mmask[:, None] & (rr[None, :] < R))
        ex = tl.load(u_ptr + e * s_ue + rr[:, None] * s_ur + rn[None, :] * s_un,
                     mask=(rr[:, None] < R) & (rn[None, :] < N), other=0.0)
        acc += scale * dot_acc(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), t, ex, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * s_be + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn, acc.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & (rn[None, :] < N))


@triton.jit
def _moe_seg_mm(
    l_ptr, p_ptr, d_ptr, ends_ptr,
    R, C, scale,
    s_lm, s_lr, s_pm, s_pc, s_de, s_dr, s_dc,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    e = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_c = tl.program_id(2)
    end = tl.load(ends_ptr + e).to(tl.int64)
    start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0).to(tl.int64)
    rr = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    rc = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mmask = rm < end
        lt = tl.load(l_ptr + rr[:, None] * s_lr + rm[None, :] * s_lm, mask=(rr[:, None] < R) & mmask[None, :],
                     other=0.0)  # L_e^T tile (BLOCK_R, BLOCK_M)
        p = tl.load(p_ptr + rm[:, None] * s_pm + rc[None, :] * s_pc, mask=mmask[:, None] & (rc[None, :] < C),
                    other=0.0)
        acc = dot_acc(acc, lt, p, UPCAST, PRECISION)
    tl.store(d_ptr + e * s_de + rr[:, None] * s_dr + rc[None, :] * s_dc, (acc * scale).to(d_ptr.dtype.element_ty),
             mask=(rr[:, None] < R) & (rc[None, :] < C))


def tile_config(dtype: torch.dtype, capability: tuple[int, int] | None) -> dict:
    """_moe_lora_mm's tiles (None: the interpreter). Per stage the P, Q and S tiles take
    (BLOCK_M + BLOCK_N + BLOCK_R) * BLOCK_K elements of shared memory; the compile test checks the limit."""
    if capability is None:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
    big_smem = capability in ((8, 0), (9, 0), (10, 0))
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64 if big_smem else 32, num_warps=4, num_stages=3)


def seg_config(capability: tuple[int, int] | None) -> dict:
    """_moe_seg_mm's tiles: (BLOCK_R, BLOCK_M) and (BLOCK_M, BLOCK_C) per stage."""
    if capability is None:
        return dict(BLOCK_M=32, BLOCK_R=16, BLOCK_C=32, num_warps=4, num_stages=1)
    return dict(BLOCK_M=32, BLOCK_R=64, BLOCK_C=128, num_warps=4, num_stages=3)


def _capability(x: torch.Tensor):
    return torch.cuda.get_device_capability(x.device) if x.is_cuda else None


def _precision(x: torch.Tensor) -> str:
    return "ieee" if (interpreting() or x.dtype == torch.float32) else "tf32"


def _blocks(counts: torch.Tensor, M: int, block_m: int):
    """(expert, first row) of each of the ceil(M / block_m) + E row blocks, each expert's end row, and the
    block count. A block past the last expert's gets the last expert and a first row equal to its end."""
    ends = torch.cumsum(counts, 0)
    starts = ends - counts
    nblk = (counts + block_m - 1) // block_m
    cum = torch.cumsum(nblk, 0)
    grid_m = triton.cdiv(M, block_m) + counts.shape[0]
    i = torch.arange(grid_m, device=counts.device)
    e = torch.searchsorted(cum, i, right=True).clamp_(max=counts.shape[0] - 1)
    row = starts[e] + (i - (cum[e] - nblk[e])) * block_m
    row = torch.minimum(row, ends[e])  # past the last block: first row == end, an empty block
    return e.to(torch.int32), row.to(torch.int64), ends.to(torch.int64), grid_m


def _lora_mm_fake(p, counts, q, sh, ex, bias, scale):
    return p.new_empty((p.shape[0], q.shape[2])), p.new_empty((p.shape[0], 0 if sh is None else sh.shape[2]))


@kernel_op("moe_lora_mm_triton", _lora_mm_fake)
def _lora_mm_op(p: torch.Tensor, counts: torch.Tensor, q: torch.Tensor, sh: torch.Tensor | None,
                ex: torch.Tensor | None, bias: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """C = P Q_e + s (P S_e) U_e (+ bias_e) over expert groups; q (E, K, N), sh (E, K, r), ex (E, r, N)."""
    c, t = _lora_mm_fake(p, counts, q, sh, ex, bias, scale)
    M, K = p.shape
    N = q.shape[2]
    if M == 0 or N == 0:
        return c, t
    cfg = tile_config(p.dtype, _capability(p))
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    blk_e, blk_row, ends, grid_m = _blocks(counts, M, cfg["BLOCK_M"])
    lora = sh is not None
    R = sh.shape[2] if lora else 0
    sh_, ex_ = (sh, ex) if lora else (q, q)
    with launch_device(p):
        _moe_lora_mm[(grid_m, triton.cdiv(N, cfg["BLOCK_N"]))](
            p, q, sh_, ex_, bias if bias is not None else p, c, t if lora else c, blk_e, blk_row, ends,
            N, K, R, float(scale),
            p.stride(0), p.stride(1), *q.stride(), *sh_.stride(), *ex_.stride(),
            bias.stride(0) if bias is not None else 0, c.stride(0), c.stride(1),
            t.stride(0) if lora else 0, t.stride(1) if lora else 0,
            HAS_BIAS=bias is not None, HAS_LORA=lora, UPCAST=interpreting(), PRECISION=_precision(p),
            BLOCK_R=max(16, next_pow2(R)), **cfg, **opts,
        )
    return c, t


def _seg_mm_fake(lo, p, counts, scale):
    return p.new_empty((counts.shape[0], lo.shape[1], p.shape[1]))


@kernel_op("moe_seg_mm_triton", _seg_mm_fake)
def _seg_mm_op(lo: torch.Tensor, p: torch.Tensor, counts: torch.Tensor, scale: float) -> torch.Tensor:
    """D_e (R, C) = s L_e^T P_e over each expert's rows; lo (M, R), p (M, C) -> (E, R, C)."""
    d = _seg_mm_fake(lo, p, counts, scale)
    E, R, C = d.shape
    if E == 0 or R == 0 or C == 0:
        return d
    cfg = seg_config(_capability(p))
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    ends = torch.cumsum(counts, 0).to(torch.int64)
    with launch_device(p):
        _moe_seg_mm[(E, triton.cdiv(R, cfg["BLOCK_R"]), triton.cdiv(C, cfg["BLOCK_C"]))](
            lo, p, d, ends, R, C, float(scale),
            lo.stride(0), lo.stride(1), p.stride(0), p.stride(1), *d.stride(),
            UPCAST=interpreting(), PRECISION=_precision(p), **cfg, **opts,
        )
    return d


def forward(x, counts, w, bias, a, b, scale):
    """(y, t) of moe_grouped's forward: P = x, Q_e = W_e^T, S_e = A_e^T, U_e = B_e^T (views, no copies)."""
    check_device("moe_grouped_mm", x=x, w=w)
    lora = a is not None
    return _lora_mm_op(x, counts, w.transpose(1, 2), a.transpose(1, 2) if lora else None,
                       b.transpose(1, 2) if lora else None, None if bias is None else bias.contiguous(), float(scale))


def backward(g, x, counts, w, a, b, t, scale, needs):
    """(dx, da, db, dw, dbias) of moe_grouped's backward; an unneeded gradient is an empty tensor."""
    need_dx, need_lora, need_dw, need_bias = needs
    lora = a is not None
    g = g.contiguous()
    empty = x.new_empty(0)
    dx, u = empty, None
    if need_dx or (need_lora and lora):
        # dx = g W_e + s u A_e with u = g B_e from the loaded g tile; with only dA asked, the shrink is still needed.
        dx, u = _lora_mm_op(g, counts, w, b if lora else None, a if lora else None, None, float(scale))
    da = db = empty
    if need_lora and lora:
        da = _seg_mm_op(u, x, counts, float(scale))  # (E, r, K)
        db = _seg_mm_op(t, g, counts, float(scale)).transpose(1, 2)  # (E, r, N) -> (E, N, r)
    dw = _seg_mm_op(g, x, counts, 1.0) if need_dw else empty
    dbias = empty
    if need_bias:
        expert = torch.repeat_interleave(torch.arange(counts.shape[0], device=g.device), counts,
                                         output_size=g.shape[0])
        dbias = g.new_zeros((counts.shape[0], g.shape[1]), dtype=torch.float32).index_add_(0, expert, g.float())
        dbias = dbias.to(g.dtype)
    return dx, da, db, dw, dbias


IMPL = (forward, backward)


def compile_specs() -> list:
    """The GPU compilations of tests/test_kernels_compile.py (kernels/compile_spec.py): _moe_lora_mm in its
    forward layout (P = x unit along K, Q = W^T unit along K) and backward layout (Q = W unit along N), with
    and without LoRA, tile_config's choice per target in bf16 and on sm_80/sm_90 in fp32; _moe_seg_mm's
    dA layout (L = u, P = x unit along columns) in bf16 on every target and in fp32 on sm_80/sm_90."""
    from lora_engine.kernels.compile_spec import TARGETS, CompileSpec, signature

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    strides = ("s_pm", "s_pk", "s_qe", "s_qk", "s_qn", "s_se", "s_sk", "s_sr", "s_ue", "s_ur", "s_un", "s_be",
               "s_cm", "s_cn", "s_tm", "s_tr")
    specs = []
    for t, dtype in dtypes.items():
        for layout, unit in (("fwd", ("s_pk", "s_qk", "s_sk", "s_ur", "s_cn", "s_tr")),
                             ("bwd", ("s_pk", "s_qn", "s_sr", "s_un", "s_cn", "s_tr"))):
            sig = signature(_moe_lora_mm, t, blk_e_ptr="*i32", blk_row_ptr="*i64", ends_ptr="*i64", N="i32",
                            K="i32", R="i32", scale="fp32", **{n: "constexpr" if n in unit else "i32" for n in strides})
            names = list(sig)
            aligned = [n for n in ("p_ptr", "q_ptr", "c_ptr", "N", "K", "s_pm", "s_qe", "s_qk", "s_qn", "s_cm")
                       if n not in unit]
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
            for lora in (True, False):
                fixed = dict(HAS_BIAS=layout == "fwd", HAS_LORA=lora, UPCAST=False, BLOCK_R=16, **{n: 1 for n in unit})
                for cc in TARGETS if t == "bf16" else (80, 90):
                    cfg = tile_config(dtype, (cc // 10, cc % 10))
                    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
                    consts = dict(cfg, PRECISION="ieee" if t == "fp32" else "tf32", **fixed)
                    name = f"moe_lora_mm_{layout}{'' if lora else '_nolora'}/{t}"
                    specs.append(CompileSpec(name, _moe_lora_mm, sig, consts, (cc,), opts, attrs))
        unit = ("s_lr", "s_pc")
        sig = signature(_moe_seg_mm, t, ends_ptr="*i64", R="i32", C="i32", scale="fp32",
                        **{n: "constexpr" if n in unit else "i32"
                           for n in ("s_lm", "s_lr", "s_pm", "s_pc", "s_de", "s_dr", "s_dc")})
        for cc in TARGETS if t == "bf16" else (80, 90):
            cfg = seg_config((cc // 10, cc % 10))
            opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
            consts = dict(cfg, UPCAST=False, PRECISION="ieee" if t == "fp32" else "tf32", s_lr=1, s_pc=1)
            specs.append(CompileSpec(f"moe_seg_mm/{t}", _moe_seg_mm, sig, consts, (cc,), opts))
    return specs
