"""NF4 quantization, dequantization and NF4 linear layers in pure PyTorch: the oracle and the CPU fallback.

Format: kernels/nf4_format.py. Quantization reproduces bitsandbytes 0.50.2 on CPU bit for bit:
  4-bit (backends/default/ops.py quantize_4bit): full blocks scale by x * (1 / max(absmax, 1e-38)),
    the short last block by x / max(absmax, 1e-38) (and stores the clamped absmax); clamp to [-1, 1];
    index = bucketize(scaled, midpoints of the code): a value on a midpoint takes the lower code.
  double quant (csrc/common.cpp quantize_block, blocks of 256 over absmax - mean(absmax)):
    normed = a / max|a| (fp32 division), the code value at or below normed, moved one right only
    when strictly nearer; an all-zero group (0/0 = NaN) stores index 0, as bitsandbytes does.
Dequantization follows bitsandbytes' CPU path bit for bit:
  absmax (nested) = DYN[qabsmax] * nested_absmax[b // 256] + offset        (fp32)
  W[i]            = NF4[q[i]] * absmax[i // blocksize]                     (fp32, then cast once)
Linear layers never keep the dequantized weight: forward dequantizes, backward dequantizes again.
  y = x W^T + b           dX = dY W         (W frozen: no dW; db = sum of dY when b wants a grad)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from lora_engine.kernels import amp
from lora_engine.kernels.dtypes import FLOAT_DTYPES, FLOAT_NAMES
from lora_engine.kernels.nf4_format import (
    BLOCKSIZES,
    DYNAMIC_MAP_SIGNED,
    NESTED_BLOCKSIZE,
    NF4_CODE,
    NF4Tensor,
)
from lora_engine.kernels.ops_reference import low_rank_linear


def check_quantize_args(w: torch.Tensor, blocksize: int, name: str = "weight") -> None:
    """Raise ValueError (naming the tensor) for what bitsandbytes could not quantize either."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"nf4 quantize: {name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"nf4 quantize: {name} has dtype {w.dtype}; NF4 quantizes {FLOAT_NAMES} "
                         "(convert it first, e.g. w.float())")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"nf4 quantize: blocksize {blocksize} not allowed for {name}; use one of {BLOCKSIZES}")
    if w.numel() == 0:
        raise ValueError(f"nf4 quantize: {name} of shape {tuple(w.shape)} is empty")


