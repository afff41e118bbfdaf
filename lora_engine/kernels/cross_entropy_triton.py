"""Linear cross-entropy: the head matmul and softmax cross-entropy in chunks of tokens.

Shapes: hidden (N, H) and weight (V, H) in one float dtype, labels (N,) integers in [0, V) or
`ignore_index`. Returns the fp32 loss: the sum over counted tokens, divided by their number for
reduction="mean" (0 when no token counts). The (N, V) logits never exist: at most one
(chunk, V) block does, so the extra memory is O(chunk * V) instead of O(N * V).

Per chunk of c tokens (Liger-Kernel's scheme; the matmuls stay with cuBLAS, which no hand-written
kernel here would beat at these shapes):

    z  = h W^T                    (c, V) torch matmul in the weight's dtype (fp32 accumulation)
    ---- Triton: a program per row (a few for small V), over V in blocks of BLOCK_V ----
    m, l = online max and sum of exp(z - m)        lse = m + log l
    loss = lse - z[label]                          (0 for an ignored row)
    z   <- softmax(z) - onehot(label)              (0 for an ignored row), written in place
    ----
    dh[chunk] = z W               dW += z^T h      (torch matmuls)

Because the loss is the only consumer of the logits, d loss / d logits is known in forward;
computing the gradients there, chunk by chunk, means the logits are never stored. Backward only
multiplies the saved dh (N, H) and dW (V, H, fp32, only when the weight is trained) by
grad_output (and 1/count for "mean"). Saved: dh, dW; nothing is recomputed.

Precision: lse, the loss and the softmax are fp32; the in-place gradient block has the logits'
dtype (bf16 on a bf16 model, as in Liger), which is what the reference feeds the dh matmul too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_engine.kernels import amp
from lora_engine.kernels._common import check_device, check_float, kernel_op, launch_device, next_pow2
from lora_engine.kernels.ops_reference import check_cross_entropy_args, check_labels, traced


@triton.jit
def _ce_rows(
    z_ptr, labels_ptr, loss_ptr, N, V, stride_z, ignore_index,
    ROWS: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < N
    zrow = z_ptr + rows * stride_z  # (ROWS,) row starts
    label = tl.load(labels_ptr + rows, mask=rmask, other=ignore_index).to(tl.int64)
    valid = (label != ignore_index) & rmask
    # Pass 1: running max m and running sum l of exp(z - m) over blocks of the vocabulary.
    m = tl.full((ROWS,), float("-inf"), tl.float32)
    l = tl.zeros((ROWS,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = rmask[:, None] & (cols[None, :] < V)
        z = tl.load(zrow[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past N: keep exp() finite
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe[:, None]), axis=1)
        m = m_new
    lse = tl.where(rmask, m + tl.log(tl.where(rmask, l, 1.0)), 0.0)  # rows past N: no log(0)
    safe = tl.where(valid, label, 0)
    target = tl.load(zrow + safe, mask=rmask, other=0.0).to(tl.float32)
    tl.store(loss_ptr + rows, tl.where(valid, lse - target, 0.0), mask=rmask)
    if COMPUTE_GRAD:
        # Pass 2: the gradient of each row's loss with respect to its logits, in place.
        keep = tl.where(valid, 1.0, 0.0)[:, None]
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = rmask[:, None] & (cols[None, :] < V)
            z = tl.load(zrow[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            g = (tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == safe[:, None], 1.0, 0.0)) * keep
            tl.store(zrow[:, None] + cols[None, :], g.to(z_ptr.dtype.element_ty), mask=mask)


# Vocabulary columns a program holds at a time (a power of two); larger vocabularies loop over blocks.
# Read at each call, so a test can lower it to reach that loop at small V.
MAX_BLOCK_V = 4096
CHUNK_SIZE = 1024  # tokens of logits at a time when the caller gives no chunk_size


def _check(hidden, weight, labels, reduction, chunk_size):
    check_cross_entropy_args(hidden, weight, labels, reduction)
    check_float("linear_cross_entropy", hidden=hidden, weight=weight)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: labels must be int64 or int32, got {labels.dtype}")
    check_device("linear_cross_entropy", hidden=hidden, weight=weight, labels=labels)
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, max_block_v):
        N, V = hidden.shape[0], weight.shape[0]
        valid = labels != ignore_index
        if traced(hidden):  # no data to branch on: the count stays a tensor
            count = valid.sum().clamp(min=1).float()
        else:
            check_labels(labels, V, ignore_index)  # the reference's check and message, one of them
            count = max(int(valid.sum()), 1)
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        labels = labels.contiguous()
        losses = []
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            h = hidden[s:e]
            z = h @ weight.t()  # (c, V), becomes the gradient block in place
            losses.append(_ce_rows_op(z, labels[s:e], ignore_index, need_dh or need_dw, max_block_v))
            if need_dh:
                dh[s:e] = z @ weight
            if need_dw:
                dw.addmm_(z.t().float(), h.float())
            del z
        ctx.scale = 1.0 / count if reduction == "mean" else 1.0
        ctx.save_for_backward(dh if need_dh else None, dw if need_dw else None)
        ctx.weight_dtype = weight.dtype
        total = torch.cat(losses).sum() if losses else torch.zeros((), dtype=torch.float32, device=hidden.device)
        return total * ctx.scale

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        g = grad_out * ctx.scale
        gh = dh * g.to(dh.dtype) if dh is not None else None
        gw = (dw * g).to(ctx.weight_dtype) if dw is not None else None
        return gh, gw, None, None, None, None, None


def _ce_rows_fake(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, compute_grad: bool,
                  max_block_v: int) -> torch.Tensor:
    return torch.empty(z.shape[0], dtype=torch.float32, device=z.device)


@kernel_op("cross_entropy_rows_triton", _ce_rows_fake, mutates_args=("z",))
def _ce_rows_op(z: torch.Tensor, labels: torch.Tensor, ignore_index: int, compute_grad: bool,
                max_block_v: int) -> torch.Tensor:
    """Per-row loss (fp32) of logits z (c, V) against labels (c,); with compute_grad z becomes
    softmax(z) - onehot(label) in place (0 on ignored rows)."""
    losses = _ce_rows_fake(z, labels, ignore_index, compute_grad, max_block_v)
    c, V = z.shape
    if c:
        block_v, rows = _tiles(V, max_block_v)
        with launch_device(z):
            _ce_rows[(triton.cdiv(c, rows),)](z, labels, losses, c, V, z.stride(0), ignore_index,
                                              ROWS=rows, BLOCK_V=block_v, COMPUTE_GRAD=compute_grad, num_warps=8)
    return losses


def _tiles(V: int, max_block_v: int = MAX_BLOCK_V) -> tuple[int, int]:
    """(BLOCK_V, ROWS) of _ce_rows: one row a program for real vocabularies, several for tiny ones."""
    block_v = min(next_pow2(V), max_block_v)
    return block_v, max(1, min(16, 4096 // block_v))


@amp.like_linear
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of hidden (N, H) @ weight (V, H)^T against labels (N,) -> fp32 scalar.

    reduction "mean" averages over tokens whose label is not ignore_index, "sum" sums them.
    chunk_size tokens of logits exist at a time (memory O(chunk_size * V); None: CHUNK_SIZE). Under
    autocast the head matmul runs in the autocast dtype (kernels/amp.py); lse, softmax and loss stay
    fp32. A program holds at most MAX_BLOCK_V vocabulary columns at once; the online softmax loops
    over ceil(V / block) blocks.
    """
    chunk_size = CHUNK_SIZE if chunk_size is None else chunk_size
    _check(hidden, weight, labels, reduction, chunk_size)
    return LinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, reduction, chunk_size, MAX_BLOCK_V)


def compile_specs() -> list:
    """The GPU compilations of tests/test_kernels_compile.py (kernels/compile_spec.py), tiled by
    _tiles: a real vocabulary (4096-column blocks, one row a program) in bf16 on every target and
    fp32 on sm_80, and a 256-word one (16 rows a program)."""
    from lora_engine.kernels.compile_spec import TARGETS, CompileSpec, signature

    specs = []
    for t, vocab, targets in (("bf16", 49152, TARGETS), ("fp32", 49152, (80,)), ("bf16", 256, (80,))):
        block_v, rows = _tiles(vocab)
        sig = signature(_ce_rows, t, labels_ptr="*i64", loss_ptr="*fp32", N="i32", V="i32", stride_z="i32",
                        ignore_index="i32")
        specs.append(CompileSpec(f"ce_rows_V{vocab}/{t}", _ce_rows, sig,
                                 {"ROWS": rows, "BLOCK_V": block_v, "COMPUTE_GRAD": True}, targets,
                                 {"num_warps": 8}))
    return specs
