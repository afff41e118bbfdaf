"""RMSNorm: y = weight * cast(x * rstd), rstd = 1 / sqrt(mean(x^2) + eps), per row, with backward.

Shapes: x (..., D) in fp32/fp16/bf16, flattened to N rows of D (last dimension contiguous);
weight (D,). y has x's shape and the promoted dtype of x and weight, exactly like transformers'
LlamaRMSNorm (`weight * hidden.to(input_dtype)`): the statistics in fp32, the normalised row
rounded to x's dtype, then scaled by the weight. A program handles ROWS rows (one when D >= 2048);
a row fits one block (BLOCK_D = next power of two >= D; D is a few thousand at most).

Backward, with n = x * rstd and g = dy * weight (the cast is treated as the identity):

    dx = rstd * (g - n * mean(g * n))         (the projection that keeps the row's rms fixed)
    dw = sum over rows of dy * cast(n)

Saved: x, weight and rstd (N fp32 values); n is recomputed. dweight is computed (norms are frozen
in LoRA, but a full fine-tune or a test may train them): each backward program walks row blocks
pid, pid + P, ... and keeps a partial dw in registers; the P partials are summed by torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_engine.kernels._common import check_device, check_float, kernel_op, launch_device, row_tile


@triton.jit
def _rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, N, D, stride_x, stride_y, eps,
             ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # (ROWS,)
    n = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)  # transformers rounds to x's dtype here
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], (w[None, :] * n).to(y_ptr.dtype.element_ty),
             mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < N)


@triton.jit
def _rms_bwd(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr,
    N, D, stride_dy, stride_x, stride_dx,
    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_DW: tl.constexpr,
):
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # Row blocks pid, pid + P, ...; row indices are int64 so that row * stride cannot overflow.
    for i in range(0, tl.cdiv(tl.cdiv(N, ROWS) - pid, P)):
        rows = (pid.to(tl.int64) + i * P) * ROWS + tl.arange(0, ROWS)
        mask = (rows[:, None] < N) & cmask[None, :]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rows < N, other=0.0)
        n = x * rstd[:, None]
        g = dy * w[None, :]
        dx = rstd[:, None] * (g - n * (tl.sum(g * n, axis=1) / D)[:, None])
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += tl.sum(dy * n.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
    if COMPUTE_DW:
        tl.store(dw_ptr + pid * D + cols, dw, mask=cmask)


def launch_settings(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, rows a program handles, num_warps): up to 16 narrow rows, one wide row (D > 1024) with
    8 warps from D > 2048 (kernels/_common.py:row_tile)."""
    return row_tile(D, max_rows=16)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rms_fwd_fake(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    N, D = x2.shape
    return (torch.empty((N, D), dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device),
            torch.empty(N, dtype=torch.float32, device=x2.device))


@kernel_op("rms_norm_fwd_triton", _rms_fwd_fake)
def _rms_fwd_op(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (N, D) rows with unit last stride -> (y (N, D) contiguous, rstd (N,) fp32)."""
    y, rstd = _rms_fwd_fake(x2, weight, eps)
    N, D = x2.shape
    if N and D:
        with launch_device(x2):
            block, rows, warps = launch_settings(D)
            _rms_fwd[(triton.cdiv(N, rows),)](x2, weight.contiguous(), y, rstd, N, D, x2.stride(0), y.stride(0),
                                              float(eps), ROWS=rows, BLOCK_D=block, num_warps=warps)
    return y, rstd


def _rms_bwd_fake(dy2, x2, weight, rstd, need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dw = torch.empty(x2.shape[1] if need_dw else 0, dtype=weight.dtype, device=x2.device)
    return torch.empty_like(x2), dw


@kernel_op("rms_norm_bwd_triton", _rms_bwd_fake)
def _rms_bwd_op(dy2: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                need_dw: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (dx like x2, dw (D,) in weight's dtype, or (0,) when not needed)."""
    N, D = x2.shape
    dx = torch.empty_like(x2)
    block, rows, warps = launch_settings(D)
    blocks = triton.cdiv(N, rows)
    programs = max(1, min(blocks, 4 * torch.cuda.get_device_properties(x2.device).multi_processor_count
                          if x2.is_cuda else 4))
    dw_part = torch.empty((programs, D) if need_dw else (1,), dtype=torch.float32, device=x2.device)
    if N and D:
        with launch_device(x2):
            _rms_bwd[(programs,)](dy2, x2, weight.contiguous(), rstd, dx, dw_part, N, D,
                                  dy2.stride(0), x2.stride(0), dx.stride(0),
                                  ROWS=rows, BLOCK_D=block, COMPUTE_DW=need_dw, num_warps=warps)
    if not need_dw:
        return dx, torch.empty(0, dtype=weight.dtype, device=x2.device)
    return dx, (dw_part.sum(0) if N else torch.zeros(D, device=x2.device)).to(weight.dtype)


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """-> (y with x's shape, x as (N, D) rows, rstd (N,) fp32)."""
    check_float("rms_norm", x=x, weight=weight)
    check_device("rms_norm", x=x, weight=weight)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) for x "
                         f"of shape {tuple(x.shape)}")
    if not eps > 0:
        raise ValueError(f"rms_norm: eps must be positive, got {eps}")
    x2 = _rows(x)
    y, rstd = _rms_fwd_op(x2, weight, float(eps))
    return y.view(x.shape), x2, rstd


def rms_norm_backward(dy: torch.Tensor, x2: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, need_dw: bool):
    dx, dw = _rms_bwd_op(_rows(dy), x2, weight, rstd, bool(need_dw))
    return dx, dw if need_dw else None


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, x2, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x2, weight, rstd, ctx.needs_input_grad[1])
        return dx.view(ctx.x_shape), dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) fp32/fp16/bf16, weight (D,) -> (..., D) in promote(x.dtype, weight.dtype)."""
    return RMSNormFunction.apply(x, weight, eps)


def compile_specs() -> list:
    """The GPU compilations of tests/test_kernels_compile.py (kernels/compile_spec.py), tiled by the
    launchers' own rules: a 4096-wide row (one row a program) in bf16 on every target and fp32 on
    sm_80, D = 4231 (BLOCK_D 8192, the widest tile a test runs) and D = 128 (16 rows a program)."""
    from lora_engine.kernels.compile_spec import TARGETS, CompileSpec, signature

    ints = dict.fromkeys(("N", "D", "stride_x", "stride_y", "stride_dy", "stride_dx"), "i32")
    specs = []
    for t, d, targets in (("bf16", 4096, TARGETS), ("fp32", 4096, (80,)), ("bf16", 4231, (80,)), ("bf16", 128, (80,))):
        block, rows, warps = launch_settings(d)
        tiles = {"ROWS": rows, "BLOCK_D": block}
        opts = {"num_warps": warps}
        fwd = {k: v for k, v in ints.items() if k in ("N", "D", "stride_x", "stride_y")}
        bwd = {k: v for k, v in ints.items() if k != "stride_y"}
        specs.append(CompileSpec(f"rms_fwd_D{d}/{t}", _rms_fwd,
                                 signature(_rms_fwd, t, rstd_ptr="*fp32", eps="fp32", **fwd), tiles, targets, opts))
        specs.append(CompileSpec(f"rms_bwd_D{d}/{t}", _rms_bwd,
                                 signature(_rms_bwd, t, rstd_ptr="*fp32", dw_ptr="*fp32", **bwd),
                                 dict(tiles, COMPUTE_DW=True), targets, opts))
    return specs
