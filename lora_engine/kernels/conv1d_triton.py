"""The causal depthwise conv1d (+ SiLU) of a Gated DeltaNet layer in Triton, forward and backward.

kernels/conv1d_reference.py defines it: y[t] = act(p[t]), p[t] = bias + sum_{j<K} w[j] x[t - (K - 1) + j]
per channel, x (B, T, C) contiguous, tokens before 0 from initial_state (B, C, K - 1) or zeros. With
dp[t] = dy[t] act'(p[t]) (SiLU: s (1 + p (1 - s)), s = sigmoid(p)), for t' in [-(K - 1), T):

    dx[t'] = sum_j w[j] dp[t' + (K - 1) - j]  (terms with t' + (K - 1) - j in [0, T)); t' < 0 is d initial_state
    dw[j]  = sum_{b, t} dp[t] x[t - (K - 1) + j],   dbias = sum_{b, t} dp[t]

One program per (batch, BT tokens, BC channels), K a constexpr (Qwen3.5: 4). Backward recomputes p at
the K positions each dx row reads (K^2 loads of x, cheap at K = 4) instead of storing it, and writes
per-program partial sums of dw and dbias that PyTorch adds up. Math in fp32, one rounding on store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_engine.kernels._common import check_device, check_float, kernel_op, launch_device
from lora_engine.kernels.conv1d_reference import check_conv1d_args

BT, BC = 32, 64


@triton.jit
def _x_at(x_ptr, s_ptr, b, t, c, cmask, T, C, K: tl.constexpr, HAS_S: tl.constexpr):
    """x[b, t, c] for t in [-(K - 1), T) (initial state, or 0, before 0), 0 elsewhere; fp32."""
    inside = (t >= 0) & (t < T)
    xv = tl.load(x_ptr + (b * T + t)[:, None] * C + c[None, :], mask=inside[:, None] & cmask[None, :], other=0.0)
    xv = xv.to(tl.float32)
    if HAS_S:
        before = (t < 0) & (t >= -(K - 1))
        sv = tl.load(s_ptr + (b * C + c[None, :]) * (K - 1) + (t + K - 1)[:, None],
                     mask=before[:, None] & cmask[None, :], other=0.0)
        xv += sv.to(tl.float32)
    return xv


@triton.jit
def _pre_at(x_ptr, s_ptr, w_ptr, bias_ptr, b, t, c, cmask, T, C, K: tl.constexpr, HAS_S: tl.constexpr,
            HAS_BIAS: tl.constexpr):
    """p[b, t, c] (before the activation), fp32."""
    acc = tl.zeros((t.shape[0], c.shape[0]), dtype=tl.float32)
    for j in tl.static_range(K):
        w = tl.load(w_ptr + c * K + j, mask=cmask, other=0.0).to(tl.float32)
        acc += w[None, :] * _x_at(x_ptr, s_ptr, b, t - (K - 1) + j, c, cmask, T, C, K, HAS_S)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _conv_fwd(x_ptr, s_ptr, w_ptr, bias_ptr, y_ptr, T, C, K: tl.constexpr, HAS_S: tl.constexpr,
              HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    c = tl.program_id(2) * BC + tl.arange(0, BC)
    cmask = c < C
    p = _pre_at(x_ptr, s_ptr, w_ptr, bias_ptr, b, t, c, cmask, T, C, K, HAS_S, HAS_BIAS)
    if SILU:
        p = p * tl.sigmoid(p)
    tl.store(y_ptr + (b * T + t)[:, None] * C + c[None, :], p.to(y_ptr.dtype.element_ty),
             mask=(t < T)[:, None] & cmask[None, :])


@triton.jit
def _conv_bwd(dy_ptr, x_ptr, s_ptr, w_ptr, bias_ptr, dx_ptr, ds_ptr, dw_ptr, T, C, K: tl.constexpr,
              HAS_S: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr,
              BC: tl.constexpr):
    # Rows t' = program_id(1) * BT - (K - 1) + i cover [-(K - 1), T): the first K - 1 are d initial_state.
    b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    t = pid_t * BT - (K - 1) + tl.arange(0, BT)
    c = tl.program_id(2) * BC + tl.arange(0, BC)
    cmask = c < C
    dx = tl.zeros((BT, BC), dtype=tl.float32)
    for j in tl.static_range(K):
        tt = t + (K - 1) - j  # the outputs that read x[t'] through tap j
        ok = (tt >= 0) & (tt < T)
        dp = tl.load(dy_ptr + (b * T + tt)[:, None] * C + c[None, :], mask=ok[:, None] & cmask[None, :],
                     other=0.0).to(tl.float32)
        if SILU:
            p = _pre_at(x_ptr, s_ptr, w_ptr, bias_ptr, b, tt, c, cmask, T, C, K, HAS_S, HAS_BIAS)
            s = tl.sigmoid(p)
            dp = dp * s * (1.0 + p * (1.0 - s))
        w = tl.load(w_ptr + c * K + j, mask=cmask, other=0.0).to(tl.float32)
        dx += w[None, :] * dp
        if j == K - 1:  # tt == t: dp at this program's own rows gives the weight and bias gradients
            part = (b * tl.num_programs(1) + pid_t) * (K + 1)
            for m in tl.static_range(K):
                xs = _x_at(x_ptr, s_ptr, b, t - (K - 1) + m, c, cmask, T, C, K, HAS_S)
                tl.store(dw_ptr + (part + m) * C + c, tl.sum(dp * xs, 0), mask=cmask)
            tl.store(dw_ptr + (part + K) * C + c, tl.sum(dp, 0), mask=cmask)
    inside = (t >= 0) & (t < T)
    tl.store(dx_ptr + (b * T + t)[:, None] * C + c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=inside[:, None] & cmask[None, :])
    if HAS_S:
        before = t < 0
        tl.store(ds_ptr + (b * C + c[None, :]) * (K - 1) + (t + K - 1)[:, None], dx.to(ds_ptr.dtype.element_ty),
                 mask=before[:, None] & cmask[None, :])


def _fwd_fake(x, weight, bias, initial_state, silu):
    return x.new_empty(x.shape)


@kernel_op("causal_conv1d_fwd_triton", _fwd_fake)
def _fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, initial_state: torch.Tensor | None,
            silu: bool) -> torch.Tensor:
    B, T, C = x.shape
    K = weight.shape[-1]
    y = torch.empty_like(x)
    with launch_device(x):
        _conv_fwd[(B, triton.cdiv(T, BT), triton.cdiv(C, BC))](
            x, x if initial_state is None else initial_state, weight, weight if bias is None else bias, y, T, C,
            K=K, HAS_S=initial_state is not None, HAS_BIAS=bias is not None, SILU=silu, BT=BT, BC=BC)
    return y


def _bwd_fake(dy, x, weight, bias, initial_state, silu):
    B, _, C = x.shape
    K = weight.shape[-1]
    return (x.new_empty(x.shape), x.new_empty((B, C, K - 1)), x.new_empty((K + 1, C), dtype=torch.float32))


@kernel_op("causal_conv1d_bwd_triton", _bwd_fake)
def _bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            initial_state: torch.Tensor | None, silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d initial_state (B, C, K - 1), [dw (K rows); dbias] (K + 1, C) fp32)."""
    B, T, C = x.shape
    K = weight.shape[-1]
    n_t = triton.cdiv(T + K - 1, BT)
    dx = torch.empty_like(x)
    ds = x.new_empty((B, C, K - 1)) if initial_state is None else torch.empty_like(initial_state)
    parts = torch.zeros((B * n_t, K + 1, C), dtype=torch.float32, device=x.device)
    with launch_device(x):
        _conv_bwd[(B, n_t, triton.cdiv(C, BC))](
            dy, x, x if initial_state is None else initial_state, weight, weight if bias is None else bias,
            dx, ds, parts, T, C, K=K, HAS_S=initial_state is not None, HAS_BIAS=bias is not None,
            SILU=silu, BT=BT, BC=BC)
    return dx, ds, parts.sum(0)


class CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, initial_state, silu):
        ctx.save_for_backward(x, weight, bias, initial_state)
        ctx.silu = silu
        return _fwd_op(x, weight, bias, initial_state, silu)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, initial_state = ctx.saved_tensors
        dx, ds, dwb = _bwd_op(dy.contiguous(), x, weight, bias, initial_state, ctx.silu)
        dw = dwb[:-1].T.reshape(weight.shape).to(weight.dtype)
        db = None if bias is None else dwb[-1].to(bias.dtype)
        return dx, dw, db, None if initial_state is None else ds, None


def causal_conv1d(x, weight, bias=None, activation="silu", initial_state=None):
    """conv1d_reference.causal_conv1d's contract: x (B, T, C), weight (C, 1, K) -> (B, T, C) in x's dtype."""
    check_conv1d_args(x, weight, bias, activation, initial_state)
    check_float("causal_conv1d", x=x, weight=weight)
    check_device("causal_conv1d", x=x, weight=weight)
    x = x.contiguous()
    state = None if initial_state is None else initial_state.contiguous()
    return CausalConv1d.apply(x, weight.contiguous(), bias, state, activation == "silu")


def compile_specs() -> list:
    """The GPU compilations of tests/test_kernels_compile.py (kernels/compile_spec.py): Qwen3.5's K = 4 and
    SiLU without bias, with and without a state, in bf16 on every target; with a bias in fp32 on sm_80."""
    from lora_engine.kernels.compile_spec import TARGETS, CompileSpec, signature

    specs = []
    for dtype, bias, targets in (("bf16", False, TARGETS), ("fp32", True, (80,))):
        for has_s in (False, True):
            const = dict(K=4, HAS_S=has_s, HAS_BIAS=bias, SILU=True, BT=BT, BC=BC)
            for k in (_conv_fwd, _conv_bwd):
                types = dict(T="i32", C="i32") | ({"dw_ptr": "*fp32"} if k is _conv_bwd else {})
                specs.append(CompileSpec(f"{k.fn.__name__}/{dtype}/state={has_s}/bias={bias}", k,
                                         signature(k, dtype, **types), const, targets))
    return specs
