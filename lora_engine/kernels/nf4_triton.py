"""NF4 on the GPU: dequantization, and y = x W^T / dX = dY W with W dequantized tile by tile.

One idea over ~500 lines: the two kernels share the decode, the launchers and one autograd.Function.

Format (kernels/nf4_format.py, byte-compatible with bitsandbytes): W (out, in) flattened row-major
to n elements, blocks of `blocksize` (32..4096) consecutive elements.
  packed  uint8 (ceil(n/2),)   byte j = q[2j] << 4 | q[2j+1]: element 2j in the HIGH nibble
  code    fp32 (16,)           the NF4 table; q indexes it
  absmax  fp32 (n_blocks,), or uint8 (n_blocks,) when double-quantized, then decoded as
          absmax[b] = nested_code[qabsmax[b]] * nested_absmax[b // 256] + nested_offset   (fp32)
  W'[i]   = code[q[i]] * absmax[i // blocksize]   in fp32, rounded once to the output dtype.
The matmul kernel decodes an element from its flat index i alone (byte i >> 1, nibble i & 1,
block i // blocksize), so shapes that are not multiples of anything, odd n and a short last block
need no special case; the dequantization kernel does the same per byte. The decode is exact (a
table lookup times a scale), so dequantization matches kernels/nf4_reference.py bit for bit; the
kernels are compiled without mul+add contraction into FMA (enable_fp_fusion=False), which would
otherwise round the nested absmax differently.

Kernels
  _nf4_dequant_kernel   one program per DEQUANT_BLOCK elements -> dense W' (out, in); it walks bytes
                        (one absmax decode per two elements) and interleaves the two nibbles' values.
  _nf4_dequant_tile_kernel  a (rows, cols) slab of W' at (row0, col0), element by element: above
                        FUSED_MAX_ROWS the weight is dequantized slab by slab into one reused workspace
                        (WORKSPACE_ELEMENTS), never whole, each slab multiplied by cuBLAS (row slabs in
                        forward, column slabs in backward, so every product sums over the full K).
  _nf4_matmul_kernel    C (M, P) = A (M, R) @ B (R, P), where B[r, p] = W'[r * s_r + p * s_p]:
                          forward  y  = x  W'^T : A = x  (M, in),  R = in,  P = out, (s_r, s_p) = (1, in)
                          backward dX = dY W'   : A = dY (M, out), R = out, P = in,  (s_r, s_p) = (in, 1)
                        Each (BLOCK_R, BLOCK_P) tile of W' is decoded in registers, rounded to the
                        compute dtype (as the reference rounds its dense W'), fed to tl.dot with an
                        fp32 accumulator, and dropped: W' never exists in memory.

Backward (W frozen, no dW): y = x W'^T + b  =>  dX = dY W',  db = sum over rows of dY. W' is
decoded again in backward; nothing of it is saved, only the NF4Tensor (its packed bytes) is kept.

Dispatch by row count M (tokens): the fused kernel reads 0.5 byte per weight instead of writing
and re-reading 2 (fp16/bf16), which wins while the matmul is memory-bound, but it re-decodes W'
once per BLOCK_M rows and its generic tl.dot is slower than cuBLAS once the matmul is
compute-bound. bitsandbytes 0.50.2 (backends/cuda/ops.py, calibrated on A100 and H100/H200) uses
its fused 4-bit GEMM only up to M = 1536 at all and only up to M = 512 for weights of >= 4M
elements (every projection of a 1B+ model), with tighter caps on sm90; for training it always
dequantizes. Ours is a generic Triton tile loop, tuned no better than theirs, so FUSED_MAX_ROWS =
512: M <= 512 runs fused, larger M dequantizes (Triton) and calls torch's matmul (cuBLAS), for
every dtype (fp32 is unmeasured: both sides then run without tensor cores, and the fused read of
0.5 byte against 8 should only move the crossover up). bench/nf4_triton.py measures the crossover
(bf16) on a GPU; change the constant when it says so, not here by guess (its results go to
bench/results/).

Precision: fp32 accumulation, one rounding on store. fp32 inputs use tl.dot's "ieee" precision
(no TF32), matching torch's default fp32 matmul. Under TRITON_INTERPRET=1 bf16 arithmetic is broken
(the interpreter holds bf16 as raw uint16), so there the tiles are widened to fp32 before tl.dot
(exact: the products of two bf16 or fp16 values are exact in fp32, as on tensor cores), and
fp32 -> bf16 stores truncate instead of rounding to nearest: expect 1-ulp bf16 differences under
the interpreter only (docs/triton_interpreter.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_engine.kernels import amp
from lora_engine.kernels._common import (
    check_device,
    check_float,
    check_lora,
    dot_acc,
    grouped_tile,
    interpreting,
    kernel_op,
    launch_device,
)
from lora_engine.kernels.dtypes import FLOAT_DTYPES
from lora_engine.kernels.nf4_format import NF4Tensor
from lora_engine.kernels.ops_reference import add_low_rank

DEQUANT_BLOCK = 1024  # elements per program of the dequantization kernel (512 packed bytes)
# Above FUSED_MAX_ROWS a weight is dequantized in slabs of at most this many elements into one reused
# workspace (32 MiB in bf16), each slab fed to its own cuBLAS matmul: a (14336, 4096) projection then never
# exists whole (112 MiB in bf16), in 4 slabs of 4096 x 4096 products, still large enough for cuBLAS.
WORKSPACE_ELEMENTS = 2**24
TILE_R, TILE_C = 32, 64  # the slab kernel's tile
FUSED_MAX_ROWS = 512  # rows (tokens) up to which nf4_linear runs the fused kernel; see the docstring
GROUP_M = 8  # programs of the matmul walk GROUP_M row blocks per column block, for L2 reuse of W' tiles


@triton.jit
def _nf4_absmax(blk, mask, absmax_ptr, nabs_ptr, ncode_ptr, offset,
                NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """absmax (fp32) of the blocks `blk` (int64, any shape), decoding the double-quantized form inline."""
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        scale = tl.load(ncode_ptr + qa) * tl.load(nabs_ptr + blk // NESTED_BLOCKSIZE, mask=mask, other=0.0)
        scale = scale + offset  # a separate rounding, like bitsandbytes' absmax += offset
    else:
        scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
    return scale


@triton.jit
def _nf4_decode(flat, mask, packed_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset,
                BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr):
    """W' in fp32 at the int64 flat indices `flat` (any tile shape); 0 where mask is False."""
    byte = tl.load(packed_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
    q = tl.where((flat & 1) == 0, byte >> 4, byte & 15)  # the first element of a pair is the high nibble
    value = tl.load(code_ptr + q)  # q is always in 0..15 (masked bytes read as 0): no mask needed
    scale = _nf4_absmax(flat // BLOCKSIZE, mask, absmax_ptr, nabs_ptr, ncode_ptr, offset, NESTED, NESTED_BLOCKSIZE)
    return tl.where(mask, value * scale, 0.0)


@triton.jit
def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, out_ptr, offset, n,
                        BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                        BLOCK: tl.constexpr):
    # Byte-wise: BLOCK // 2 contiguous bytes per program, one absmax per byte (both nibbles of a
    # byte lie in one block: every blocksize is even), the two values interleaved back in order.
    j = tl.program_id(0).to(tl.int64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)  # int64: n may pass 2**31
    jmask = j < (n + 1) // 2
    byte = tl.load(packed_ptr + j, mask=jmask, other=0).to(tl.int32)
    scale = _nf4_absmax((2 * j) // BLOCKSIZE, jmask, absmax_ptr, nabs_ptr, ncode_ptr, offset, NESTED,
                        NESTED_BLOCKSIZE)
    hi = tl.load(code_ptr + (byte >> 4)) * scale  # element 2j: the high nibble
    lo = tl.load(code_ptr + (byte & 15)) * scale  # element 2j + 1
    w = tl.interleave(hi, lo)  # (BLOCK,) in element order
    flat = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + flat, w.to(out_ptr.dtype.element_ty), mask=flat < n)  # an odd n drops the pad nibble


