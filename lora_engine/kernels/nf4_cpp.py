"""The C++ NF4 ops (csrc/nf4.cpp, registered as torch.ops.lora_engine.*) behind the NF4Tensor type.

The extension `lora_engine.kernels._C` is optional: `available()` says whether it is built; callers fall
back to kernels/nf4_reference.py when it is not (lora_engine.nf4 warns once). Imports torch only.
"""

from __future__ import annotations

import functools

import torch

from lora_engine.kernels.nf4_format import NF4Tensor


@functools.cache
def available() -> bool:
    try:
        import lora_engine.kernels._C  # noqa: F401  (importing it registers the ops)
    except ImportError:
        return False
    return True


def nf4_dequantize(w: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same contract as nf4_reference.nf4_dequantize, bit for bit; CPU tensors, extension built."""
    dtype = w.dtype if dtype is None else dtype
    ops = torch.ops.lora_engine
    if w.is_nested:  # the C++ op decodes the double-quantized absmax on the fly
        flat = ops.nf4_dequantize(w.packed, w.absmax, w.code, w.blocksize, w.numel, dtype,
                                  w.nested_absmax, w.nested_code, w.nested_offset, w.nested_blocksize)
    else:
        flat = ops.nf4_dequantize(w.packed, w.absmax, w.code, w.blocksize, w.numel, dtype)
    return flat.view(w.shape)
