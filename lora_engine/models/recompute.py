"""A row-wise function applied in chunks of rows, recomputed chunk by chunk in backward.

The MLP of a layer maps each token's row on its own, but through (tokens x intermediate) tensors:
for Llama-3.1-8B at 100k tokens gate, up and their SwiGLU product are 2.7 GiB each in bf16, and a
backward holds them (and their gradients) at once. chunked_rows never holds more than `chunk` rows
of them:

    forward    out[rows] = fn(x[rows]) for each block of `chunk` rows, under no_grad; only x is saved
    backward   for each block: recompute fn(x[rows]) with grad, then
               dx[rows] = d/dx, dparams += d/dparams of <fn(x[rows]), dout[rows]>

Each output row is computed from its input row by the same ops as unchunked, so the outputs equal
the unchunked MLP's up to the matmul's own blocking (which may differ with the number of rows), and
the parameter gradients up to the order of the sum over rows (chunk by chunk here, all at once
there): equal to rounding, not bit for bit. Autocast and RNG state are replayed from the forward, so
the recomputation draws the dropout masks the forward drew (not the masks an unchunked call would
draw: the generator is consumed per block).
"""

from __future__ import annotations

import torch

from lora_engine.models.offload import Replay


def _blocks(n: int, chunk: int):
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _forward(fn, x2: torch.Tensor, chunk: int) -> torch.Tensor:
    """fn over row blocks of x2 (N, D) into one preallocated (N, D_out) output (no concatenation copy)."""
    out = None
    for s, e in _blocks(x2.shape[0], chunk):
        y = fn(x2[s:e])
        if out is None:
            out = y.new_empty((x2.shape[0],) + y.shape[1:])
        out[s:e] = y
        del y
    return out


class _ChunkedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, replay: Replay, chunk: int, x2, *params):
        ctx.replay, ctx.chunk, ctx.params = replay, chunk, params
        ctx.save_for_backward(x2)
        with torch.no_grad():
            return _forward(replay.fn, x2, chunk)

    @staticmethod
    def backward(ctx, dout):
        (x2,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[2]
        needs = ctx.needs_input_grad[3:]
        params = [p for p, need in zip(ctx.params, needs) if need]
        dx = torch.empty_like(x2) if need_x else None
        dparams = [None] * len(params)
        with ctx.replay.replaying():
            for s, e in _blocks(x2.shape[0], ctx.chunk):
                xc = x2[s:e].detach().requires_grad_(need_x)
                y = ctx.replay.fn(xc)
                grads = torch.autograd.grad(y, ([xc] if need_x else []) + params, dout[s:e], allow_unused=True)
                del y
                if need_x:
                    dx[s:e] = grads[0]
                for i, g in enumerate(grads[1:] if need_x else grads):
                    if g is not None:
                        dparams[i] = g if dparams[i] is None else dparams[i].add_(g)
        dparams = iter(dparams)
        return (None, None, dx, *(next(dparams) if need else None for need in needs))


def chunked_rows(fn, x: torch.Tensor, params: list[torch.Tensor], chunk: int) -> torch.Tensor:
    """fn(x) for a row-wise fn: x (..., D) -> (..., D_out), computed `chunk` rows (tokens) at a time.

    params: the trainable tensors fn uses. Under no_grad the blocks are just computed one after
    another; with grad, only x is saved and fn is recomputed per block in backward (module docstring).
    """
    if chunk < 1:
        raise ValueError(f"chunked_rows: chunk must be >= 1 rows, got {chunk}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= chunk:
        return fn(x)
    if not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        out = _forward(fn, x2, chunk)
    else:
        out = _ChunkedRows.apply(Replay(fn, None, x.device), chunk, x2, *params)
    return out.reshape(*lead, out.shape[-1])
