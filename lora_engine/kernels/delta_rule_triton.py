"""The chunked gated delta rule forward in Triton; backward by the chunked PyTorch walk on the same device.

The math is kernels/delta_rule_chunked.py's (its docstring derives it): per chunk of C tokens, with
G the cumulative log decay, D_ij = exp(G_i - G_j) (j <= i), A = strictly-lower (beta k k^T) * D,
X = (I + A)^-1, Uh = X (beta v), W = X (beta exp(G) k):

    u = Uh - W S0,   o = scale exp(G) q S0 + (scale q k^T * D) u,   S1 = exp(G_last) S0 + (k exp(G_last - G))^T u

One program per (batch, head, block of BV value columns) walks the chunks in order with its (dk, BV)
slice of the state in registers (fp32); the value columns of the state never mix, so the slices are
independent, and W, X and the (C, C) blocks, which depend on q, k, g and beta only, are recomputed by
each slice. X comes from forward substitution on the rows of A (row i of X = e_i - A[i, :] X, the
rows above i already done), C steps of (C, C) work per chunk. Each program also writes the state at
every chunk boundary, (B, H, N + 1, dk, dv) fp32, which is what the backward needs.

Layout: q, k (B, T, H, dk), v and o (B, T, H, dv), g, beta (B, T, H), contiguous; tokens past T are
masked to k = q = v = 0, g = 0, beta = 0 (no decay, no write), as the PyTorch path pads them. tl.dot
needs C, dk and BV of at least 16 and powers of two: dk and dv must be powers of two >= 16.

Backward: GatedDeltaRuleChunked.backward (kernels/delta_rule_chunked.py), i.e. the chunk-parallel part
recomputed by PyTorch on the GPU and the walk between chunks from the boundary states saved here; a
Triton backward kernel is not written yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_engine.kernels._common import check_device, check_float, kernel_op, launch_device
from lora_engine.kernels.delta_rule_chunked import GatedDeltaRuleChunked, check_delta_rule_args


@triton.jit
def _gdr_fwd(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, s0_ptr, o_ptr, states_ptr, T, H, scale,
             DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr,
             PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    col0 = tl.program_id(1) * BV
    n_chunks = tl.cdiv(T, C)
    ci = tl.arange(0, C)
    ki = tl.arange(0, DK)
    vi = col0 + tl.arange(0, BV)
    lower = ci[:, None] >= ci[None, :]
    state_off = bh.to(tl.int64) * (n_chunks + 1) * DK * DV + ki[:, None] * DV + vi[None, :]
    if HAS_S0:
        S = tl.load(s0_ptr + bh.to(tl.int64) * DK * DV + ki[:, None] * DV + vi[None, :]).to(tl.float32)
    else:
        S = tl.zeros((DK, BV), dtype=tl.float32)
    for n in range(n_chunks):
        t = n * C + ci
        valid = t < T
        row = (b.to(tl.int64) * T + t) * H + h  # (C,) token rows of (B, T, H)
        q = tl.load(q_ptr + row[:, None] * DK + ki[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row[:, None] * DK + ki[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + row[:, None] * DV + vi[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row, mask=valid, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + row, mask=valid, other=0.0).to(tl.float32)
        G = tl.cumsum(g, 0)
        G_last = tl.sum(tl.where(ci == C - 1, G, 0.0), 0)
        # exp only on and below the diagonal, where G_i - G_j <= 0 (above it may overflow).
        D = tl.exp(tl.where(lower, G[:, None] - G[None, :], float("-inf")))
        A = tl.dot(k, tl.trans(k), input_precision=PRECISION) * D * beta[:, None]
        A = tl.where(ci[:, None] > ci[None, :], A, 0.0)
        X = tl.zeros((C, C), dtype=tl.float32)
        for i in range(C):  # forward substitution, row i of (I + A)^-1 from the rows above it
            a_i = tl.sum(tl.where(ci[:, None] == i, A, 0.0), 0)  # (C,) row i of A
            x_i = tl.where(ci == i, 1.0, 0.0) - tl.sum(a_i[:, None] * X, 0)
            X = tl.where(ci[:, None] == i, x_i[None, :], X)
        eG = tl.exp(G)
        Uh = tl.dot(X, v * beta[:, None], input_precision=PRECISION)
        W = tl.dot(X, k * (beta * eG)[:, None], input_precision=PRECISION)
        tl.store(states_ptr + state_off + n * DK * DV, S)
        u = Uh - tl.dot(W, S, input_precision=PRECISION)
        P = tl.dot(q, tl.trans(k), input_precision=PRECISION) * D * scale
        o = tl.dot(q * (eG * scale)[:, None], S, input_precision=PRECISION) + tl.dot(P, u, input_precision=PRECISION)
        tl.store(o_ptr + row[:, None] * DV + vi[None, :], o.to(o_ptr.dtype.element_ty), mask=valid[:, None])
        kd = k * tl.exp(G_last - G)[:, None]
        S = tl.exp(G_last) * S + tl.dot(tl.trans(kd), u, input_precision=PRECISION)
    tl.store(states_ptr + state_off + n_chunks * DK * DV, S)


def _precision(device: torch.device) -> str:
    """tl.dot's fp32 mode: three TF32 products (fp32-accurate, on tensor cores) from Ampere on; plain fp32
    FMAs before it (Turing has no TF32) and in the interpreter, which ignores the mode."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32x3"
    return "ieee"


