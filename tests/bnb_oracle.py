"""bitsandbytes' dequantize_4bit as a test oracle that gives the same values on every CPU.

Why (bitsandbytes 0.50.2, csrc/cpu_ops.cpp dequantizeBlockwise4bitCpu; docs/bitsandbytes_cpu.md): on a
CPU with AVX512F (this project's Zen 4 machines; runtime check lib.has_avx512f_cpu) the native CPU kernel takes a
vector branch when the last dim is a multiple of 16 and blocksize < 2048, and there it reads the
scale of element (row, k) as absmax[row * (cols // blocksize) + k // blocksize]. NF4 blocks run
over the flattened tensor, so that is right only when every row holds whole blocks: a (64, 112)
weight with blocksize 64, or (3, 64) with blocksize 128, comes back with wrong scales (errors of
~2 on unit-scale weights). CPUs without AVX512F take a scalar loop over flat blocks and are right.

bnb's own format is flat, so dequantizing the same bytes as one row of numel values (its kernel
then sees whole-row blocks) and reshaping is exact on every CPU, and still bnb's functional API and
its native kernel. The quantize side (quantize_4bit) is flat on every CPU and needs no care.
"""

import copy

import torch


def dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit(packed, state), computed on the flattened shape.

    packed: bnb's packed uint8 bytes, (numel/2, 1) or flat; state: its QuantState (left unchanged).
    Returns state.dtype values of state.shape.
    """
    import bitsandbytes.functional as bnbF

    flat = copy.copy(state)  # shallow: shares bnb's tensors, only the shape attribute is replaced
    flat.shape = torch.Size([state.shape.numel()])
    return bnbF.dequantize_4bit(packed.reshape(-1, 1), flat).reshape(state.shape)
