"""The chunked gated delta rule in Triton, forward and backward.

The math is kernels/delta_rule_chunked.py's (its docstring derives it): per chunk of C tokens, with
G the cumulative log decay, D_ij = exp(G_i - G_j) (j <= i), A = strictly-lower (beta k k^T) * D,
X = (I + A)^-1, Uh = X (beta v), W = X (beta exp(G) k):

    u = Uh - W S0,   o = scale exp(G) q S0 + (scale q k^T * D) u,   S1 = exp(G_last) S0 + (k exp(G_last - G))^T u

Forward (_gdr_fwd): one program per (batch, head, block of BV value columns) walks the chunks in order
with its (dk, BV) slice of the state in registers (fp32); the value columns of the state never mix, so
the slices are independent, and W, X and the (C, C) blocks, which depend on q, k, g and beta only, are
recomputed by each slice (_chunk_prep). X comes from forward substitution on the rows of A (row i of
X = e_i - A[i, :] X, the rows above i already done), C steps of (C, C) work per chunk. Each program
also writes the state at every chunk boundary, (B, H, N + 1, dk, dv) fp32, which is what the backward needs.

Backward, two kernels. With dO the output's gradient and dS1 the gradient of a chunk's end state:

    du  = P^T dO + Kd dS1,   dS0 = Qg^T dO + exp(G_last) dS1 - W^T du       (P = scale q k^T * D, Qg = scale
                                                                              exp(G) q, Kd = k exp(G_last - G))
_gdr_bwd_dstate walks the chunks last to first, per (batch, head, value block) as the forward (the
columns of dS never mix either), and writes dS at every chunk boundary (B, H, N + 1, dk, dv) fp32; it
needs no state, only the recomputed P, Kd, Qg, W. _gdr_bwd_chunk then takes every chunk at once, one
program per (batch, head, chunk), with S0 and dS1 from the two boundary arrays, and differentiates the
chunk's own algebra by hand, summing over value blocks of BV columns:

    dQg = dO S0^T,  dP = dO u^T,  dKd = u dS1^T,  dW = -du S0^T,  d exp(G_last) = <S0, dS1>
    d(beta v) = X^T du,  dX = du (beta v)^T + dW (beta exp(G) k)^T,  dA = -X^T dX X^T (strictly lower)

then through A, P, Qg, Kd and W to q, k, beta and G (D_ij contributes to G_i and -G_j), and dg = the
reverse cumulative sum of dG. d initial state is dS at boundary 0. Both passes recompute the (C, C)
blocks from q, k, g, beta: memory stays the inputs plus the O(S / C) boundary states.

Layout: q, k (B, T, H, dk), v and o (B, T, H, dv), g, beta (B, T, H), contiguous; tokens past T are
masked to k = q = v = 0, g = 0, beta = 0 (no decay, no write), as the PyTorch path pads them. tl.dot
needs C, dk and BV of at least 16 and powers of two: dk and dv must be powers of two >= 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_engine.kernels._common import check_device, check_float, kernel_op, launch_device
from lora_engine.kernels.delta_rule_chunked import check_delta_rule_args


@triton.jit
def _chunk_prep(k, g, beta, C: tl.constexpr, PRECISION: tl.constexpr):
    """The chunk's q-free blocks from k (C, dk), g, beta (C,) fp32: (G (C,), G_last, D (C, C) lower with its
    diagonal, KK = k k^T (C, C), X = (I + A)^-1 (C, C) lower)."""
    ci = tl.arange(0, C)
    G = tl.cumsum(g, 0)
    G_last = tl.sum(tl.where(ci == C - 1, G, 0.0), 0)
    # exp only on and below the diagonal, where G_i - G_j <= 0 (above it may overflow).
    D = tl.exp(tl.where(ci[:, None] >= ci[None, :], G[:, None] - G[None, :], float("-inf")))
    KK = tl.dot(k, tl.trans(k), input_precision=PRECISION)
    A = tl.where(ci[:, None] > ci[None, :], KK * D * beta[:, None], 0.0)
    X = tl.zeros((C, C), dtype=tl.float32)
    for i in range(C):  # forward substitution, row i of (I + A)^-1 from the rows above it
        a_i = tl.sum(tl.where(ci[:, None] == i, A, 0.0), 0)  # (C,) row i of A
        x_i = tl.where(ci == i, 1.0, 0.0) - tl.sum(a_i[:, None] * X, 0)
        X = tl.where(ci[:, None] == i, x_i[None, :], X)
    return G, G_last, D, KK, X


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
        G, G_last, D, KK, X = _chunk_prep(k, g, beta, C, PRECISION)
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


@triton.jit
def _gdr_bwd_dstate(q_ptr, k_ptr, g_ptr, beta_ptr, do_ptr, dsT_ptr, dstates_ptr, T, H, scale,
                    DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """dS at every chunk boundary (B, H, N + 1, dk, dv) fp32, from dS_T = dsT (B, H, dk, dv), last chunk first."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    col0 = tl.program_id(1) * BV
    n_chunks = tl.cdiv(T, C)
    ci = tl.arange(0, C)
    ki = tl.arange(0, DK)
    vi = col0 + tl.arange(0, BV)
    state_off = bh.to(tl.int64) * (n_chunks + 1) * DK * DV + ki[:, None] * DV + vi[None, :]
    dS = tl.load(dsT_ptr + bh.to(tl.int64) * DK * DV + ki[:, None] * DV + vi[None, :]).to(tl.float32)
    tl.store(dstates_ptr + state_off + n_chunks * DK * DV, dS)
    for m in range(n_chunks):
        n = n_chunks - 1 - m
        t = n * C + ci
        valid = t < T
        row = (b.to(tl.int64) * T + t) * H + h
        q = tl.load(q_ptr + row[:, None] * DK + ki[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        k = tl.load(k_ptr + row[:, None] * DK + ki[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        dO = tl.load(do_ptr + row[:, None] * DV + vi[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        g = tl.load(g_ptr + row, mask=valid, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + row, mask=valid, other=0.0).to(tl.float32)
        G, G_last, D, KK, X = _chunk_prep(k, g, beta, C, PRECISION)
        eG = tl.exp(G)
        W = tl.dot(X, k * (beta * eG)[:, None], input_precision=PRECISION)
        P = tl.dot(q, tl.trans(k), input_precision=PRECISION) * D * scale
        du = tl.dot(tl.trans(P), dO, input_precision=PRECISION) \
            + tl.dot(k * tl.exp(G_last - G)[:, None], dS, input_precision=PRECISION)
        dS = tl.dot(tl.trans(q * (eG * scale)[:, None]), dO, input_precision=PRECISION) + tl.exp(G_last) * dS \
            - tl.dot(tl.trans(W), du, input_precision=PRECISION)
        tl.store(dstates_ptr + state_off + n * DK * DV, dS)


@triton.jit
def _gdr_bwd_chunk(q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, do_ptr, states_ptr, dstates_ptr,
                   dq_ptr, dk_ptr, dv_ptr, dg_ptr, dbeta_ptr, T, H, scale,
                   DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """dq, dk, dv, dg, dbeta of one chunk (program (batch * head, chunk)) from its S0 = states[n] and
    dS1 = dstates[n + 1] (module docstring)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    n = tl.program_id(1)
    n_chunks = tl.cdiv(T, C)
    ci = tl.arange(0, C)
    ki = tl.arange(0, DK)
    t = n * C + ci
    valid = t < T
    row = (b.to(tl.int64) * T + t) * H + h
    q = tl.load(q_ptr + row[:, None] * DK + ki[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    k = tl.load(k_ptr + row[:, None] * DK + ki[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    g = tl.load(g_ptr + row, mask=valid, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + row, mask=valid, other=0.0).to(tl.float32)
    G, G_last, D, KK, X = _chunk_prep(k, g, beta, C, PRECISION)
    eG = tl.exp(G)
    E = tl.exp(G_last - G)
    R2 = k * (beta * eG)[:, None]  # W = X R2
    W = tl.dot(X, R2, input_precision=PRECISION)
    QK = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    P = QK * D * scale
    dQg = tl.zeros((C, DK), dtype=tl.float32)
    dKd = tl.zeros((C, DK), dtype=tl.float32)
    dW = tl.zeros((C, DK), dtype=tl.float32)
    dP = tl.zeros((C, C), dtype=tl.float32)
    dX = tl.zeros((C, C), dtype=tl.float32)
    dbeta = tl.zeros((C,), dtype=tl.float32)
    deL = 0.0
    base = bh.to(tl.int64) * (n_chunks + 1) * DK * DV + n.to(tl.int64) * DK * DV
    for j in range(DV // BV):
        vi = j * BV + tl.arange(0, BV)
        v = tl.load(v_ptr + row[:, None] * DV + vi[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        dO = tl.load(do_ptr + row[:, None] * DV + vi[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        S0 = tl.load(states_ptr + base + ki[:, None] * DV + vi[None, :])
        dS1 = tl.load(dstates_ptr + base + DK * DV + ki[:, None] * DV + vi[None, :])
        R1 = v * beta[:, None]  # Uh = X R1
        u = tl.dot(X, R1, input_precision=PRECISION) - tl.dot(W, S0, input_precision=PRECISION)
        du = tl.dot(tl.trans(P), dO, input_precision=PRECISION) \
            + tl.dot(k * E[:, None], dS1, input_precision=PRECISION)
        dQg += tl.dot(dO, tl.trans(S0), input_precision=PRECISION)
        dP += tl.dot(dO, tl.trans(u), input_precision=PRECISION)
        dKd += tl.dot(u, tl.trans(dS1), input_precision=PRECISION)
        dW -= tl.dot(du, tl.trans(S0), input_precision=PRECISION)
        deL += tl.sum(tl.sum(S0 * dS1, 1), 0)
        dR1 = tl.dot(tl.trans(X), du, input_precision=PRECISION)
        dX += tl.dot(du, tl.trans(R1), input_precision=PRECISION)
        dbeta += tl.sum(dR1 * v, 1)
        tl.store(dv_ptr + row[:, None] * DV + vi[None, :], (dR1 * beta[:, None]).to(dv_ptr.dtype.element_ty),
                 mask=valid[:, None])
    # W = X R2, R2 = beta exp(G) k
    dX += tl.dot(dW, tl.trans(R2), input_precision=PRECISION)
    dR2 = tl.dot(tl.trans(X), dW, input_precision=PRECISION)
    dk = dR2 * (beta * eG)[:, None]
    dbeta += tl.sum(dR2 * k, 1) * eG
    deG = tl.sum(dR2 * k, 1) * beta
    # X = (I + A)^-1, A = strictly-lower beta_i KK_ij D_ij
    dA = -tl.dot(tl.trans(X), tl.dot(dX, tl.trans(X), input_precision=PRECISION), input_precision=PRECISION)
    dA = tl.where(ci[:, None] > ci[None, :], dA, 0.0)
    dKK = dA * D * beta[:, None]
    dk += tl.dot(dKK, k, input_precision=PRECISION) + tl.dot(tl.trans(dKK), k, input_precision=PRECISION)
    dbeta += tl.sum(dA * KK * D, 1)
    dD = dA * KK * beta[:, None]
    # P = scale QK * D (D is 0 above the diagonal)
    dQK = dP * D * scale
    dq = tl.dot(dQK, k, input_precision=PRECISION)
    dk += tl.dot(tl.trans(dQK), q, input_precision=PRECISION)
    dD += dP * QK * scale
    # Qg = scale exp(G) q, Kd = k exp(G_last - G), exp(G_last)
    dq += dQg * (eG * scale)[:, None]
    deG += tl.sum(dQg * q, 1) * scale
    dk += dKd * E[:, None]
    dE = tl.sum(dKd * k, 1) * E
    dG_last = tl.sum(dE, 0) + deL * tl.exp(G_last)
    # D_ij = exp(G_i - G_j): + to G_i, - to G_j
    M = tl.where(ci[:, None] >= ci[None, :], dD * D, 0.0)
    dG = tl.sum(M, 1) - tl.sum(M, 0) + deG * eG - dE + tl.where(ci == C - 1, dG_last, 0.0)
    dg = tl.sum(tl.where(ci[None, :] >= ci[:, None], dG[None, :], 0.0), 1)  # G = cumsum(g): reverse cumsum
    tl.store(dq_ptr + row[:, None] * DK + ki[None, :], dq.to(dq_ptr.dtype.element_ty), mask=valid[:, None])
    tl.store(dk_ptr + row[:, None] * DK + ki[None, :], dk.to(dk_ptr.dtype.element_ty), mask=valid[:, None])
    tl.store(dg_ptr + row, dg.to(dg_ptr.dtype.element_ty), mask=valid)
    tl.store(dbeta_ptr + row, dbeta.to(dbeta_ptr.dtype.element_ty), mask=valid)


def _precision(device: torch.device) -> str:
    """tl.dot's fp32 mode: three TF32 products (fp32-accurate, on tensor cores) from Ampere on; plain fp32
    FMAs before it (Turing has no TF32) and in the interpreter, which ignores the mode."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "tf32x3"
    return "ieee"


def _tiles(dv: int) -> int:
    """BV: value columns per program (a (dk, BV) fp32 state slice in registers)."""
    return min(dv, 64)


def _bwd_tiles(dv: int) -> int:
    """BV of _gdr_bwd_chunk: it also holds (C, dk) and (C, C) fp32 gradient accumulators, and at BV = 64 with
    dk = 128 its dots' staging passes sm_90's shared memory."""
    return min(dv, 32)


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


def _bwd_fake(do, dS_final, q, k, v, g, beta, states, scale, chunk):
    return (*(t.new_empty(t.shape) for t in (q, k, v, g, beta)),
            states.new_empty(states.shape[:2] + states.shape[3:]))


@kernel_op("gated_delta_rule_bwd_triton", _bwd_fake)
def _bwd_op(do: torch.Tensor, dS_final: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            g: torch.Tensor, beta: torch.Tensor, states: torch.Tensor, scale: float,
            chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dg, dbeta in their inputs' dtypes, d initial state (B, H, dk, dv) fp32) from the output's
    gradient do (B, T, H, dv), the final state's dS_final (B, H, dk, dv) and the forward's boundary states."""
    B, T, H, dk = k.shape
    dv = v.shape[-1]
    do, dS_final = do.contiguous(), dS_final.to(torch.float32).contiguous()
    N = states.shape[2] - 1
    dstates = torch.empty_like(states)
    grads = [torch.empty_like(t) for t in (q, k, v, g, beta)]
    BV, prec = _tiles(dv), _precision(v.device)
    with launch_device(v):
        _gdr_bwd_dstate[(B * H, dv // BV)](q, k, g, beta, do, dS_final, dstates, T, H, scale,
                                           DK=dk, DV=dv, C=chunk, BV=BV, PRECISION=prec)
        _gdr_bwd_chunk[(B * H, N)](q, k, v, g, beta, do, states, dstates, *grads, T, H, scale,
                                   DK=dk, DV=dv, C=chunk, BV=_bwd_tiles(dv), PRECISION=prec)
    return (*grads, dstates[:, :, 0].contiguous())


class GatedDeltaRuleTriton(torch.autograd.Function):
    """Both ways in Triton (module docstring); saves the inputs and the O(T / C) boundary states."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, chunk):
        q, k, v, g, beta = (t.contiguous() for t in (q, k, v, g, beta))
        o, states = _fwd_op(q, k, v, g, beta, initial_state, scale, chunk)
        ctx.save_for_backward(q, k, v, g, beta, states)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return o, states[:, :, -1]

    @staticmethod
    def backward(ctx, do, dS_final):
        q, k, v, g, beta, states = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(v)
        if dS_final is None:
            dS_final = torch.zeros(states.shape[:2] + states.shape[3:], dtype=torch.float32, device=v.device)
        dq, dk, dv, dg, dbeta, dS0 = _bwd_op(do, dS_final, q, k, v, g, beta, states, ctx.scale, ctx.chunk)
        d_init = None if ctx.state_dtype is None else dS0.to(ctx.state_dtype)
        return dq, dk, dv, dg, dbeta, d_init, None, None


def _is_pow2_at_least_16(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk=64):
    """delta_rule_chunked.gated_delta_rule_chunked's contract, forward and backward in Triton. chunk, dk and dv:
    powers of two >= 16 (tl.dot's smallest tile)."""
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
    (dk = dv = 128, BV = 64, chunk 64) in bf16 on sm_80 and sm_90, where the launchers' dots are 3xTF32;
    the smallest tiles (16) in fp32 with plain fp32 dots on every target (Turing's path: at 128 its FMA
    dots unroll into a kernel that takes the compiler many minutes). Forward and both backward kernels."""
    from lora_engine.kernels.compile_spec import TARGETS, CompileSpec, signature

    fp32 = dict(T="i32", H="i32", scale="fp32", g_ptr="*fp32", beta_ptr="*fp32")
    specs = []
    for dtype, d, targets, precision in (("bf16", 128, (80, 90), "tf32x3"), ("fp32", 16, TARGETS, "ieee")):
        const = dict(DK=d, DV=d, C=min(64, d), BV=_tiles(d), PRECISION=precision)
        opts = {"num_warps": 4}
        for has_s0 in (False, True):
            types = fp32 | dict(s0_ptr="*fp32", states_ptr="*fp32")
            specs.append(CompileSpec(f"_gdr_fwd/{dtype}/d{d}/s0={has_s0}", _gdr_fwd,
                                     signature(_gdr_fwd, dtype, **types), const | {"HAS_S0": has_s0}, targets, opts))
        types = fp32 | dict(dsT_ptr="*fp32", dstates_ptr="*fp32")
        specs.append(CompileSpec(f"_gdr_bwd_dstate/{dtype}/d{d}", _gdr_bwd_dstate,
                                 signature(_gdr_bwd_dstate, dtype, **types), const, targets, opts))
        types = fp32 | dict(states_ptr="*fp32", dstates_ptr="*fp32", dg_ptr="*fp32", dbeta_ptr="*fp32")
        specs.append(CompileSpec(f"_gdr_bwd_chunk/{dtype}/d{d}", _gdr_bwd_chunk,
                                 signature(_gdr_bwd_chunk, dtype, **types), const | {"BV": _bwd_tiles(d)}, targets,
                                 opts))
    return specs
