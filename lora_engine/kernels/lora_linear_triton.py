"""Fused LoRA linear: y = x W^T (+ b) + s (x_d A^T) B^T, the low-rank path in the matmul's epilogue.

Shapes: x (..., K) flattened to (M, K); W (N, K) frozen, bf16/fp16/fp32 (NF4 weights are routed
to kernels/nf4_triton.py); A (r, K); B (N, r); b (N,) or None; s = scale (alpha / r); x_d =
dropout(x) when LoRA dropout is active (the caller owns the RNG), else x. y is (..., N) in x's dtype.

Forward (two launches instead of PEFT's three matmuls and two adds):
    t = x_d A^T                          (M, r)  thin torch matmul, saved for backward
    y = x W^T + s * t B^T + b            one Triton matmul over y: for each (BLOCK_M, BLOCK_N)
                                         tile, the K loop accumulates x W^T in fp32, then the
                                         epilogue adds s * t_tile @ B_tile^T (one extra tl.dot
                                         with r padded to >= 16) and the bias, and stores once.

Backward, with g = dL/dy (M, N), W frozen:
    u  = g B                             (M, r)  thin torch matmul
    dx = g W + s * u A                   the same Triton kernel with W read untransposed
    dA = s * u^T x_d                     (r, K)  torch matmul
    dB = s * g^T t                       (N, r)  torch matmul
    db = sum_m g;  dW = g^T x only if W requires grad (not the LoRA case, kept correct anyway)

Saved: x_d (x itself without dropout: no copy), t (M x r, tiny), W, A, B (references to
parameters); x is saved separately only when W or dropout needs it. Recomputed: nothing; u is
new. One kernel handles both matmuls because it takes strides: C = P Q + s * L R (+ bias).

Tiles: triton.autotune over a few (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) candidates per
(M, N, K) on a GPU; the interpreter runs the first candidate only (tile_config).

On a GPU the 16-bit operands go to tl.dot as they are (fp32 accumulation); fp32 operands use
input_precision="ieee" so the result matches torch's fp32 matmul (no TF32). Under
TRITON_INTERPRET the operands are widened to fp32 right after the load, because the interpreter's
bf16 arithmetic is wrong: it holds bf16 as raw uint16 (docs/triton_interpreter.md).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lora_engine.kernels import amp
from lora_engine.kernels._common import (
    check_device,
    check_float,
    check_lora,
    dot_acc,
    grouped_tile,
    interpreting,
    kernel_op,
    launch_device,
    next_pow2,
)
from lora_engine.kernels.nf4_format import NF4Tensor


@triton.jit
def _lora_mm(
    p_ptr, q_ptr, l_ptr, r_ptr, bias_ptr, c_ptr,
    M, N, K, R, scale,
    s_pm, s_pk, s_qk, s_qn, s_lm, s_lr, s_rr, s_rn, s_cm, s_cn,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)  # Q's column blocks in L2

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    p_ptrs = p_ptr + rm[:, None] * s_pm + rk[None, :] * s_pk
    q_ptrs = q_ptr + rk[:, None] * s_qk + rn[None, :] * s_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = rk + k0 < K
        p = tl.load(p_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=kmask[:, None] & (rn[None, :] < N), other=0.0)
        acc = dot_acc(acc, p, q, UPCAST, PRECISION)
        p_ptrs += BLOCK_K * s_pk
        q_ptrs += BLOCK_K * s_qk

    # Epilogue: the low-rank path, while the tile is still in registers.
    rr = tl.arange(0, BLOCK_R)
    lo = tl.load(l_ptr + rm[:, None] * s_lm + rr[None, :] * s_lr, mask=(rm[:, None] < M) & (rr[None, :] < R),
                 other=0.0)
    ro = tl.load(r_ptr + rr[:, None] * s_rr + rn[None, :] * s_rn, mask=(rr[:, None] < R) & (rn[None, :] < N),
                 other=0.0)
    acc += scale * dot_acc(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), lo, ro, UPCAST, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


def tile_config(dtype: torch.dtype, capability: tuple[int, int] | None) -> dict:
    """The first (default) tile choice for a GPU of this compute capability (None: the interpreter).

    Shared memory per stage is (BLOCK_M + BLOCK_N) * BLOCK_K * itemsize; the compile test
    (tests/test_kernels_compile.py) checks this choice against every target's limit.
    """
    if capability is None:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3)
    # 128x128x64 in 3 stages needs ~100 KB of shared memory: A100/H100/B200 have it, sm_75/86/89 not.
    big_smem = capability in ((8, 0), (9, 0), (10, 0))
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if big_smem else 32, GROUP_M=8, num_warps=8, num_stages=3)


# Further candidates on a GPU: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps). A candidate that
# does not fit the device's shared memory fails to compile and the autotuner skips it.
_CANDIDATES_16BIT = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 32, 4, 4), (64, 128, 64, 4, 4)]
_CANDIDATES_FP32 = [(128, 64, 32, 3, 4), (64, 128, 32, 3, 4)]


@functools.cache
def _tuned_kernel(dtype: torch.dtype, capability: tuple[int, int] | None):
    """_lora_mm under triton.autotune, keyed on (M, N, K): several tiles on a GPU, one in the interpreter.

    Multi-config autotuning needs a driver to time with, so the interpreter gets tile_config alone;
    the launch path (autotuner, grid from META) is the same in both.
    """
    first = tile_config(dtype, capability)
    meta = {k: first.pop(k) for k in ("num_warps", "num_stages")}
    configs = [triton.Config(first, **meta)]
    if capability is not None:
        for bm, bn, bk, stages, warps in _CANDIDATES_FP32 if dtype == torch.float32 else _CANDIDATES_16BIT:
            configs.append(triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8),
                                         num_warps=warps, num_stages=stages))
    return triton.autotune(configs=configs, key=["M", "N", "K"])(_lora_mm)


def _fused_mm_fake(p: torch.Tensor, q_t: torch.Tensor, lo: torch.Tensor, ro_t: torch.Tensor, scale: float,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    return torch.empty((p.shape[0], q_t.shape[1]), dtype=out_dtype, device=p.device)


def fused_mm(p, q_t, lo, ro_t, scale: float, bias, out_dtype) -> torch.Tensor:
    """C (M, N) = p (M, K) @ q_t (K, N) + scale * lo (M, r) @ ro_t (r, N) (+ bias (N,)); views allowed."""
    return _fused_mm_op(p, q_t, lo, ro_t, float(scale), bias, out_dtype)


@kernel_op("lora_mm_triton", _fused_mm_fake)
def _fused_mm_op(p: torch.Tensor, q_t: torch.Tensor, lo: torch.Tensor, ro_t: torch.Tensor, scale: float,
                 bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    M, K = p.shape
    N, R = q_t.shape[1], lo.shape[1]
    c = _fused_mm_fake(p, q_t, lo, ro_t, scale, bias, out_dtype)
    if M == 0 or N == 0:
        return c
    upcast = interpreting()
    precision = "ieee" if (upcast or p.dtype == torch.float32) else "tf32"
    kernel = _tuned_kernel(p.dtype, torch.cuda.get_device_capability(p.device) if p.is_cuda else None)

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    with launch_device(p):
        kernel[grid](
            p, q_t, lo, ro_t, bias if bias is not None else p, c,
            M, N, K, R, float(scale),
            p.stride(0), p.stride(1), q_t.stride(0), q_t.stride(1), lo.stride(0), lo.stride(1),
            ro_t.stride(0), ro_t.stride(1), c.stride(0), c.stride(1),
            HAS_BIAS=bias is not None, UPCAST=upcast, PRECISION=precision, BLOCK_R=max(16, next_pow2(R)),
        )
    return c


def _check(x, weight, bias, lora_A, lora_B, x_dropped):
    check_float("lora_linear", x=x, weight=weight, lora_A=lora_A, lora_B=lora_B)
    check_device("lora_linear", x=x, weight=weight)
    if weight.dim() != 2:
        raise ValueError(f"lora_linear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"lora_linear: x has shape {tuple(x.shape)} ({x.shape[-1] if x.dim() else 0} features), "
                         f"weight expects {K}")
    if weight.dtype != x.dtype:
        raise ValueError(f"lora_linear: weight is {weight.dtype} but x is {x.dtype}; cast them to one dtype")
    check_lora("lora_linear", x, N, K, lora_A, lora_B, x_dropped)
    if bias is not None and (bias.shape != (N,) or bias.device != x.device):
        raise ValueError(f"lora_linear: bias has shape {tuple(bias.shape)} on {bias.device}, expected ({N},) "
                         f"on {x.device}")


class LoraLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, x_dropped):
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xd2 = x2 if x_dropped is None else x_dropped.reshape(-1, x.shape[-1])
        t = xd2 @ lora_A.t()  # (M, r)
        y = fused_mm(x2, weight.t(), t, lora_B.t(), scale, bias, x.dtype)
        need_x = ctx.needs_input_grad[1]
        ctx.save_for_backward(xd2, t, weight, lora_A, lora_B, x2 if need_x else None)
        ctx.scale = scale
        ctx.shapes = (x.shape, lead)
        ctx.has_dropout = x_dropped is not None
        return y.view(*lead, weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xd2, t, weight, lora_A, lora_B, x2 = ctx.saved_tensors
        x_shape, _ = ctx.shapes
        s = ctx.scale
        g = dy.reshape(-1, weight.shape[0])
        u = g @ lora_B  # (M, r)
        need = ctx.needs_input_grad
        # With dropout, s * u A is the gradient of x_d, not of x: dx keeps only g W, and dropout's own
        # backward (mask / (1 - p)) runs in the caller's graph on the x_d gradient returned here.
        s_dx = 0.0 if ctx.has_dropout else s
        dx = fused_mm(g, weight, u, lora_A, s_dx, None, xd2.dtype).view(x_shape) if need[0] else None
        dw = g.t() @ x2 if need[1] else None
        db = g.sum(0) if need[2] else None
        dA = (u.t() @ xd2) * s if need[3] else None
        dB = (g.t() @ t) * s if need[4] else None
        dxd = ((u @ lora_A) * s).view(x_shape) if (ctx.has_dropout and need[6]) else None
        return dx, dw, db, dA, dB, None, dxd


@amp.like_linear
def lora_linear(x, weight, bias, lora_A, lora_B, scale, x_dropped=None) -> torch.Tensor:
    """y = x W^T (+ bias) + scale * (x_dropped A^T) B^T with the low-rank path fused into the matmul;
    ops_reference.lora_linear's signature.

    x (..., in); weight (out, in) bf16/fp16/fp32 (frozen) or an NF4Tensor (QLoRA kernels);
    lora_A (r, in); lora_B (out, r); bias (out,) or None; x_dropped like x or None (= x).
    Returns (..., out) in x's dtype. Differentiable in x, lora_A, lora_B (and bias, weight). Under
    autocast every tensor is cast to the autocast dtype first and the result has that dtype
    (kernels/amp.py): the autograd Function itself never sees autocast.
    """
    if isinstance(weight, NF4Tensor):
        from lora_engine.kernels import nf4_triton

        return nf4_triton.nf4_lora_linear(x, weight, bias, lora_A, lora_B, scale, x_dropped)
    _check(x, weight, bias, lora_A, lora_B, x_dropped)
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, scale, x_dropped)


def compile_specs() -> list:
    """The GPU compilations of tests/test_kernels_compile.py (kernels/compile_spec.py).

    _lora_mm as the JIT specializes it at run time (unit strides become constants, 16-divisible
    pointers and sizes are marked), so the software pipeliner runs and the shared-memory check
    means something; both operand layouts it is launched with (forward: P = x and Q = W^T unit
    along K; backward: Q = W unit along N), tile_config's choice for each target in bf16, for
    sm_80 and sm_90 in fp16 (forward) and fp32, and the autotuner's other 16-bit candidates on sm_90.
    """
    from lora_engine.kernels.compile_spec import TARGETS, CompileSpec, signature

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    strides = ("s_pm", "s_pk", "s_qk", "s_qn", "s_lm", "s_lr", "s_rr", "s_rn", "s_cm", "s_cn")
    specs = []
    for t, dtype in dtypes.items():
        for layout, unit in (("fwd", ("s_pk", "s_qk")), ("bwd", ("s_pk", "s_qn"))):
            if t == "fp16" and layout == "bwd":
                continue
            sig = signature(_lora_mm, t, M="i32", N="i32", K="i32", R="i32", scale="fp32",
                            **{n: "constexpr" if n in unit else "i32" for n in strides})
            names = list(sig)
            aligned = [n for n in ("p_ptr", "q_ptr", "c_ptr", "M", "N", "K", "s_pm", "s_pk", "s_qk", "s_qn", "s_cm")
                       if n not in unit]
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
            fixed = dict(HAS_BIAS=layout == "fwd", UPCAST=False, BLOCK_R=16, **{n: 1 for n in unit})
            for cc in TARGETS if t == "bf16" else (80, 90):
                cfg = tile_config(dtype, (cc // 10, cc % 10))
                opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
                consts = dict(cfg, PRECISION="ieee" if t == "fp32" else "tf32", **fixed)
                specs.append(CompileSpec(f"lora_mm_{layout}/{t}", _lora_mm, sig, consts, (cc,), opts, attrs))
            if t == "bf16" and layout == "fwd":  # the autotuner's other candidates, on the H100/H200 target
                for bm, bn, bk, stages, warps in _CANDIDATES_16BIT:
                    consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PRECISION="tf32", **fixed)
                    specs.append(CompileSpec(f"lora_mm_{layout}_{bm}x{bn}x{bk}/{t}", _lora_mm, sig, consts, (90,),
                                             {"num_warps": warps, "num_stages": stages}, attrs))
    return specs
