"""Cross-entropy of soft-capped logits (Gemma 2's final_logit_softcapping), chunked over tokens.

logits = c * tanh((h W^T) / c), as transformers computes them, then cross-entropy. The fused losses
(dispatch.linear_cross_entropy's kernels) have no soft-cap, so this is the PyTorch expression, one chunk of
tokens at a time, each chunk recomputed in backward (torch.utils.checkpoint): at most one (chunk x V) block
of logits is alive, as with the fused losses. A fused kernel with the cap is a later step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 1024  # tokens per block: 1024 x 256k vocabulary x 4 bytes = 1 GiB of fp32 logits at most


def _chunk_loss(h, weight, target, cap):
    logits = torch.tanh((h @ weight.t()).float() / cap) * cap
    return F.cross_entropy(logits, target, ignore_index=-100, reduction="sum")


def softcapped_cross_entropy(hidden, weight, labels, cap: float, reduction: str = "mean",
                             chunk_size: int | None = None) -> torch.Tensor:
    """hidden (N, D), weight (V, D), labels (N,) with -100 skipped -> fp32 scalar ("mean" over the counted
    tokens, 0 when none; "sum")."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    chunk = chunk_size or DEFAULT_CHUNK
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        h, t = hidden[i:i + chunk], labels[i:i + chunk]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss, h, weight, t, cap, use_reentrant=False)
        else:
            total = total + _chunk_loss(h, weight, t, cap)
    if reduction == "sum":
        return total
    return total / (labels != -100).sum().clamp(min=1)
