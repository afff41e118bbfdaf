"""Argument checks and launch helpers shared by the Triton kernel launchers.

Every check raises ValueError naming the op, the tensor and the numbers, because a Triton kernel
fed a wrong shape does not fail: it reads or writes out of bounds.
"""

from __future__ import annotations

import contextlib

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float(op: str, **tensors: torch.Tensor) -> None:
    """Each tensor is fp32, fp16 or bf16."""
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; expected float32, float16 or bfloat16")


def check_same(op: str, **tensors: torch.Tensor) -> None:
    """All tensors share shape, dtype and device (elementwise ops)."""
    (n0, t0), *rest = tensors.items()
    for name, t in rest:
        if t.shape != t0.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but {n0} has {tuple(t0.shape)}")
        if t.dtype != t0.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype} but {n0} is {t0.dtype}; cast one of them")
    check_device(op, **tensors)


def check_device(op: str, **tensors: torch.Tensor) -> None:
    """All tensors on one device; CPU tensors only when the Triton interpreter is on."""
    (n0, t0), *rest = tensors.items()
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {n0} is on {t0.device}; move them to one device")
    if t0.device.type not in ("cuda", "cpu"):
        raise ValueError(f"{op}: {n0} is on {t0.device}; the Triton kernels run on CUDA devices")
    if t0.device.type == "cpu" and not interpreting():
        raise ValueError(
            f"{op}: {n0} is a CPU tensor; Triton kernels need a CUDA device, or TRITON_INTERPRET=1 set "
            "before triton is imported (use backend='torch' for the PyTorch reference on CPU)"
        )


@triton.jit
def _probe():
    pass


def interpreting() -> bool:
    """True when @triton.jit produced interpreter functions (TRITON_INTERPRET=1 at import time)."""
    return isinstance(_probe, InterpretedFunction)


def launch_device(x: torch.Tensor):
    """Context that makes x's GPU current, so the launch goes to the device that holds the data."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
