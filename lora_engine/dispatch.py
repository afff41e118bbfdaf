"""The one place where a kernel is chosen.

Every hot op of the model, the LoRA layers and NF4 goes through a function here. The choice is
made from the tensor's device and an explicit `backend=` argument, nothing else:

  backend=None      "auto": Triton on a CUDA GPU of compute capability >= 7.5 when triton imports,
                    the PyTorch reference (kernels/reference.py) everywhere else.
  backend="torch"   the reference, always.
  backend="triton"  the Triton kernel, also on CPU tensors (that is how the tests run them under
                    TRITON_INTERPRET=1).

Modules carry a `backend` attribute (None by default) that they pass through; set it on a whole
model with `set_backend(model, name)`. Under torch.autocast every backend follows one rule
(kernels/amp.py): the matmul ops compute in the autocast dtype, the loss stays fp32.
"""

from __future__ import annotations

import functools
import warnings

import torch

from lora_engine.kernels import reference
from lora_engine.kernels.nf4_format import NF4Tensor

BACKENDS = ("torch", "triton")


@functools.cache
def _triton_kernels():
    """The Triton kernel module, or None (with the reason) when triton cannot be used here."""
    try:
        import triton  # noqa: F401

        from lora_engine.kernels import triton_ops
    except Exception as e:  # ImportError, or triton failing to find a driver/compiler
        return None, f"{type(e).__name__}: {e}"
    return triton_ops, ""


def resolve(x: torch.Tensor, backend: str | None) -> str:
    """Which backend runs an op whose main input is x."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "triton" and _triton_kernels()[0] is None:
            raise RuntimeError(f"backend='triton' requested but triton is unusable: {_triton_kernels()[1]}")
        return backend
    if not x.is_cuda:
        return "torch"
    mod, why = _triton_kernels()
    if mod is None:
        warnings.warn(f"lora_engine: triton unavailable ({why}); using the PyTorch reference", stacklevel=3)
        return "torch"
    if torch.cuda.get_device_capability(x.device) < (7, 5):
        warnings.warn("lora_engine: GPU older than sm_75; using the PyTorch reference kernels", stacklevel=3)
        return "torch"
    return "triton"


def _impl(x: torch.Tensor, backend: str | None):
    return _triton_kernels()[0] if resolve(x, backend) == "triton" else reference


def rms_norm(x, weight, eps, backend=None):
    """(..., D) -> (..., D). See kernels/reference.py:rms_norm."""
    return _impl(x, backend).rms_norm(x, weight, eps)


def rope(q, k, cos, sin, backend=None):
    """q (B, Hq, T, hd), k (B, Hk, T, hd), cos/sin (B, T, hd) -> (q', k')."""
    return _impl(q, backend).rope(q, k, cos, sin)


def swiglu(gate, up, backend=None):
    """silu(gate) * up."""
    return _impl(gate, backend).swiglu(gate, up)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", backend=None):
    """Chunked head matmul + cross-entropy; hidden (N, H), weight (V, H), labels (N,) -> fp32 scalar."""
    return _impl(hidden, backend).linear_cross_entropy(hidden, weight, labels, ignore_index, reduction)


def lora_linear(x, weight, bias, lora_A, lora_B, scale, x_dropped=None, backend=None):
    """y = x W^T (+ b) + scale * (dropout(x) A^T) B^T.

    weight is a dense (out, in) tensor or an NF4 weight (kernels/nf4_format.py:NF4Tensor), whose
    base is dequantized on the fly in forward and again in backward, never stored.
    """
    if _is_nf4(weight):
        return _nf4_impl(x, backend).nf4_lora_linear(x, weight, bias, lora_A, lora_B, scale, x_dropped)
    return _impl(x, backend).lora_linear(x, weight, bias, lora_A, lora_B, scale, x_dropped)


# ---- NF4 (QLoRA) ---------------------------------------------------------------------------------
# torch: kernels/nf4_reference.py (pure PyTorch, bit-exact with bitsandbytes); triton:
# kernels/nf4_triton.py. The C++ CPU op (csrc/) is chosen by lora_engine.quant.nf4, which owns it.


def _is_nf4(weight) -> bool:
    return isinstance(weight, NF4Tensor)


def _nf4_impl(x: torch.Tensor, backend: str | None):
    if resolve(x, backend) == "triton":
        from lora_engine.kernels import nf4_triton

        return nf4_triton
    from lora_engine.kernels import nf4_cpp, nf4_reference

    if backend is None and x.device.type == "cpu" and nf4_cpp.available():
        # Auto on CPU: the reference's autograd around the C++ dequantizer (bit-identical, ~5-28x faster).
        return _ReferenceWithCpp(nf4_reference, nf4_cpp.nf4_dequantize)
    return nf4_reference


class _ReferenceWithCpp:
    """nf4_reference's functions with the C++ dequantizer plugged in."""

    def __init__(self, ref, dequantize):
        self.ref, self.nf4_dequantize = ref, dequantize

    def nf4_linear(self, x, w, bias):
        return self.ref.nf4_linear(x, w, bias, dequantize=self.nf4_dequantize)

    def nf4_lora_linear(self, x, w, bias, lora_A, lora_B, scale, x_dropped=None):
        return self.ref.nf4_lora_linear(x, w, bias, lora_A, lora_B, scale, x_dropped, dequantize=self.nf4_dequantize)


def nf4_dequantize(weight, dtype: torch.dtype, backend=None) -> torch.Tensor:
    """NF4Tensor -> dense tensor of weight.shape in `dtype`: code[q] * absmax[block], cast once."""
    return _nf4_impl(weight.packed, backend).nf4_dequantize(weight, dtype)


def nf4_linear(x, weight, bias=None, backend=None) -> torch.Tensor:
    """y = x W^T (+ b) with W in NF4; differentiable in x (W is frozen)."""
    return _nf4_impl(x, backend).nf4_linear(x, weight, bias)


def set_backend(model: torch.nn.Module, backend: str | None) -> torch.nn.Module:
    """Set the kernel backend of every module of `model` that dispatches (None = auto)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model
