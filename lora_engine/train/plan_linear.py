"""The memory plan's stand-in for the gated delta rule of linear-attention layers (Qwen3.5, models/hybrid.py).

The plan (train/planning.py) runs the model's own code on fake tensors. For a Gated DeltaNet layer that code
is the projections, the causal conv1d (both O(T), planned as they run) and the delta rule, which the model
runs through the chunked kernels (dispatch.gated_delta_rule). Their fake ops can be traced, but the CPU
path walks T / 64 chunks per layer in Python, minutes of tracing at 128k tokens. So the plan swaps in what
the chunked kernel allocates, shapes only (B batch, T tokens, H value heads, NT = ceil(T / 64)):

    forward   o (B, T, H, dv) in v's dtype; kept for backward: q, k (B, T, H, dk), v, g and beta (B, T, H),
              which the layer made anyway, and the state at each chunk boundary, (B, H, NT, dk, dv) fp32
    backward  dq, dk, dv, dg, dbeta in their inputs' shapes, and the state's gradient carried from chunk to
              chunk, (B, H, dk, dv) fp32

Every term is linear in T: the layer's activations are O(T), never attention's (T, T). Its FLOPs are not
counted (the stand-in computes nothing). `planned_linear_layers` swaps the stand-in in for the planned step
only; the real model is untouched outside it.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

CHUNK = 64  # tokens per chunk of the chunked gated delta rule (flash-linear-attention's and transformers')


class _PlannedDeltaRule(torch.autograd.Function):
    """The chunked kernel's allocations (see the module docstring); values are never read."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta):
        B, T, H, dk = k.shape
        states = q.new_empty((B, H, -(-T // CHUNK), dk, v.shape[-1]), dtype=torch.float32)  # (B, H, NT, dk, dv)
        ctx.save_for_backward(q, k, v, g, beta, states)
        return v.new_empty(v.shape)

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, beta, states = ctx.saved_tensors
        carried = states.new_empty(states[:, :, 0].shape)  # dS, (B, H, dk, dv), carried back over the chunks
        grads = tuple(torch.empty_like(t) for t in (q, k, v, g, beta))
        del carried
        return grads


def planned_delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False, backend=None):
    """models/hybrid.py's `_delta_rule` signature: (o, final state or None)."""
    o = _PlannedDeltaRule.apply(q, k, v, g, beta)
    final = q.new_empty((k.shape[0], k.shape[2], k.shape[3], v.shape[-1]), dtype=torch.float32) \
        if output_final_state else None
    return o, final


@contextmanager
def planned_linear_layers():
    """Within: the linear-attention layers' delta rule is the planned stand-in (restored on exit). The plan
    runs in one thread and builds its own model, so the swap touches no run in progress."""
    from lora_engine.models import hybrid

    real = hybrid._delta_rule
    hybrid._delta_rule = planned_delta_rule
    try:
        yield
    finally:
        hybrid._delta_rule = real