def check_finite(w: torch.Tensor, absmax: torch.Tensor, name: str = "weight") -> None:
    """Raise ValueError when w holds inf/NaN, seen cheaply in its block maxima (n / blocksize values).
    A fake tensor (a memory plan, a compiler's trace) has no values to check."""
    if is_fake(absmax):
        return
    if not bool(torch.isfinite(absmax).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise ValueError(f"nf4 quantize: {name} of shape {tuple(w.shape)} holds {bad} inf/NaN values; "
                         "NF4 scales by the block maximum, so fix the weights first")


@functools.cache
def _dynamic_map_lut(device: torch.device) -> torch.Tensor:
    """The lookup table of DYNAMIC_MAP_SIGNED, built once per device (it is the same for every weight)."""
    return _absmax_lut(DYNAMIC_MAP_SIGNED.to(device))


def _absmax_lut(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' 65536-entry lookup table from a normalized value's bin to its code index:
    bin i stands for fl(fl(2i / 65535) - 1) and maps to the number of code midpoints below it."""
    i = torch.arange(65536, dtype=torch.float32, device=code.device)
    val = (i * 2.0) / 65535.0 - 1.0
    mid = (code[:-1] + code[1:]) * 0.5
    return torch.searchsorted(mid, val)  # side="left": the count of midpoints strictly below val


def quantize_absmax(a: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """bitsandbytes 0.50.2's 8-bit blockwise quantization on CPU (quantize_cpu_impl<float>).

    a fp32 (n,), code fp32 (256,) sorted -> (uint8 (n,), fp32 absmax (ceil(n/blocksize),)). Per group:
    x = clamp(a * fl(1 / max|a|), -1, 1); bin = trunc(fma((x + 1) * 0.5, 65535, 0.5)); q = lut[bin]. The
    fma rounds once: its exact value fits in fp64, so fp64 arithmetic then one cast to fp32 is the same.
    An all-zero group stores absmax 0 and indices 0.
    """
    n = a.numel()
    groups = -(-n // blocksize)
    padded = F.pad(a, (0, groups * blocksize - n)).view(groups, blocksize)
    amax = padded.abs().amax(1)  # (groups,); zero padding cannot raise a max of absolute values
    x = torch.clamp(padded * (1.0 / amax).view(-1, 1), -1.0, 1.0)
    t = (x + 1.0) * 0.5
    bins = (t.double() * 65535.0 + 0.5).float().trunc().long()
    same = not is_fake(a) and code.device == DYNAMIC_MAP_SIGNED.device and torch.equal(code, DYNAMIC_MAP_SIGNED)
    lut = _dynamic_map_lut(code.device) if same else _absmax_lut(code)
    q = lut[bins.clamp(0, 65535)]
    q = torch.where((amax == 0).view(-1, 1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].to(torch.uint8), amax


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """W (any shape, fp32/fp16/bf16) -> NF4Tensor, identical to bitsandbytes.functional.quantize_4bit
    (quant_type="nf4", compress_statistics=double_quant) on CPU."""
    check_quantize_args(w, blocksize)
    a = w.detach().reshape(-1).float()
    n = a.numel()
    rem = n % blocksize
    full = n - rem
    blocks = a[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(-1) if full else a.new_zeros(0)
    # Same expressions as bitsandbytes: a reciprocal for full blocks, a division for the short one.
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        am = a[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / am, -1, 1)])
    check_finite(w, absmax)
    if n % 2:
        scaled = F.pad(scaled, (0, 1))
    code = NF4_CODE.to(a.device)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    packed = (q[::2] << 4) | q[1::2]
    return nf4_from_blocks(packed, absmax, tuple(w.shape), w.dtype, blocksize, double_quant)


def nf4_from_blocks(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                    blocksize: int, double_quant: bool) -> NF4Tensor:
    """Finish a quantization from its 4-bit part (packed uint8, fp32 absmax per block), adding
    bitsandbytes' double quantization of the absmax when asked. Shared by the PyTorch and C++ paths."""
    code = NF4_CODE.to(packed.device, copy=True)  # each weight owns its table (safetensors rejects shared storage)
    if not double_quant:
        return NF4Tensor(packed, absmax, code, blocksize, shape, dtype)
    offset = absmax.mean()
    dyn = DYNAMIC_MAP_SIGNED.to(packed.device)
    qabs, nested = quantize_absmax(absmax - offset, dyn)
    return NF4Tensor(packed, qabs, code, blocksize, shape, dtype,
                     nested_absmax=nested, nested_code=dyn.clone(),
                     nested_offset=0.0 if is_fake(offset) else offset.item())  # a fake weight has no mean


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


class NF4LinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) with W in NF4. Only the NF4Tensor (a few bytes per weight) is kept for backward."""

    @staticmethod
    def forward(ctx, x, w: NF4Tensor, bias, dequantize):
        ctx.w, ctx.dequantize = w, dequantize
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize(w, x.dtype), bias)

    @staticmethod
    def backward(ctx, dy):
        dx = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ ctx.dequantize(ctx.w, dy.dtype)  # dequantized again: W is never saved
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0)
        return dx, None, db, None


def _check(x: torch.Tensor, w: NF4Tensor, name: str) -> None:
    if not isinstance(w, NF4Tensor):
        raise TypeError(f"{name}: weight must be an NF4Tensor, got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"{name}: NF4 weight must be 2-D (out, in), got shape {w.shape}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"{name}: x has {x.shape[-1]} features, the NF4 weight {w.shape} expects {w.shape[1]}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: x must be {FLOAT_NAMES}, got {x.dtype}")


@amp.like_linear
def nf4_linear(x: torch.Tensor, w: NF4Tensor, bias: torch.Tensor | None = None, dequantize=None) -> torch.Tensor:
    """x (..., in) @ W^T -> (..., out) in x.dtype; W (out, in) dequantized to x.dtype on the fly.

    dequantize: an implementation with nf4_dequantize's contract (bit-exact with it), e.g. the C++
    op; None uses this file's PyTorch one. Under autocast x and bias are cast to the autocast dtype
    and W is dequantized to it (kernels/amp.py).
    """
    _check(x, w, "nf4_linear")
    return NF4LinearFunction.apply(x, w, bias, dequantize or nf4_dequantize)


@amp.like_linear
def nf4_lora_linear(
    x: torch.Tensor,
    w: NF4Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    x_dropped: torch.Tensor | None = None,
    dequantize=None,
) -> torch.Tensor:
    """y = x W^T (+ b) + scale * (xd A^T) B^T with W in NF4 (frozen); grads for x, A (r, in), B (out, r).

    `x_dropped` is dropout(x) when dropout is active, else x is used for the LoRA branch.
    """
    _check(x, w, "nf4_lora_linear")
    return low_rank_linear(x, w, bias, lora_A, lora_B, scale, x_dropped, dequantize or nf4_dequantize)
