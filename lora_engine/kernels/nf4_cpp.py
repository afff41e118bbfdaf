"""The C++ NF4 ops (csrc/, registered as torch.ops.lora_engine.*) behind nf4_reference's functions.

The extension `lora_engine.kernels._C` is optional: `available()` is the one cached probe of whether
it is built; lora_engine.dispatch chooses this module (backend "cpp") only when it is, and otherwise
falls back to kernels/nf4_reference.py. Same functions and contracts as nf4_reference, bit for bit:
quantize on CPU; dequantize on CPU, and on CUDA when the extension was built with nvcc (`has_cuda()`);
nf4_linear / nf4_lora_linear are the reference's autograd around the C++ dequantizer.
Imports torch and the kernels package only.
"""

from __future__ import annotations

import torch

from lora_engine.kernels import nf4_reference as ref
from lora_engine.kernels.nf4_format import NF4_CODE, NF4Tensor

_built: bool | None = None  # the one probe's answer; None until asked


def available() -> bool:
    """Whether the C++ extension is built (importing it registers torch.ops.lora_engine.*, and this
    registers their fake implementations, so torch.compile and FakeTensorMode trace through them).

    A plain module global, not functools.cache: torch.compile reads it as a constant instead of
    tracing the probe."""
    global _built
    if _built is None:
        try:
            import lora_engine.kernels._C  # noqa: F401
        except ImportError:
            _built = False
        else:
            _register_fakes()
            _built = True
    return _built


def has_cuda() -> bool:
    """Whether the built extension has a CUDA kernel for nf4_dequantize (csrc/nf4_dequant.cu)."""
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key("lora_engine::nf4_dequantize", "CUDA")


def _register_fakes() -> None:
    """Shapes and dtypes of the C++ ops' outputs (csrc/nf4.cpp), for tracing without running them."""
    @torch.library.register_fake("lora_engine::nf4_quantize")
    def _quantize_fake(w, code, blocksize):
        n = w.numel()
        return w.new_empty(((n + 1) // 2,), dtype=torch.uint8), w.new_empty((-(-n // blocksize),), dtype=torch.float32)

    @torch.library.register_fake("lora_engine::nf4_dequantize")
    def _dequantize_fake(packed, absmax, code, blocksize, numel, dtype, nested_absmax=None, nested_code=None,
                         nested_offset=0.0, nested_blocksize=256):
        return packed.new_empty((numel,), dtype=dtype)


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Same contract as nf4_reference.nf4_quantize, bit for bit; w a CPU tensor."""
    ref.check_quantize_args(w, blocksize)
    packed, absmax = torch.ops.lora_engine.nf4_quantize(w.detach(), NF4_CODE, blocksize)
    ref.check_finite(w, absmax)
    return ref.nf4_from_blocks(packed, absmax, tuple(w.shape), w.dtype, blocksize, double_quant)


def nf4_dequantize(w: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Same contract as nf4_reference.nf4_dequantize, bit for bit."""
    dtype = w.dtype if dtype is None else dtype
    ops = torch.ops.lora_engine
    if w.is_nested:  # the C++ op decodes the double-quantized absmax on the fly
        flat = ops.nf4_dequantize(w.packed, w.absmax, w.code, w.blocksize, w.numel, dtype,
                                  w.nested_absmax, w.nested_code, w.nested_offset, w.nested_blocksize)
    else:
        flat = ops.nf4_dequantize(w.packed, w.absmax, w.code, w.blocksize, w.numel, dtype)
    return flat.view(w.shape)


def nf4_linear(x: torch.Tensor, w: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """nf4_reference.nf4_linear with the C++ dequantizer."""
    return ref.nf4_linear(x, w, bias, dequantize=nf4_dequantize)


def nf4_lora_linear(x, w: NF4Tensor, bias, lora_A, lora_B, scale: float, x_dropped=None) -> torch.Tensor:
    """nf4_reference.nf4_lora_linear with the C++ dequantizer."""
    return ref.nf4_lora_linear(x, w, bias, lora_A, lora_B, scale, x_dropped, dequantize=nf4_dequantize)
