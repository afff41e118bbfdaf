"""Mixture-of-experts reference ops in plain PyTorch: the oracle every MoE kernel is tested against.

The routed MLP of an MoE layer is computed on tokens grouped by expert. With T tokens, each sent to
k experts (the router's top-k), the T*k (token, expert) assignments are sorted by expert; expert e then
owns one contiguous block of counts[e] rows, and every kernel below works on such blocks:

  sort_by_expert     experts (T, k) -> order (T*k,), counts (E,): assignment order[i] is row i of the
                     grouped input; its token is order[i] // k, its slot order[i] % k
  grouped_lora_mm    y_e = x_e W_e^T (+ bias_e) + scale * (x_e A_e^T) B_e^T for each expert's block x_e,
                     never forming W_e + scale B_e A_e (a per-expert LoRA, PEFT's target_parameters)

Weights are (E, N, K) as transformers v5 stores Qwen3-MoE / Mixtral / OLMoE experts (`gate_up_proj`:
(E, 2F, D), `down_proj`: (E, D, F)); gpt-oss stores (E, K, N), which callers pass as a transposed view.
"""

from __future__ import annotations

import torch


def sort_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, counts) for the (T, k) expert ids `experts`: a stable sort of the flattened assignments by
    expert (ties keep token order, so the grouping is deterministic) and each expert's number of rows."""
    flat = experts.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    return order, counts


def grouped_lora_mm(x: torch.Tensor, counts: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                    a: torch.Tensor | None = None, b: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """x (M, K) grouped by expert (counts (E,), summing to M); w (E, N, K); bias (E, N) or None;
    a (E, r, K) and b (E, N, r), or both None. Returns (M, N) in x's dtype, a loop over experts."""
    if (a is None) != (b is None):
        raise ValueError("grouped_lora_mm: pass both LoRA factors a and b, or neither")
    out = x.new_empty((x.shape[0], w.shape[1]))
    start = 0
    for e, n in enumerate(counts.tolist()):
        xe = x[start : start + n]
        y = xe @ w[e].T
        if bias is not None:
            y = y + bias[e]
        if a is not None:
            y = y + scale * ((xe @ a[e].T) @ b[e].T)
        out[start : start + n] = y
        start += n
    return out


def combine(y: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The grouped expert outputs y (T*k, D) back to tokens: out[t] = sum_j weights[t, j] * y[row of (t, j)],
    weights (T, k). The weighted sum runs in y's dtype after the product, as transformers does."""
    T, k = weights.shape
    per_slot = y.new_empty(y.shape)
    per_slot[order] = y  # row i of y belongs to assignment order[i]
    per_slot = per_slot.view(T, k, -1) * weights[..., None].to(y.dtype)
    return per_slot.sum(1)
