"""Pure-PyTorch references for every kernel: the test oracle, the CPU path and the benchmark baseline.

Each function computes exactly what Hugging Face transformers / PEFT compute, in the same order of
operations, so the model matches them bit for bit on CPU in fp32. This file imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / sqrt(mean(x^2) + eps)); statistics in fp32, as transformers does.

    x: (..., D) any float dtype; weight: (D,). Returns x's dtype (weight's dtype wins if wider,
    exactly like LlamaRMSNorm: `weight * hidden.to(input_dtype)`).
    """
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding, Hugging Face's rotate-half convention.

    q: (B, Hq, T, hd), k: (B, Hk, T, hd); cos, sin: (B, T, hd) or (T, hd) in q's dtype.
    Returns (q', k') with q' = q*cos + rotate_half(q)*sin.
    """
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up have the same shape and dtype."""
    return F.silu(gate) * up


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    x_dropped: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T (+ b) + scale * (dropout(x) A^T) B^T, in PEFT's order of operations.

    x: (..., in); weight: (out, in); lora_A: (r, in); lora_B: (out, r). `x_dropped` is dropout(x)
    when dropout is active (the caller owns the RNG), else x itself is used.
    """
    xd = x if x_dropped is None else x_dropped
    y = F.linear(x, weight, bias)
    return y + F.linear(F.linear(xd, lora_A), lora_B) * scale


def _lce_chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of (hidden @ W^T) without the (N, V) logits ever existing in full.

    Forward walks the tokens in chunks; for each chunk it forms the (chunk, V) logits in fp32,
    takes logsumexp and the target logit, and, because the loss is the only consumer, computes the
    gradients right there: dlogits = softmax - onehot(label), dh = dlogits @ W, dW += dlogits^T h.
    Backward only scales the stored gradients by grad_output. Peak extra memory: O(chunk * V).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size):
        n = hidden.shape[0]
        valid = labels != ignore_index
        count = int(valid.sum())
        need_dh = hidden.requires_grad
        need_dw = weight.requires_grad
        dh = torch.zeros_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s, e in _lce_chunks(n, chunk_size):
            h = hidden[s:e]
            lab = labels[s:e]
            ok = valid[s:e]
            logits = (h @ weight.t()).float()  # (c, V)
            lse = torch.logsumexp(logits, dim=-1)
            safe = torch.where(ok, lab, torch.zeros_like(lab))
            target = logits.gather(1, safe[:, None]).squeeze(1)
            total += torch.where(ok, lse - target, torch.zeros_like(lse)).sum()
            if need_dh or need_dw:
                g = torch.softmax(logits, dim=-1)
                g[torch.arange(e - s, device=g.device), safe] -= 1.0
                g *= ok[:, None]
                if need_dh:
                    dh[s:e] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_dw:
                    dw += g.t() @ h.float()
        scale = 1.0 / max(count, 1) if reduction == "mean" else 1.0
        ctx.save_for_backward(
            dh if dh is not None else torch.empty(0), dw if dw is not None else torch.empty(0)
        )
        ctx.scale = scale
        ctx.flags = (need_dh, need_dw, weight.dtype)
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        dh, dw = ctx.saved_tensors
        need_dh, need_dw, wdtype = ctx.flags
        g = grad_out * ctx.scale
        gh = (dh * g.to(dh.dtype)) if need_dh else None
        gw = (dw * g).to(wdtype) if need_dw else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Cross-entropy of logits = hidden @ weight^T against labels, chunked over tokens.

    hidden: (N, H); weight: (V, H); labels: (N,) int64 with `ignore_index` for tokens that carry
    no loss. reduction "mean" averages over the counted tokens (0 when there are none), "sum" sums.
    Returns an fp32 scalar.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"linear_cross_entropy: expected hidden (N, H), weight (V, H), labels (N,); got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: shapes do not agree: hidden {tuple(hidden.shape)}, "
            f"weight {tuple(weight.shape)}, labels {tuple(labels.shape)}"
        )
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, reduction, chunk_size)


def cross_entropy_unfused(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    """The textbook path (full logits in fp32, then F.cross_entropy): oracle and benchmark baseline."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
