"""The Triton backend behind lora_engine.dispatch: the same signatures as kernels/reference.py.

Each op lives in its own file (math, kernels, launchers, autograd.Function); this module only
gathers them under the names and argument orders that dispatch calls.
"""

from __future__ import annotations

import torch

from lora_engine.kernels import lora_linear_triton as _lora
from lora_engine.kernels.cross_entropy_triton import linear_cross_entropy
from lora_engine.kernels.rms_norm_triton import rms_norm
from lora_engine.kernels.rope_triton import rope
from lora_engine.kernels.swiglu_triton import swiglu

__all__ = ["rms_norm", "rope", "swiglu", "linear_cross_entropy", "lora_linear"]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """reference.lora_linear's argument order -> kernels/lora_linear_triton.py (fused Triton matmul)."""
    return _lora.lora_linear(x, weight, lora_A, lora_B, scale, bias=bias, x_dropped=x_dropped)
