"""What the Triton kernels share: argument checks, launch settings, and two @triton.jit helpers.

Every check raises ValueError naming the op, the tensor and the numbers, because a Triton kernel
fed a wrong shape does not fail: it reads or writes out of bounds.

  checks         check_float, check_same, check_device, check_lora (the low-rank factors of a layer)
  launch         launch_device, next_pow2, row_tile (whole-row kernels: RMSNorm, RoPE)
  ops            kernel_op: a launcher as a torch.library custom op with its fake implementation
  in a kernel    grouped_tile (the L2-friendly program order of the matmuls), dot_acc (tl.dot that
                 widens to fp32 under the interpreter: pass UPCAST=interpreting())
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from triton.runtime.interpreter import InterpretedFunction

from lora_engine.kernels.dtypes import FLOAT_DTYPES, FLOAT_NAMES


def check_float(op: str, **tensors: torch.Tensor) -> None:
    """Each tensor is fp32, fp16 or bf16."""
    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; expected {FLOAT_NAMES}")


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
    if t0.device.type == "cpu" and not interpreting() and not is_fake(t0):  # a fake tensor is never launched
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


def kernel_op(name: str, fake, mutates_args=()):
    """Register a launcher as the custom op torch.ops.lora_engine.<name>, with `fake` (same arguments,
    outputs of the real shapes, strides and dtypes, nothing launched) as its fake implementation.

    That is what lets torch.compile trace through a Triton kernel without a graph break and
    FakeTensorMode (a memory plan, FSDP2) run a step on tensors that have no data, also "cuda" ones
    on a machine without a GPU. Autograd stays in the autograd.Functions around the ops (traceable),
    so the tensors saved for backward are exactly those the eager step keeps. Arguments and results
    are tensors and scalars only (an NF4Tensor is passed as its parts)."""
    def wrap(fn):
        op = torch.library.custom_op(f"lora_engine::{name}", mutates_args=mutates_args)(fn)
        op.register_fake(fake)
        return op
    return wrap


def launch_device(x: torch.Tensor):
    """Context that makes x's GPU current, so the launch goes to the device that holds the data."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def check_lora(op: str, x: torch.Tensor, n_out: int, n_in: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
               x_dropped: torch.Tensor | None) -> None:
    """lora_A (r, n_in) and lora_B (n_out, r) with r >= 1, both in x's dtype and on x's device; x_dropped
    (dropout(x), or None) like x. The base weight (n_out, n_in) is checked by the caller."""
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[1] != n_in or lora_B.shape[0] != n_out \
            or lora_A.shape[0] != lora_B.shape[1] or lora_A.shape[0] < 1:
        raise ValueError(f"{op}: lora_A must be (r, {n_in}) and lora_B ({n_out}, r) with r >= 1 for a weight "
                         f"({n_out}, {n_in}); got lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype != x.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype} but x is {x.dtype}; cast them to one dtype")
    if x_dropped is not None and (x_dropped.shape != x.shape or x_dropped.dtype != x.dtype):
        raise ValueError(f"{op}: x_dropped {tuple(x_dropped.shape)} {x_dropped.dtype} must match x "
                         f"{tuple(x.shape)} {x.dtype}")
    check_device(op, x=x, lora_A=lora_A, lora_B=lora_B)


# Elements one program of a whole-row kernel holds per tile: rows * next_pow2(width).
ROW_TILE_ELEMENTS = 2048


def row_tile(width: int, max_rows: int) -> tuple[int, int, int]:
    """Launch settings of a kernel that keeps whole rows of `width` elements in registers:
    (BLOCK = next_pow2(width), ROWS per program, num_warps). Narrow rows are batched (up to max_rows,
    about ROW_TILE_ELEMENTS elements a program); a row wider than that gets one program and 8 warps.
    ROWS is a power of two when max_rows is."""
    block = next_pow2(width)
    rows = max(1, min(max_rows, ROW_TILE_ELEMENTS // block))
    return block, rows, 4 if block <= ROW_TILE_ELEMENTS else 8


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid` over an (M, N) output, in grouped order (Triton
    tutorial 03): GROUP_M consecutive row blocks walk the column blocks together, so the column
    blocks of the right operand they share stay in L2."""
    grid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


@triton.jit
def dot_acc(acc, a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in fp32. UPCAST widens a and b to fp32 first (exact): the interpreter's bf16 dot is
    wrong (bf16 held as raw uint16) and its fp16 dot slow (docs/triton_interpreter.md), so launchers
    pass UPCAST=interpreting(); a GPU keeps the 16-bit MMA."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)
