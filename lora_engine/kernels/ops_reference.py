"""Pure-PyTorch references for every kernel: the test oracle, the CPU path and the benchmark baseline.

One idea over ~470 lines: the oracle is kept in one file so a reader checks every op against one page.

Each function computes exactly what Hugging Face transformers / PEFT compute, in the same order of
operations, so the model matches them bit for bit on CPU in fp32. Under torch.autocast the matmul
ops follow kernels/amp.py (inputs cast to the autocast dtype, loss in fp32). This file imports
torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from lora_engine.kernels import amp, window_attention


def _rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    # Exactly LlamaRMSNorm's operations, so logits equal transformers' bit for bit.
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h * rstd).to(x.dtype), rstd


class RMSNormFunction(torch.autograd.Function):
    """Saves x and the (..., 1) fp32 rstd only; autograd on the eager ops would keep the fp32
    normalised copy and the product as well (two more activations per norm, per layer)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = _rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, rstd = ctx.saved_tensors
        n = x.float() * rstd  # the normalised input, recomputed
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight = (gy * n.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dn = (gy * weight).float()
            # d/dx of x * rstd(x): rstd * (dn - n * mean(dn * n))
            dx = (rstd * (dn - n * (dn * n).mean(-1, keepdim=True))).to(x.dtype)
        return dx, dweight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * (x / sqrt(mean(x^2) + eps)); statistics in fp32, as transformers does.

    x: (..., D) any float dtype; weight: (D,). Returns x's dtype (weight's dtype wins if wider,
    exactly like LlamaRMSNorm: `weight * hidden.to(input_dtype)`). With gradients on, a custom
    backward keeps only x and rstd alive.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return RMSNormFunction.apply(x, weight, eps)
    return _rms_norm_forward(x, weight, eps)[0]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotate_half_t(y: torch.Tensor) -> torch.Tensor:
    # The transpose of rotate_half (it is a rotation by -90 degrees: R^T = -R).
    half = y.shape[-1] // 2
    return torch.cat((y[..., half:], -y[..., :half]), dim=-1)


def _rope_forward(q, k, cos, sin):
    """(q cos + rotate_half(q) sin, k cos + rotate_half(k) sin), cos and sin already broadcastable."""
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class RopeFunction(torch.autograd.Function):
    """q' = q*cos + R(q)*sin is linear in q: dq = g*cos + R^T(g*sin). Saves cos and sin only."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_forward(q, k, cos, sin)

    @staticmethod
    def backward(ctx, gq, gk):
        cos, sin = ctx.saved_tensors
        dq = gq * cos + _rotate_half_t(gq * sin) if ctx.needs_input_grad[0] else None
        dk = gk * cos + _rotate_half_t(gk * sin) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding, Hugging Face's rotate-half convention.

    q: (B, Hq, T, hd), k: (B, Hk, T, hd); cos, sin: (B, T, hd) or (T, hd) in q's dtype.
    Returns (q', k') with q' = q*cos + rotate_half(q)*sin. cos and sin carry no gradient.
    """
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return RopeFunction.apply(q, k, cos, sin)
    return _rope_forward(q, k, cos, sin)


class SwiGLUFunction(torch.autograd.Function):
    """Saves gate and up; silu(gate) is recomputed in backward instead of being kept per layer."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        s = torch.sigmoid(gate)
        silu = gate * s
        dgate = g * up * (s * (1 + gate * (1 - s))) if ctx.needs_input_grad[0] else None
        dup = g * silu if ctx.needs_input_grad[1] else None
        return dgate, dup


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise; gate and up have the same shape and dtype."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SwiGLUFunction.apply(gate, up)
    return F.silu(gate) * up


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float | None = None,
              mask: torch.Tensor | None = None, softcap: float | None = None,
              window: int | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ mask | causal]) v: torch's SDPA, what transformers runs; q (B, H, T, hd),
    k and v (B, Hk, S, hd) with H % Hk == 0 (grouped-query heads) -> (B, H, T, hd). softcap: the
    scores become softcap * tanh(scores / softcap) before the mask, which SDPA cannot do: transformers'
    eager expression (softmax in fp32, cast back), the (T, S) scores materialised. window: causal over
    keys p - window < key <= p only, by chunks of queries in O(S x W) (kernels/window_attention.py);
    not with a mask (put the window in the mask instead)."""
    if window is not None:
        T, S = q.shape[2], k.shape[2]
        if mask is not None:
            raise ValueError("attention: pass a sliding window either as window= or inside the mask, not both")
        if window < S or 1 < T < S:  # (SDPA's is_causal aligns T < S queries to the first keys, not the last)
            attend = window_attention.sdpa if softcap is None else (
                lambda q, k, v, m, sc: _softcapped_attention(q, k, v, False, sc, m, softcap))
            return window_attention.attention(q, k, v, window, scale, attend)
        is_causal = T > 1  # the window covers every key: plain causal attention
    if softcap is not None:
        return _softcapped_attention(q, k, v, is_causal, scale, mask, softcap)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=k.shape[1] != q.shape[1])


