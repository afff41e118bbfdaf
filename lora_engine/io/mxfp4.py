"""MXFP4 (OCP microscaling FP4), as the released gpt-oss checkpoints store their experts: read exactly.

Layout of one weight W (..., N, K) (transformers/integrations/mxfp4.py, the gpt-oss reference):
  <name>_blocks  uint8 (..., N, K / 32, 16)  two e2m1 codes a byte: the low nibble is the even element,
                                             the high nibble the odd one; 16 bytes = one block of 32 values
  <name>_scales  uint8 (..., N, K / 32)      one e8m0 scale per block: the value 2 ** (s - 127)
e2m1 code c (4 bits: sign, 2 exponent bits, 1 mantissa bit) -> FP4_VALUES[c]; a value is that times its
block's scale. Every product is exact in fp32 (a 2-bit significand times a power of two within fp32's range,
subnormals included), so dequantizing to fp32 is exact and to bf16 rounds once, bit for bit as transformers'
own dequantization does; so do the edge cases (s = 255, the format's NaN, and products past fp32's largest
give inf or NaN as there).
"""

from __future__ import annotations

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 (..., G, 16), scales uint8 (..., G) -> (..., G * 32) in `dtype`. ValueError naming the shapes
    or dtypes when they are not one MXFP4 tensor's."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"mxfp4: blocks and scales are uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.dim() < 1 or blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"mxfp4: blocks (..., G, {BLOCK // 2}) and scales (..., G) expected, got "
                         f"{tuple(blocks.shape)} and {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    lo, hi = lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]
    values = torch.stack((lo, hi), dim=-1).flatten(-2)  # (..., G, 32): low nibble first
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)  # exact: see the module docstring
    return values.flatten(-2).to(dtype)
