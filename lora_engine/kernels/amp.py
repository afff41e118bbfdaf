"""The one rule for every kernel under torch.autocast (bf16 or fp16, CPU or CUDA, every backend).

autocast rewrites calls of the torch ops it lists (F.linear, matmul, addmm, ...) one by one. Our
ops are custom autograd Functions, Triton launches and sequences that mix listed ops with in-place
ones (addmm_ is not autocast), so autocast alone would give each op a mix of dtypes, a crash
(`addmm_(): self and mat2 must have the same dtype`) or, for a Triton Function, fp32 inputs. So
each op states its own policy and applies it before it runs:

  matmul ops (lora_linear, nf4_linear, nf4_lora_linear, linear_cross_entropy): decorated with
      @like_linear. Under autocast every floating tensor argument (x, weight, bias, lora_A,
      lora_B, x_dropped; hidden and the head weight) is cast to the autocast dtype, exactly as
      autocast casts F.linear's arguments, and the op runs with autocast off, so its inside is
      the same code that runs on a bf16/fp16 model. Products accumulate in fp32 (the GEMMs and the
      kernels do) and the result has the autocast dtype, like F.linear's. The casts are recorded by
      autograd: an fp32 parameter (the LoRA adapters) gets its gradient computed in the autocast
      dtype and widened to an fp32 .grad, which is what autocast gives nn.Linear's weight. An NF4
      weight is dequantized straight to the autocast dtype.
      linear_cross_entropy casts only its head matmul's operands: the max, logsumexp, softmax and
      the loss stay fp32 (the loss is an fp32 scalar under any precision).
  dtype-preserving ops (rms_norm, rope, swiglu): untouched, as autocast leaves elementwise ops.
      Their math is fp32 inside already. rms_norm returns promote(x, weight) like LlamaRMSNorm (an
      fp32 residual stream stays fp32); swiglu keeps its inputs' dtype; rope with bf16 q and k and
      the fp32 cos/sin of an fp32 model returns fp32 in the reference (transformers' promotion)
      and q's dtype in Triton; the next op (SDPA, autocast) casts both to bf16, same values.

torch.amp.custom_fwd(cast_inputs=...) would do the cast for one device type and one dtype fixed at
decoration; these ops serve CPU and CUDA, bf16 and fp16, so the dtype is read at the call.
Outside autocast nothing changes: the ops keep their inputs' dtypes. Imports torch only.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import torch


def amp_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on t's device now, or None when autocast is off there."""
    device = t.device.type
    if device not in ("cpu", "cuda"):  # meta, xpu, ...: no policy of ours applies
        return None
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def off(t: torch.Tensor):
    """A context that turns autocast off on t's device while it is on there (else does nothing)."""
    return torch.autocast(t.device.type, enabled=False) if amp_dtype(t) is not None else nullcontext()


def _cast(value, dtype: torch.dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != dtype:
        return value.to(dtype)
    return value


def like_linear(fn):
    """Decorate an op whose first argument is a tensor: under autocast, cast its floating tensor
    arguments to the autocast dtype and run it with autocast off (see the module docstring)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dtype = amp_dtype(args[0])
        if dtype is None:
            return fn(*args, **kwargs)
        args = tuple(_cast(a, dtype) for a in args)
        kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
        with torch.autocast(args[0].device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper
