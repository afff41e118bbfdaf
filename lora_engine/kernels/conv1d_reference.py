"""The short causal depthwise convolution of a Gated DeltaNet layer, as PyTorch ops (the reference).

    y[b, t, c] = act(bias[c] + sum_{j<K} weight[c, 0, j] * x[b, t - (K - 1) + j, c])

x (B, T, C) with tokens before t = 0 taken from initial_state (B, C, K - 1) (the last K - 1 inputs of
the previous call, channels first as transformers' conv state holds them) or zeros; weight (C, 1, K)
as nn.Conv1d(C, C, K, groups=C) stores it (Qwen3.5: K = 4, no bias); act SiLU or none. Computed in
weight's dtype as transformers' causal_conv1d_fn does, returned in x's dtype. Autograd through
F.conv1d gives the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", None)


def check_conv1d_args(x, weight, bias, activation, initial_state) -> None:
    """ValueError naming the tensor and the numbers when the arguments do not fit together."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (B, T, C), got shape {tuple(x.shape)}")
    C = x.shape[-1]
    if weight.dim() != 3 or weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"causal_conv1d: weight must be ({C}, 1, K) for x with {C} channels, "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (C,):
        raise ValueError(f"causal_conv1d: bias must be ({C},), got {tuple(bias.shape)}")
    K = weight.shape[-1]
    want = (x.shape[0], C, K - 1)
    if initial_state is not None and tuple(initial_state.shape) != want:
        raise ValueError(f"causal_conv1d: initial_state must be (B, C, K - 1) = {want}, "
                         f"got {tuple(initial_state.shape)}")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = "silu", initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, T, C), weight (C, 1, K) -> y (B, T, C) in x's dtype (module docstring)."""
    check_conv1d_args(x, weight, bias, activation, initial_state)
    K = weight.shape[-1]
    xc = x.transpose(1, 2).to(weight.dtype)  # (B, C, T)
    if initial_state is None:
        xc = F.pad(xc, (K - 1, 0))
    else:
        xc = torch.cat([initial_state.to(weight.dtype), xc], dim=-1)
    y = F.conv1d(xc, weight, bias, groups=x.shape[-1])
    if activation == "silu":
        y = F.silu(y)
    return y.transpose(1, 2).to(x.dtype)
