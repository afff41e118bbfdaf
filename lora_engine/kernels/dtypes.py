"""The floating-point dtypes the kernels take: the one table of the kernels package.

Every op, its reference and NF4's dequantizer accept these three for activations and weights
(NF4 itself is stored as uint8 and dequantized into one of them). Imports torch only.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_NAMES = "float32, float16 or bfloat16"  # FLOAT_DTYPES in words, for error messages
