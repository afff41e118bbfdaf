"""Per-token log-probabilities of completion tokens, chunked over tokens so no (tokens x vocab) tensor is kept.

    logps = completion_logps(model, input_ids, attention_mask, prompt_lengths, completion_mask, temperature)

input_ids (B, T) holds each row's prompt followed by its completion, right-padded (attention_mask 0 on
the padding), so every row's positions count from 0 at its first token as the decoder's do and no
position id is needed. Completion token j of row i sits at column prompt_lengths[i] + j and is
predicted by the hidden state one column before it. The result is (B, C) fp32, C =
completion_mask.shape[1], log_softmax(logits / temperature) at each completion token (the
distribution the decoder sampled it from, and TRL's per_token_logps), 0 where completion_mask is 0.

The head runs on chunks of `chunk` tokens: each chunk's (chunk, V) fp32 logits exist only inside a
torch.utils.checkpoint, which keeps the chunk's (chunk, D) hidden states for backward and recomputes
the logits there, so the peak extra memory is one chunk's logits, forward and backward.
dispatch.linear_cross_entropy (the SFT and DPO loss) returns only a sum, and the policy-gradient loss
needs each token's value (ratios, clipping), hence this path.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

# Tokens per chunk: 2**22 fp32 logits (16 MB) per chunk at the vocabulary size, at least 16 tokens.
_LOGITS_PER_CHUNK = 2**22


def _chunk_logps(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """(c,) fp32 log p(targets) of h (c, D) through the head w (V, D) at `temperature`."""
    logits = (h @ w.t()).float() / temperature  # (c, V)
    return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def token_logps(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                chunk: int | None = None) -> torch.Tensor:
    """(N,) fp32 log_softmax(h @ w^T / temperature)[targets], h (N, D), w (V, D), targets (N,) long; chunked."""
    if not temperature > 0:
        raise ValueError(f"token_logps: temperature must be > 0, got {temperature}")
    n = h.shape[0]
    chunk = chunk or max(16, _LOGITS_PER_CHUNK // max(1, w.shape[0]))
    grad = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    parts = []
    for s in range(0, n, chunk):
        args = (h[s:s + chunk], w, targets[s:s + chunk], temperature)
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if grad else _chunk_logps(*args))
    return torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
                     completion_mask: torch.Tensor, temperature: float = 1.0, chunk: int | None = None) -> torch.Tensor:
    """(B, C) fp32 log-probabilities of the completion tokens under `model` (see the module docstring)."""
    B, C = completion_mask.shape
    h = model.hidden_states(input_ids, attention_mask)  # (B, T, D)
    # Column of the hidden state that predicts completion token j of row i: prompt_lengths[i] - 1 + j.
    cols = (prompt_lengths[:, None] - 1 + torch.arange(C, device=h.device)[None]).clamp(max=h.shape[1] - 1)
    targets = input_ids.gather(1, (cols + 1).clamp(max=input_ids.shape[1] - 1))  # (B, C)
    keep = completion_mask.bool()
    rows, js = keep.nonzero(as_tuple=True)
    picked = h[rows, cols[rows, js]]  # (N, D): the completion tokens only, prompt and padding never reach the head
    w = model.head_weight(h.device)
    lp = token_logps(picked, w, targets[rows, js], temperature, chunk or getattr(model, "loss_chunk_size", 0) or None)
    out = torch.zeros(B, C, dtype=torch.float32, device=h.device)
    return out.index_put((rows, js), lp)
