"""NF4 dequantization and NF4 linear layers in pure PyTorch: the oracle and the CPU fallback.

Format: kernels/nf4_format.py. Dequantization follows bitsandbytes' CPU path bit for bit:
  absmax (nested) = DYN[qabsmax] * nested_absmax[b // 256] + offset        (fp32)
  W[i]            = NF4[q[i]] * absmax[i // blocksize]                     (fp32, then cast once)
Linear layers never keep the dequantized weight: forward dequantizes, backward dequantizes again.
  y = x W^T + b           dX = dY W         (W frozen: no dW; db = sum of dY when b wants a grad)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lora_engine.kernels.nf4_format import NF4Tensor


def absmax_fp32(w: NF4Tensor) -> torch.Tensor:
    """The per-block absmax as fp32 (n_blocks,), decoding the double-quantized form when nested."""
    if not w.is_nested:
        return w.absmax.float()
    n = w.absmax.numel()
    nb = w.nested_blocksize
    vals = w.nested_code.float()[w.absmax.long()]  # (n_blocks,) fp32
    scale = w.nested_absmax.float().repeat_interleave(nb)[:n]  # a short last group keeps its own scale
    out = vals * scale
    # bitsandbytes adds the offset as an fp32 0-d tensor; a Python float of an fp32 value is exact too.
    return out + torch.tensor(w.nested_offset, dtype=torch.float32, device=out.device)


def unpack_indices(w: NF4Tensor) -> torch.Tensor:
    """packed uint8 (ceil(n/2),) -> code indices int64 (n,): high nibble first."""
    p = w.packed.reshape(-1)
    q = torch.stack((p >> 4, p & 0xF), dim=1).reshape(-1)
    return q[: w.numel].long()


def nf4_dequantize(w: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4Tensor -> tensor of w.shape in `dtype` (default w.dtype): code[q] * absmax, fp32 then cast."""
    dtype = w.dtype if dtype is None else dtype
    n, bs = w.numel, w.blocksize
    vals = w.code.float()[unpack_indices(w)]  # (n,) fp32
    am = absmax_fp32(w)
    pad = w.n_blocks * bs - n  # the short last block has its own absmax; pad to whole blocks, cut after
    if pad:
        vals = F.pad(vals, (0, pad))
    out = (vals.view(-1, bs) * am.view(-1, 1)).view(-1)[:n]
    return out.to(dtype).view(w.shape)


class _NF4Linear(torch.autograd.Function):
    """y = x W^T (+ b) with W in NF4. Only the NF4Tensor (a few bytes per weight) is kept for backward."""

    @staticmethod
    def forward(ctx, x, w: NF4Tensor, bias):
        ctx.w = w
        ctx.has_bias = bias is not None
        return F.linear(x, nf4_dequantize(w, x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ nf4_dequantize(ctx.w, dy.dtype)  # dequantized again: W is never saved
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, None, db


def _check(x: torch.Tensor, w: NF4Tensor, name: str) -> None:
    if not isinstance(w, NF4Tensor):
        raise TypeError(f"{name}: weight must be an NF4Tensor, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"{name}: NF4 weight must be 2-D (out, in), got shape {w.shape}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, the NF4 weight {w.shape} expects {w.shape[1]}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name}: x must be float32, float16 or bfloat16, got {x.dtype}")


def nf4_linear(x: torch.Tensor, w: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) @ W^T -> (..., out) in x.dtype; W (out, in) dequantized to x.dtype on the fly."""
    _check(x, w, "nf4_linear")
    return _NF4Linear.apply(x, w, bias)


def nf4_lora_linear(
    x: torch.Tensor,
    w: NF4Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T (+ b) + scale * (xd A^T) B^T with W in NF4 (frozen); grads for x, A (r, in), B (out, r).

    `x_dropped` is dropout(x) when dropout is active, else x is used for the LoRA branch.
    """
    _check(x, w, "nf4_lora_linear")
    xd = x if x_dropped is None else x_dropped
    return nf4_linear(x, w, bias) + F.linear(F.linear(xd, lora_A), lora_B) * scale