@triton.jit
def _nf4_dequant_tile_kernel(packed_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, out_ptr, offset,
                             row0, col0, rows, cols, n_in, stride_out,
                             BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # out[r, c] = W'[row0 + r, col0 + c] for a (rows, cols) slab of W' (n_in columns), out rows stride_out
    # apart: any rectangle, so a row slab or a column slab, element by element from its flat index.
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    flat = (row0 + r).to(tl.int64)[:, None] * n_in + (col0 + c).to(tl.int64)[None, :]
    w = _nf4_decode(flat, mask, packed_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset,
                    BLOCKSIZE, NESTED, NESTED_BLOCKSIZE)
    out = out_ptr + r.to(tl.int64)[:, None] * stride_out + c.to(tl.int64)[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_matmul_kernel(
    a_ptr, packed_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, bias_ptr, c_ptr,
    offset, M, P, R, w_stride_r, w_stride_p, stride_am, stride_ar, stride_cm, stride_cp,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_p = grouped_tile(tl.program_id(0), M, P, BLOCK_M, BLOCK_P, GROUP_M)  # W' column blocks in L2

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_m = offs_m < M
    mask_p = offs_p < P
    a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am  # (BLOCK_M, 1)
    w_cols = offs_p.to(tl.int64)[None, :] * w_stride_p  # (1, BLOCK_P)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        mask_r = offs_r < R
        a = tl.load(a_rows + offs_r[None, :] * stride_ar, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        w = _nf4_decode(offs_r[:, None] * w_stride_r + w_cols, mask_r[:, None] & mask_p[None, :],
                        packed_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset,
                        BLOCKSIZE, NESTED, NESTED_BLOCKSIZE)  # (BLOCK_R, BLOCK_P) fp32
        w = w.to(c_ptr.dtype.element_ty)  # W' in the compute dtype, rounded once as the reference does
        acc = dot_acc(acc, a, w, UPCAST, "ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_p.to(tl.int64)[None, :] * stride_cp
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_p[None, :])


# ---- launchers ------------------------------------------------------------------------------------


def _check_weight(op: str, w: NF4Tensor) -> None:
    """w is a 2-D NF4Tensor whose tensors a kernel can index flat (contiguous, on one device)."""
    if not isinstance(w, NF4Tensor):
        raise TypeError(f"{op}: weight must be an NF4Tensor (kernels/nf4_format.py), got {type(w).__name__}")
    if len(w.shape) != 2:
        raise ValueError(f"{op}: NF4 weight must be 2-D (out, in), got shape {w.shape}")
    parts = {"packed": w.packed, "absmax": w.absmax, "code": w.code}
    if w.is_nested:
        parts.update(nested_absmax=w.nested_absmax, nested_code=w.nested_code)
    for name, t in parts.items():
        if not t.is_contiguous():
            raise ValueError(f"{op}: NF4 weight {w.shape}: {name} (strides {t.stride()}) is not contiguous; "
                             "the kernel indexes it flat. Pass .contiguous() tensors to NF4Tensor")
    check_device(op, **{f"weight.{k}": v for k, v in parts.items()})


def _weight_args(w: NF4Tensor) -> tuple:
    """(packed, absmax, code, nested_absmax, nested_code, offset) as the kernels take them."""
    if w.is_nested:
        return w.packed, w.absmax, w.code, w.nested_absmax, w.nested_code, float(w.nested_offset)
    # Not nested: the nested pointers are never read (NESTED=False); any valid tensor fills them.
    return w.packed, w.absmax, w.code, w.absmax, w.code, 0.0


def nf4_dequantize(w: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """NF4Tensor (out, in) -> dense (out, in) tensor in `dtype` (default w.dtype) on w's device.

    Exact: code[q] * absmax[block] in fp32, rounded once (bit-identical to nf4_reference on a GPU;
    bf16 truncates instead of rounding under TRITON_INTERPRET).
    """
    _check_weight("nf4_dequantize", w)
    dtype = w.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"nf4_dequantize: dtype {dtype} not supported; use one of {FLOAT_DTYPES}")
    return _nf4_dequant_op(*_weight_args(w), w.blocksize, w.is_nested, w.nested_blocksize, list(w.shape), dtype)


def _nf4_dequant_fake(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, nabs: torch.Tensor,
                      ncode: torch.Tensor, offset: float, blocksize: int, nested: bool, nested_blocksize: int,
                      shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=packed.device)


@kernel_op("nf4_dequantize_triton", _nf4_dequant_fake)
def _nf4_dequant_op(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, nabs: torch.Tensor,
                    ncode: torch.Tensor, offset: float, blocksize: int, nested: bool, nested_blocksize: int,
                    shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """An NF4 weight given as its parts (_weight_args) -> the dense tensor of `shape`."""
    out = _nf4_dequant_fake(packed, absmax, code, nabs, ncode, offset, blocksize, nested, nested_blocksize,
                            shape, dtype)
    n = out.numel()
    if n:
        with launch_device(packed):
            _nf4_dequant_kernel[(triton.cdiv(n, DEQUANT_BLOCK),)](
                packed, absmax, code, nabs, ncode, out, offset, n, BLOCKSIZE=blocksize, NESTED=nested,
                NESTED_BLOCKSIZE=nested_blocksize, BLOCK=DEQUANT_BLOCK, num_warps=4, enable_fp_fusion=False,
            )
    return out


def _nf4_dequant_tile_fake(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, nabs: torch.Tensor,
                           ncode: torch.Tensor, offset: float, blocksize: int, nested: bool, nested_blocksize: int,
                           n_in: int, row0: int, col0: int, out: torch.Tensor) -> None:
    return None


@kernel_op("nf4_dequantize_slab_triton", _nf4_dequant_tile_fake, mutates_args=("out",))
def _nf4_dequant_tile_op(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, nabs: torch.Tensor,
                         ncode: torch.Tensor, offset: float, blocksize: int, nested: bool, nested_blocksize: int,
                         n_in: int, row0: int, col0: int, out: torch.Tensor) -> None:
    """out (rows, cols), unit column stride = W'[row0:row0 + rows, col0:col0 + cols] of a weight with n_in columns."""
    rows, cols = out.shape
    if rows and cols:
        with launch_device(packed):
            _nf4_dequant_tile_kernel[(triton.cdiv(rows, TILE_R), triton.cdiv(cols, TILE_C))](
                packed, absmax, code, nabs, ncode, out, offset, row0, col0, rows, cols, n_in, out.stride(0),
                BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize, BLOCK_R=TILE_R,
                BLOCK_C=TILE_C, num_warps=4, enable_fp_fusion=False,
            )


def nf4_dequantize_slab(w: NF4Tensor, out: torch.Tensor, row0: int, col0: int) -> torch.Tensor:
    """W'[row0:row0 + R, col0:col0 + C] decoded into out (R, C) (column stride 1, any row stride); returns out."""
    _check_weight("nf4_dequantize_slab", w)
    R, C = out.shape
    if out.dtype not in FLOAT_DTYPES or out.dim() != 2 or (C > 1 and out.stride(1) != 1) \
            or not (row0 >= 0 and row0 + R <= w.shape[0] and col0 >= 0 and col0 + C <= w.shape[1]):
        raise ValueError(f"nf4_dequantize_slab: out {tuple(out.shape)} {out.dtype} (strides {out.stride()}) at "
                         f"({row0}, {col0}) is not a slab of the NF4 weight {w.shape} with unit column stride")
    _nf4_dequant_tile_op(*_weight_args(w), w.blocksize, w.is_nested, w.nested_blocksize, w.shape[1], row0, col0,
                         out)
    return out


def slab(total: int, other: int) -> int:
    """Rows (or columns) of W' per slab so a slab holds at most WORKSPACE_ELEMENTS (`other` long each), a
    multiple of 64; `total` (one slab) when the whole weight fits."""
    step = WORKSPACE_ELEMENTS // max(other, 1)
    return total if step >= total else max(64, step // 64 * 64)


def matmul_config(rows: int) -> dict:
    """Tile sizes and launch options of _nf4_matmul_kernel for `rows` rows (also compiled by the tests).

    tl.dot needs every tile dimension >= 16; small M (decoding) gets a small row tile, and at <= 16
    rows a narrower column tile too, so a 4096-wide weight still makes 128 programs for ~132 SMs.
    Two stages, not three: the per-element gathers of the decode are pipelined through shared
    memory, and three stages of a 64x64 tile need ~110 KB, over the 99 KB of sm_86/sm_89
    (tests/test_kernels_compile.py, from compile_specs() below, checks every target's limit).
    """
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_p = 32 if rows <= 16 else 64
    return {"BLOCK_M": block_m, "BLOCK_P": block_p, "BLOCK_R": 64, "num_warps": 4, "num_stages": 2}


def nf4_matmul(a: torch.Tensor, w: NF4Tensor, transpose: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel. a: 2-D (M, R), fp32/fp16/bf16, any strides; W' is dequantized to a.dtype.

    transpose=True:  a (M, in)  @ W'^T (+ bias (out,)) -> (M, out)   (forward)
    transpose=False: a (M, out) @ W'                    -> (M, in)    (backward dX; no bias)
    """
    op = "nf4_matmul"
    _check_weight(op, w)
    check_float(op, a=a)
    if a.dim() != 2:
        raise ValueError(f"{op}: a must be 2-D (rows, features), got shape {tuple(a.shape)}")
    n_out, n_in = w.shape
    R, P = (n_in, n_out) if transpose else (n_out, n_in)
    if a.shape[1] != R:
        raise ValueError(f"{op}: a has {a.shape[1]} features, the NF4 weight {w.shape} "
                         f"{'(transposed) ' if transpose else ''}expects {R}")
    check_device(op, a=a, **{"weight.packed": w.packed})
    if bias is not None:
        if not transpose:
            raise ValueError(f"{op}: bias applies to the forward product only (transpose=True)")
        if bias.shape != (n_out,) or bias.dtype != a.dtype:
            raise ValueError(f"{op}: bias must be ({n_out},) {a.dtype} for weight {w.shape}, got "
                             f"{tuple(bias.shape)} {bias.dtype}")
        check_device(op, a=a, bias=bias)
        bias = bias.contiguous()
    return _nf4_matmul_op(a, *_weight_args(w), w.blocksize, w.is_nested, w.nested_blocksize, n_out, n_in,
                          transpose, bias)


def _nf4_matmul_fake(a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                     nabs: torch.Tensor, ncode: torch.Tensor, offset: float, blocksize: int, nested: bool,
                     nested_blocksize: int, n_out: int, n_in: int, transpose: bool,
                     bias: torch.Tensor | None) -> torch.Tensor:
    return torch.empty((a.shape[0], n_out if transpose else n_in), dtype=a.dtype, device=a.device)


@kernel_op("nf4_matmul_triton", _nf4_matmul_fake)
def _nf4_matmul_op(a: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                   nabs: torch.Tensor, ncode: torch.Tensor, offset: float, blocksize: int, nested: bool,
                   nested_blocksize: int, n_out: int, n_in: int, transpose: bool,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """nf4_matmul on an NF4 weight (n_out, n_in) given as its parts; arguments checked by nf4_matmul."""
    c = _nf4_matmul_fake(a, packed, absmax, code, nabs, ncode, offset, blocksize, nested, nested_blocksize,
                         n_out, n_in, transpose, bias)
    M, P = c.shape
    R = n_in if transpose else n_out
    if M == 0 or P == 0:
        return c
    cfg = matmul_config(M)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(P, cfg["BLOCK_P"]),)
    w_stride_r, w_stride_p = (1, n_in) if transpose else (n_in, 1)
    with launch_device(a):
        _nf4_matmul_kernel[grid](
            a, packed, absmax, code, nabs, ncode, bias if bias is not None else c, c,
            offset, M, P, R, w_stride_r, w_stride_p, a.stride(0), a.stride(1), c.stride(0), c.stride(1),
            BLOCKSIZE=blocksize, NESTED=nested, NESTED_BLOCKSIZE=nested_blocksize, HAS_BIAS=bias is not None,
            UPCAST=interpreting(), GROUP_M=GROUP_M, enable_fp_fusion=False, **cfg,
        )
    return c


def use_fused(rows: int) -> bool:
    """The dispatch policy: fused dequantize+matmul for up to FUSED_MAX_ROWS rows, else dequantize + cuBLAS."""
    return rows <= FUSED_MAX_ROWS


# ---- autograd and the public functions ---------------------------------------------------------


def _forward_2d(x2: torch.Tensor, w: NF4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if use_fused(x2.shape[0]):
        return nf4_matmul(x2, w, transpose=True, bias=bias)
    n_out, n_in = w.shape
    step = slab(n_out, n_in)
    if step >= n_out:
        return torch.nn.functional.linear(x2, nf4_dequantize(w, x2.dtype), bias)
    # y[:, rows] = x W'[rows]^T per row slab of W' (contiguous in the flat NF4 layout), each product over
    # the whole of `in`: the same sums as one matmul, written straight into y's columns.
    y = x2.new_empty((x2.shape[0], n_out))
    ws = x2.new_empty((step, n_in))
    for s in range(0, n_out, step):
        e = min(s + step, n_out)
        wb = nf4_dequantize_slab(w, ws[: e - s], s, 0)
        if bias is None:
            torch.mm(x2, wb.t(), out=y[:, s:e])
        else:
            torch.addmm(bias[s:e], x2, wb.t(), out=y[:, s:e])
    return y


def _backward_2d(dy2: torch.Tensor, w: NF4Tensor) -> torch.Tensor:
    if use_fused(dy2.shape[0]):
        return nf4_matmul(dy2, w, transpose=False)
    n_out, n_in = w.shape
    step = slab(n_in, n_out)
    if step >= n_in:
        return dy2 @ nf4_dequantize(w, dy2.dtype)  # dequantized again, freed after the product
    # dX[:, cols] = dY W'[:, cols] per column slab, each over the whole of `out` (no partial sums rounded).
    dx = dy2.new_empty((dy2.shape[0], n_in))
    ws = dy2.new_empty((n_out, step))
    for s in range(0, n_in, step):
        e = min(s + step, n_in)
        torch.mm(dy2, nf4_dequantize_slab(w, ws[:, : e - s], 0, s), out=dx[:, s:e])
    return dx


class NF4LinearFunction(torch.autograd.Function):
    """y = x W'^T (+ b). Saves nothing but a reference to the frozen NF4Tensor."""

    @staticmethod
    def forward(ctx, x, w: NF4Tensor, bias):
        ctx.w = w
        ctx.has_bias = bias is not None
        y2 = _forward_2d(x.reshape(-1, x.shape[-1]), w, bias)
        return y2.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        dx = db = None
        dy2 = dy.reshape(-1, dy.shape[-1])
        if ctx.needs_input_grad[0]:
            dx = _backward_2d(dy2, ctx.w).view(*dy.shape[:-1], ctx.w.shape[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, None, db


def _check_linear(op: str, x: torch.Tensor, w: NF4Tensor, bias: torch.Tensor | None) -> None:
    _check_weight(op, w)
    check_float(op, x=x)
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"{op}: x {tuple(x.shape)} has {x.shape[-1]} features, the NF4 weight {w.shape} "
                         f"expects {w.shape[1]}")
    if bias is not None and (bias.shape != (w.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"{op}: bias must be ({w.shape[0]},) {x.dtype} like x, got {tuple(bias.shape)} "
                         f"{bias.dtype}")
    check_device(op, x=x, **{"weight.packed": w.packed})


@amp.like_linear
def nf4_linear(x: torch.Tensor, w: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in) -> (..., out) = x W'^T (+ bias (out,)) in x.dtype; W' (out, in) decoded from NF4.

    Differentiable in x (and bias); W is frozen. Rows <= FUSED_MAX_ROWS run fused, else dequantize
    and matmul; backward decodes W again either way. Under autocast x and bias are cast to the
    autocast dtype and W' is decoded to it (kernels/amp.py).
    """
    _check_linear("nf4_linear", x, w, bias)
    return NF4LinearFunction.apply(x, w, bias)


@amp.like_linear
def nf4_lora_linear(
    x: torch.Tensor,
    w: NF4Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W'^T (+ b) + scale * (xd A^T) B^T; x (..., in), A (r, in), B (out, r) -> (..., out).

    The NF4 base goes through the kernels above; the rank-r products are torch matmuls (small),
    so autograd gives grads for x, lora_A, lora_B (and x_dropped = dropout(x) when given).
    """
    op = "nf4_lora_linear"
    _check_linear(op, x, w, bias)
    check_lora(op, x, *w.shape, lora_A, lora_B, x_dropped)
    xd = x if x_dropped is None else x_dropped
    # NF4LinearFunction returns a view of its 2-D result: autograd forbids updating it in place.
    return add_low_rank(NF4LinearFunction.apply(x, w, bias), xd, lora_A, lora_B, scale)


def compile_specs() -> list:
    """The GPU compilations of tests/test_kernels_compile.py (kernels/compile_spec.py), all with
    enable_fp_fusion=False as launched: on every target the nested bf16 dequantization and the
    largest matmul tile (the most shared memory, from matmul_config); once each the other dtypes
    and the small tiles of decoding (1, 16, 32 rows)."""
    from lora_engine.kernels.compile_spec import TARGETS, CompileSpec, signature

    def weight(nested):  # a nested absmax is uint8 codes, a plain one fp32
        return {"packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
                "nabs_ptr": "*fp32", "ncode_ptr": "*fp32", "offset": "fp32"}

    def meta(nested):
        return {"BLOCKSIZE": 64, "NESTED": nested, "NESTED_BLOCKSIZE": 256}

    def dequant(t, nested, targets):
        sig = signature(_nf4_dequant_kernel, t, n="i64", **weight(nested))
        return CompileSpec(f"nf4_dequant{'_nested' if nested else ''}/{t}", _nf4_dequant_kernel, sig,
                           dict(meta(nested), BLOCK=DEQUANT_BLOCK), targets,
                           {"enable_fp_fusion": False, "num_warps": 4})

    def matmul(t, nested, rows, targets):
        cfg = matmul_config(rows)
        ints = ("M", "P", "R", "w_stride_r", "w_stride_p", "stride_am", "stride_ar", "stride_cm", "stride_cp")
        sig = signature(_nf4_matmul_kernel, t, **weight(nested), **dict.fromkeys(ints, "i32"))
        consts = dict(meta(nested), HAS_BIAS=True, UPCAST=False, GROUP_M=GROUP_M,
                      **{k: v for k, v in cfg.items() if k.startswith("BLOCK")})
        opts = {"enable_fp_fusion": False, "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
        return CompileSpec(f"nf4_matmul_rows{rows}{'_nested' if nested else ''}/{t}", _nf4_matmul_kernel, sig,
                           consts, targets, opts)

    def dequant_slab(t, nested, targets):
        ints = ("row0", "col0", "rows", "cols", "n_in", "stride_out")
        sig = signature(_nf4_dequant_tile_kernel, t, **weight(nested), **dict.fromkeys(ints, "i32"))
        return CompileSpec(f"nf4_dequant_slab{'_nested' if nested else ''}/{t}", _nf4_dequant_tile_kernel, sig,
                           dict(meta(nested), BLOCK_R=TILE_R, BLOCK_C=TILE_C), targets,
                           {"enable_fp_fusion": False, "num_warps": 4})

    return [dequant("bf16", True, TARGETS), dequant_slab("bf16", True, TARGETS), dequant_slab("fp32", False, (80,)),
            matmul("bf16", True, 1024, TARGETS),
            dequant("fp32", False, (80,)), matmul("fp32", False, 1, (80,)), matmul("fp16", False, 32, (86,)),
            matmul("bf16", True, 16, (90,))]
