"""The gated delta rule (Gated DeltaNet, Qwen3.5 / Qwen3-Next linear attention) as its plain recurrence.

Per head, with a (dk, dv) state S, for t = 0..T-1 (q, k already L2-normalised by the caller):

    S   <- exp(g_t) * S                              decay, g_t <= 0 (log space)
    S   <- S + k_t (beta_t (v_t - S^T k_t))^T         delta-rule write of strength beta_t in [0, 1]
    o_t  = S^T (scale * q_t)                          scale defaults to dk ** -0.5

This token-by-token loop in float64 is the oracle the chunked kernels (CPU and Triton) are tested
against; it is O(T) in memory and far too slow to train with. Layout as transformers and
flash-linear-attention: q, k (B, T, H, dk), v (B, T, H, dv), g and beta (B, T, H), state (B, H, dk, dv).
Key heads fewer than value heads (grouped value attention) are repeated to H by the caller.
"""

from __future__ import annotations

import torch


def gated_delta_rule_recurrent(q, k, v, g, beta, scale: float | None = None, initial_state=None,
                               output_final_state: bool = False, dtype=torch.float64):
    """(o (B, T, H, dv), final state (B, H, dk, dv) or None), computed and returned in `dtype`."""
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    scale = dk**-0.5 if scale is None else scale
    q, k, v, g, beta = (t.transpose(1, 2).to(dtype) for t in (q, k, v, g, beta))
    S = q.new_zeros((B, H, dk, dv)) if initial_state is None else initial_state.to(dtype).clone()
    out = v.new_empty((B, H, T, dv))
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None, None]
        kt = k[:, :, t]
        delta = (v[:, :, t] - torch.einsum("bhkv,bhk->bhv", S, kt)) * beta[:, :, t, None]
        S = S + kt[..., None] * delta[..., None, :]
        out[:, :, t] = torch.einsum("bhkv,bhk->bhv", S, q[:, :, t] * scale)
    return out.transpose(1, 2), (S if output_final_state else None)