def _tiles(dv: int) -> int:
    """BV: value columns per program (a (dk, BV) fp32 state slice in registers)."""
    return min(dv, 64)


def _fwd_fake(q, k, v, g, beta, initial_state, scale, chunk):
    B, T, H, dk = k.shape
    N = -(-T // chunk)
    return v.new_empty(v.shape), k.new_empty((B, H, N + 1, dk, v.shape[-1]), dtype=torch.float32)


@kernel_op("gated_delta_rule_fwd_triton", _fwd_fake)
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            initial_state: torch.Tensor | None, scale: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(o (B, T, H, dv) in v's dtype, boundary states (B, H, N + 1, dk, dv) fp32)."""
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
    s0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    o = torch.empty_like(v)
    N = triton.cdiv(T, chunk)
    states = torch.empty((B, H, N + 1, dk, dv), dtype=torch.float32, device=v.device)
    BV = _tiles(dv)
    with launch_device(v):
        _gdr_fwd[(B * H, dv // BV)](q, k, v, g, beta, states if s0 is None else s0, o, states, T, H, scale,
                                    DK=dk, DV=dv, C=chunk, BV=BV, HAS_S0=s0 is not None,
                                    PRECISION=_precision(v.device))
    return o, states


class GatedDeltaRuleTriton(GatedDeltaRuleChunked):
    """Forward by the Triton kernel; backward inherited (PyTorch on the same device, module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, chunk):
        o, states = _fwd_op(q, k, v, g, beta, initial_state, scale, chunk)
        ctx.save_for_backward(q, k, v, g, beta, states)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return o, states[:, :, -1]


def _is_pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk=64):
    """delta_rule_chunked.gated_delta_rule_chunked's contract, forward in Triton. chunk, dk and dv: powers of
    two >= 16 (tl.dot's smallest tile)."""
    check_delta_rule_args(q, k, v, g, beta, initial_state, int(chunk))
    check_float("gated_delta_rule", q=q, k=k, v=v, g=g, beta=beta)
    tensors = dict(q=q, k=k, v=v, g=g, beta=beta) | ({} if initial_state is None else {"initial_state": initial_state})
    check_device("gated_delta_rule", **tensors)
    for name, n in (("chunk size", chunk), ("dk", k.shape[-1]), ("dv", v.shape[-1])):
        if not _is_pow2_at_least_16(n):
            raise ValueError(f"gated_delta_rule (triton): {name} is {n}; the kernel needs a power of two >= 16 "
                             "(use backend='torch' for other sizes)")
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    o, S = GatedDeltaRuleTriton.apply(q, k, v, g, beta, initial_state, scale, int(chunk))
    return o, (S if output_final_state else None)


def compile_specs() -> list:
    """The GPU compilations of tests/test_kernels_compile.py (kernels/compile_spec.py): Qwen3.5's heads
    (dk = dv = 128, BV = 64, chunk 64) in bf16 on sm_80 and sm_90, where the launcher's dots are 3xTF32;
    the smallest tiles (16) in fp32 with plain fp32 dots on every target (Turing's path: at 128 its FMA
    dots unroll into a kernel that takes the compiler many minutes)."""
    from lora_engine.kernels.compile_spec import TARGETS, CompileSpec, signature

    types = dict(T="i32", H="i32", scale="fp32", s0_ptr="*fp32", states_ptr="*fp32", g_ptr="*fp32",
                 beta_ptr="*fp32")
    specs = []
    for dtype, d, targets, precision in (("bf16", 128, (80, 90), "tf32x3"), ("fp32", 16, TARGETS, "ieee")):
        for has_s0 in (False, True):
            const = dict(DK=d, DV=d, C=min(64, d), BV=_tiles(d), HAS_S0=has_s0, PRECISION=precision)
            specs.append(CompileSpec(f"_gdr_fwd/{dtype}/d{d}/s0={has_s0}", _gdr_fwd,
                                     signature(_gdr_fwd, dtype, **types), const, targets, {"num_warps": 4}))
    return specs