def _softcapped_attention(q, k, v, is_causal, scale, mask, softcap):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh(q @ k.transpose(2, 3) * (scale if scale is not None else q.shape[-1] ** -0.5) / softcap)
    scores = scores * softcap
    T, S = q.shape[2], k.shape[2]
    if mask is None and is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


@amp.like_linear
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
    when dropout is active (the caller owns the RNG), else x itself is used. Under autocast every
    tensor is cast to the autocast dtype first (kernels/amp.py); the result has that dtype.
    """
    return low_rank_linear(x, weight, bias, lora_A, lora_B, scale, x_dropped)


def low_rank_linear(x, weight, bias, lora_A, lora_B, scale, x_dropped=None, dequantize=None) -> torch.Tensor:
    """lora_linear's math through LowRankLinearFunction; `weight` is a dense tensor, or with
    `dequantize` (weight, dtype) -> tensor a packed one (NF4) that is never kept dense. The adapters
    and x_dropped are cast to x's dtype first (autograd records the casts): the low-rank term is
    computed in the output's dtype."""
    dt = x.dtype
    xd = None if x_dropped is None else x_dropped.to(dt)
    return LowRankLinearFunction.apply(x, weight, bias, lora_A.to(dt), lora_B.to(dt), scale, xd, dequantize)


class LowRankLinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) + scale * (xd A^T) B^T: forward in torch ops, backward by hand.

    Forward is F.linear, then the rank-r product added into y in place by one addmm_ (no (..., out)
    temporaries). Backward is what autograd derives from those ops, less its bookkeeping: through
    autograd, the in-place addmm_ on a view of the base
    output makes backward clone the (tokens, out) gradient and copy it back (CopySlices), and x's
    two gradient terms, dy W and dh A, are two (tokens, in) products summed by the engine. Here dy
    is read where it lies and dx = dy W gets dh A added inside one addmm_ (its sum rounds in
    another order than autograd's: within one rounding of the dtype). What that bookkeeping cost a
    LoRA step is recorded in bench/results/train_step.md. Saved:
    xd, h = xd A^T (tokens, r), A, B, the weight (a reference, or the packed NF4 tensor, dequantized
    again in backward) and x itself only when the weight takes a gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, x_dropped, dequantize):
        w = weight if dequantize is None else dequantize(weight, x.dtype)
        xd = x if x_dropped is None else x_dropped
        y = F.linear(x, w, bias)
        h = F.linear(xd, lora_A).reshape(-1, lora_A.shape[0])  # (tokens, r)
        y.view(-1, y.shape[-1]).addmm_(h, lora_B.t(), alpha=scale)
        need_dw = dequantize is None and ctx.needs_input_grad[1]
        ctx.scale, ctx.dequantize, ctx.dropped, ctx.x_shape = scale, dequantize, x_dropped is not None, x.shape
        ctx.packed = weight if dequantize is not None else None
        ctx.save_for_backward(x if need_dw else None, xd, h, lora_A, lora_B, weight if dequantize is None else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, xd, h, lora_A, lora_B, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, _, need_xd, _ = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = da = dbb = dxd = None
        if need_bb:  # addmm's gradient for its mat2 (B^T), transposed back
            dbb = torch.mm(h.t(), dy2).mul_(ctx.scale).t()
        if need_a or need_xd or (need_x and not ctx.dropped):
            dh = torch.mm(dy2, lora_B).mul_(ctx.scale)  # (tokens, r)
            if need_a:
                da = torch.mm(dh.t(), xd.reshape(-1, xd.shape[-1]))
            if need_xd:
                dxd = torch.mm(dh, lora_A).view(ctx.x_shape)
        if need_x:
            w = weight if ctx.dequantize is None else ctx.dequantize(ctx.packed, dy.dtype)
            dx2 = torch.mm(dy2, w)
            if not ctx.dropped:
                dx2.addmm_(dh, lora_A)
            dx = dx2.view(ctx.x_shape)
        if need_w:
            dw = torch.mm(dy2.t(), x.reshape(-1, x.shape[-1]))
        if need_b:
            db = dy2.sum(0)
        return dx, dw, db, da, dbb, None, dxd, None


def add_low_rank(y: torch.Tensor, xd: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """y + scale * (xd A^T) B^T inside one GEMM, out of place, through autograd: for a base output y
    that autograd forbids to update in place (a view made inside a custom autograd Function, as
    kernels/nf4_triton.py's). LowRankLinearFunction does the same sum in place, with its own backward.
    PEFT rounds the product before scaling; the difference is within one rounding of the dtype. The
    term is computed in y's dtype whatever xd, A and B hold and whatever autocast says.
    """
    dt = y.dtype
    xd, lora_A, lora_B = xd.to(dt), lora_A.to(dt), lora_B.to(dt)  # no-ops when they match
    with amp.off(y):
        h = F.linear(xd, lora_A).reshape(-1, lora_A.shape[0])  # (tokens, r)
        return torch.addmm(y.reshape(-1, y.shape[-1]), h, lora_B.t(), alpha=scale).view(y.shape)


def _lce_chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of (hidden @ W^T) without the (N, V) logits ever existing in full.

    Only the tokens that carry a label are touched at all (prompt tokens of an SFT batch cost
    nothing). Forward walks them in chunks; for each chunk it forms the (chunk, V) logits in fp32,
    and in one pass turns them into softmax probabilities (logsumexp = max + log(sum(exp))) after
    reading the target logit. Because the loss is the only consumer it computes the gradients right
    there: dlogits = softmax - onehot(label), dh = dlogits @ W, dW += dlogits^T h. Backward only
    scales the stored gradients by grad_output. Peak extra memory: O(chunk * V). grad_in_place
    (chunked_cross_entropy) replaces the per-chunk torch ops by one fused pass over the logits in
    the weight's dtype, with no fp32 copy.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size, grad_in_place=None):
        if traced(hidden):
            return _lce_static(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size)
        rows = (labels != ignore_index).nonzero().squeeze(1)  # the counted tokens
        count = rows.numel()
        need_dh = hidden.requires_grad
        need_dw = weight.requires_grad
        dh = torch.zeros_like(hidden) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        if need_dw:  # grad_in_place rounds p - onehot to the weight's dtype; dW sums it in fp32
            grad_in_place = None
        bufs = _ChunkBuffers(min(chunk_size, count), weight, fp32=grad_in_place is None)
        for s, e in _lce_chunks(count, chunk_size):
            idx = rows[s:e]
            h = hidden.index_select(0, idx)
            lab = labels.index_select(0, idx)
            if grad_in_place is not None:  # one fused pass: the logits become softmax - onehot, in place
                g = bufs.product_of(h)
                total += grad_in_place(g, lab).sum()
                if need_dh:
                    dh.index_copy_(0, idx, (g @ weight).to(hidden.dtype))
                continue
            logits = bufs.logits(h)  # (c, V) fp32
            target = logits.gather(1, lab[:, None]).squeeze(1)
            m = logits.amax(dim=-1, keepdim=True)
            p = logits.sub_(m).exp_()  # in place: the logits become exp(logits - max)
            z = p.sum(dim=-1, keepdim=True)
            total += (m.squeeze(1) + z.log().squeeze(1) - target).sum()
            if need_dh or need_dw:
                p.div_(z)
                p[torch.arange(e - s, device=p.device), lab] -= 1.0
                if need_dh:
                    dh.index_copy_(0, idx, (bufs.in_weight_dtype(p) @ weight).to(hidden.dtype))
                if need_dw:
                    dw += p.t() @ h.float()
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
        return gh, gw, None, None, None, None, None


class _ChunkBuffers:
    """The (chunk, V) logits buffers of LinearCrossEntropyFunction's eager loop, allocated once and
    reused by every chunk.

    A chunk's logits are ~64 MB: above glibc's mmap threshold (32 MB at most), so a fresh tensor per
    chunk is a fresh mapping whose every page faults on first write, which slows the head GEMM
    that writes into it (the rates with and without reuse: bench/results/train_step.md).
    torch.mm(out=) writes the same values as the allocating product (tests/test_kernels_reference.py).
    """

    def __init__(self, rows: int, weight: torch.Tensor, fp32: bool = True):
        self.weight = weight
        shape = (rows, weight.shape[0])
        self.product = torch.empty(shape, dtype=weight.dtype, device=weight.device)
        self.fp32 = (self.product if weight.dtype == torch.float32 or not fp32
                     else torch.empty(shape, dtype=torch.float32, device=weight.device))

    def product_of(self, h: torch.Tensor) -> torch.Tensor:
        """(h @ weight^T) in the weight's dtype, in the reused buffer (valid until the next call)."""
        return torch.mm(h, self.weight.t(), out=self.product[: h.shape[0]])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(h @ weight^T) in fp32, in the reused buffer (valid until the next call)."""
        out = self.product_of(h)
        return out if self.product is self.fp32 else self.fp32[: h.shape[0]].copy_(out)

    def in_weight_dtype(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 (c, V) p in the weight's dtype for the dh product: p itself, or p rounded into
        the product buffer (free again once logits() has been converted)."""
        return p if self.product is self.fp32 else self.product[: p.shape[0]].copy_(p)


def traced(t: torch.Tensor) -> bool:
    """True under torch.compile or for a fake tensor (a memory plan): shapes must not depend on data."""
    return torch.compiler.is_compiling() or is_fake(t)


def _lce_static(ctx, hidden, weight, labels, ignore_index, reduction, chunk_size):
    """LinearCrossEntropyFunction.forward with data-independent shapes: every token in chunks, the
    ignored ones masked out (they cost compute, unlike the eager path, but no graph break)."""
    n = hidden.shape[0]
    need_dh, need_dw = hidden.requires_grad, weight.requires_grad
    dh = torch.zeros_like(hidden) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    valid_all = labels != ignore_index
    for s, e in _lce_chunks(n, chunk_size):
        h, valid = hidden[s:e], valid_all[s:e]
        lab = torch.where(valid, labels[s:e], 0)
        logits = (h @ weight.t()).float()
        target = logits.gather(1, lab[:, None]).squeeze(1)
        m = logits.amax(dim=-1, keepdim=True)
        p = logits.sub_(m).exp_()  # in place, as the eager path: one (chunk, V) fp32 buffer
        z = p.sum(dim=-1, keepdim=True)
        total = total + torch.where(valid, m.squeeze(1) + z.log().squeeze(1) - target, 0.0).sum()
        if need_dh or need_dw:
            p.div_(z)
            p.scatter_add_(1, lab[:, None], -valid[:, None].to(p.dtype))  # - onehot(label) on counted rows
            p.mul_(valid[:, None])
            if need_dh:
                dh[s:e] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_dw:
                dw += p.t() @ h.float()
    count = valid_all.sum()
    scale = 1.0 / count.clamp(min=1).float() if reduction == "mean" else torch.ones((), device=hidden.device)
    ctx.save_for_backward(dh if dh is not None else torch.empty(0), dw if dw is not None else torch.empty(0))
    ctx.scale = scale
    ctx.flags = (need_dh, need_dw, weight.dtype)
    return total * scale


def check_cross_entropy_args(hidden, weight, labels, reduction) -> None:
    """Shape and reduction checks shared by every linear_cross_entropy implementation."""
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


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Every label is in [0, vocab_size) or ignore_index. Eagerly a ValueError naming the label; under
    torch.compile an in-graph assert (a data-dependent branch would break the graph); fake tensors
    have no values to check."""
    outside = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if traced(labels):
        torch._assert_async(~outside.any(), f"linear_cross_entropy: a label is outside the vocabulary "
                                            f"[0, {vocab_size}) and is not ignore_index ({ignore_index})")
        return
    bad = labels[outside]
    if bad.numel():
        raise ValueError(
            f"linear_cross_entropy: label {int(bad[0])} is outside the vocabulary [0, {vocab_size}) "
            f"and is not ignore_index ({ignore_index})"
        )


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so one chunk's fp32 logits stay near 64 MB (2**24 values)."""
    return max(16, 2**24 // max(vocab_size, 1))


@amp.like_linear
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits = hidden @ weight^T against labels, chunked over tokens.

    hidden: (N, H); weight: (V, H); labels: (N,) int64 with `ignore_index` for tokens that carry
    no loss. reduction "mean" averages over the counted tokens (0 when there are none), "sum" sums.
    chunk_size: tokens per chunk (None: default_chunk_size(V)). Returns an fp32 scalar. Under
    autocast the head matmul runs in the autocast dtype (kernels/amp.py); the softmax stays fp32.
    """
    return chunked_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size)


def chunked_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", chunk_size=None,
                          grad_in_place=None) -> torch.Tensor:
    """linear_cross_entropy without the autocast cast. grad_in_place(block, labels) -> per-row fp32
    losses, overwriting a (c, V) block of logits in the weight's dtype with softmax - onehot (what
    the eager loop computes in fp32 and rounds): a fused kernel's entry (kernels/ops_cpp.py); not
    used when the weight takes a gradient or under tracing. None: the loop's torch ops."""
    check_cross_entropy_args(hidden, weight, labels, reduction)
    check_labels(labels, weight.shape[0], ignore_index)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    return LinearCrossEntropyFunction.apply(hidden, weight, labels, ignore_index, reduction, chunk, grad_in_place)


def cross_entropy_unfused(hidden, weight, labels, ignore_index=-100, reduction="mean"):
    """The textbook path (full logits in fp32, then F.cross_entropy): oracle and benchmark baseline."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
