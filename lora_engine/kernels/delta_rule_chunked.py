"""The gated delta rule in chunks of C tokens, forward and backward, in fp32 PyTorch (the CPU path).

The recurrence (kernels/delta_rule_reference.py, per head, state S (dk, dv)):

    S_t = exp(g_t) S_{t-1} + k_t u_t^T,   u_t = beta_t (v_t - exp(g_t) S_{t-1}^T k_t),   o_t = scale S_t^T q_t

Within a chunk starting from state S0, with G_i = g_0 + ... + g_i (the log decay since the chunk's
start) and D_ij = exp(G_i - G_j) for j <= i (0 above the diagonal), unrolling gives

    S_i = exp(G_i) S0 + sum_{j<=i} D_ij k_j u_j^T
    u_i + beta_i sum_{j<i} D_ij (k_i . k_j) u_j = beta_i v_i - beta_i exp(G_i) S0^T k_i

so with the strictly lower A = (beta k k^T) * D and T = (I + A)^-1 (the WY / UT representation; T
applied by forward substitution, torch.linalg.solve_triangular with a unit diagonal):

    Uh = T (beta v),  W = T (beta exp(G) k)         u = Uh - W S0                  (C, dv)
    o  = scale exp(G) q S0 + P u,  P = scale (q k^T) * D (diagonal included)       (C, dv)
    S1 = exp(G_last) S0 + Kd^T u,  Kd = k * exp(G_last - G)                        (dk, dv)

Everything but the three lines with S0 is independent across chunks and computed for all chunks at
once (`_intra`, batched GEMMs); only the state walks chunk by chunk. A sequence that is not a
multiple of C is padded with k = v = q = 0, g = 0, beta = 0: a padded token neither decays nor
writes the state, so the final state is exact. Inputs of any float dtype are upcast to fp32 per
call; o is returned in v's dtype, the final state in fp32.

Backward (GatedDeltaRuleChunked), by hand for the walk between chunks and by autograd for `_intra`.
With dO and dS1 of a chunk (dS1 from the chunk after it, or the final state's gradient):

    du  = P^T dO + Kd dS1
    dS0 = scale (exp(G) q)^T dO + exp(G_last) dS1 - W^T du
    dUh = du,  dW = -du S0^T,  dP = dO u^T,  dKd = u dS1^T,  d exp(G) q = scale dO S0^T,
    d exp(G_last) = <S0, dS1>

walked from the last chunk to the first, with S0 of each chunk the state saved at the chunk
boundaries in forward (B, H, N + 1, dk, dv) fp32: memory O(S / C * dk * dv) on top of the O(S)
inputs, never the (T, dk, dv) states of every token. `_intra` is recomputed in backward (O(S C)
for the (C, C) blocks) and differentiated by one autograd.grad call against the gradients of its
outputs collected by the walk.

Both passes are torch.library custom ops (lora_engine::gated_delta_rule_fwd_chunked / _bwd_chunked)
with fake implementations, so FakeTensorMode and torch.compile see their shapes without running them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 64


def check_delta_rule_args(q, k, v, g, beta, initial_state, chunk: int) -> None:
    """ValueError naming the tensor and the numbers when the arguments do not fit together."""
    if k.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"gated_delta_rule: q and k must be (B, T, H, dk) alike, got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)} (repeat grouped key heads to H first)")
    B, T, H, dk = k.shape
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"gated_delta_rule: v must be (B, T, H, dv) = ({B}, {T}, {H}, dv), got {tuple(v.shape)}")
    for name, t in (("g", g), ("beta", beta)):
        if t.shape != k.shape[:3]:
            raise ValueError(f"gated_delta_rule: {name} must be (B, T, H) = {tuple(k.shape[:3])}, "
                             f"got {tuple(t.shape)}")
    want = (B, H, dk, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != want:
        raise ValueError(f"gated_delta_rule: initial_state must be (B, H, dk, dv) = {want}, "
                         f"got {tuple(initial_state.shape)}")
    if chunk < 1:
        raise ValueError(f"gated_delta_rule: chunk size must be >= 1, got {chunk}")


def _chunks(x: torch.Tensor, T: int, C: int) -> torch.Tensor:
    """(B, T, H, ...) any dtype -> (B, H, N, C, ...) fp32, zero-padded to N * C tokens."""
    x = x.transpose(1, 2).to(torch.float32)
    pad = (-T) % C
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(*x.shape[:2], -1, C, *x.shape[3:])


def _intra(q, k, v, g, beta, scale: float, C: int):
    """The chunk-parallel part, from (B, T, H, ...) inputs: (Qg (B, H, N, C, dk) = scale exp(G) q,
    P (.., C, C), Uh (.., C, dv), W (.., C, dk), Kd (.., C, dk), eL (B, H, N) = exp(G_last)), fp32."""
    T = q.shape[1]
    q, k, v = (_chunks(t, T, C) for t in (q, k, v))
    g, beta = (_chunks(t, T, C) for t in (g, beta))  # (B, H, N, C)
    G = g.cumsum(-1)
    lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # exp only below the diagonal: G_i - G_j for j > i is positive and may overflow.
    D = (G[..., :, None] - G[..., None, :]).masked_fill(~lower, float("-inf")).exp()  # (B, H, N, C, C)
    A = (k @ k.transpose(-1, -2)) * D * beta[..., None]
    A = A.tril(-1)
    eG = G.exp()
    rhs = torch.cat([v * beta[..., None], k * (beta * eG)[..., None]], dim=-1)
    eye = torch.eye(C, dtype=A.dtype, device=A.device)
    sol = torch.linalg.solve_triangular(A + eye, rhs, upper=False, unitriangular=True)
    Uh, W = sol.split([v.shape[-1], k.shape[-1]], dim=-1)
    P = (q @ k.transpose(-1, -2)) * D * scale
    Qg = q * (eG * scale)[..., None]
    eL = eG[..., -1]
    Kd = k * (G[..., -1:] - G).exp()[..., None]
    return Qg, P, Uh, W, Kd, eL


def _walk(Qg, P, Uh, W, Kd, eL, S):
    """The state from chunk to chunk: (o (B, H, N, C, dv), boundary states (B, H, N + 1, dk, dv))."""
    N = Qg.shape[2]
    states = Qg.new_empty((*S.shape[:2], N + 1, *S.shape[2:]))
    o = Uh.new_empty(Uh.shape)
    for n in range(N):
        states[:, :, n] = S
        u = Uh[:, :, n] - W[:, :, n] @ S
        o[:, :, n] = Qg[:, :, n] @ S + P[:, :, n] @ u
        S = eL[:, :, n, None, None] * S + Kd[:, :, n].transpose(-1, -2) @ u
    states[:, :, N] = S
    return o, states


def _unchunk(o: torch.Tensor, T: int) -> torch.Tensor:
    """(B, H, N, C, dv) -> (B, T, H, dv)."""
    B, H = o.shape[:2]
    return o.reshape(B, H, -1, o.shape[-1])[:, :, :T].transpose(1, 2)


def _initial(k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None) -> torch.Tensor:
    B, _, H, dk = k.shape
    if initial_state is None:
        return k.new_zeros((B, H, dk, v.shape[-1]), dtype=torch.float32)
    return initial_state.to(torch.float32)


@torch.library.custom_op("lora_engine::gated_delta_rule_fwd_chunked", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
            initial_state: torch.Tensor | None, scale: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(o (B, T, H, dv) in v's dtype, boundary states (B, H, N + 1, dk, dv) fp32)."""
    with torch.no_grad():
        parts = _intra(q, k, v, g, beta, scale, chunk)
        o, states = _walk(*parts, _initial(k, v, initial_state))
    return _unchunk(o, q.shape[1]).to(v.dtype).contiguous(), states


@_fwd_op.register_fake
def _fwd_fake(q, k, v, g, beta, initial_state, scale, chunk):
    B, T, H, dk = k.shape
    N = -(-T // chunk)
    return v.new_empty(v.shape), k.new_empty((B, H, N + 1, dk, v.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("lora_engine::gated_delta_rule_bwd_chunked", mutates_args=())
def _bwd_op(dO: torch.Tensor, dS_final: torch.Tensor, Qg: torch.Tensor, P: torch.Tensor, Uh: torch.Tensor,
            W: torch.Tensor, Kd: torch.Tensor, eL: torch.Tensor, states: torch.Tensor) -> list[torch.Tensor]:
    """The walk backward, last chunk first (module docstring): dO (B, H, N, C, dv) fp32 and the
    gradient of the final state -> [dQg, dP, dUh, dW, dKd, deL, d initial state], all fp32."""
    grads = [torch.empty_like(p) for p in (Qg, P, Uh, W, Kd, eL)]
    dQg, dP, dUh, dW, dKd, deL = grads
    dS = dS_final.to(torch.float32).clone()
    for n in reversed(range(Qg.shape[2])):
        S0 = states[:, :, n]
        u = Uh[:, :, n] - W[:, :, n] @ S0
        dOn = dO[:, :, n]
        du = P[:, :, n].transpose(-1, -2) @ dOn + Kd[:, :, n] @ dS
        dQg[:, :, n] = dOn @ S0.transpose(-1, -2)
        dP[:, :, n] = dOn @ u.transpose(-1, -2)
        dUh[:, :, n] = du
        dW[:, :, n] = -du @ S0.transpose(-1, -2)
        dKd[:, :, n] = u @ dS.transpose(-1, -2)
        deL[:, :, n] = (S0 * dS).sum((-1, -2))
        dS = Qg[:, :, n].transpose(-1, -2) @ dOn + eL[:, :, n, None, None] * dS - W[:, :, n].transpose(-1, -2) @ du
    return [*grads, dS]


@_bwd_op.register_fake
def _bwd_fake(dO, dS_final, Qg, P, Uh, W, Kd, eL, states):
    return [*(p.new_empty(p.shape) for p in (Qg, P, Uh, W, Kd, eL)), dS_final.new_empty(dS_final.shape,
                                                                                           dtype=torch.float32)]


class GatedDeltaRuleChunked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale, chunk):
        o, states = _fwd_op(q, k, v, g, beta, initial_state, scale, chunk)
        ctx.save_for_backward(q, k, v, g, beta, states)
        ctx.scale, ctx.chunk = scale, chunk
        ctx.state_dtype = None if initial_state is None else initial_state.dtype
        return o, states[:, :, -1]

    @staticmethod
    def backward(ctx, do, dS_final):
        q, k, v, g, beta, states = ctx.saved_tensors
        B, T, H, dv = v.shape
        ins = [t.detach().requires_grad_(True) for t in (q, k, v, g, beta)]
        with torch.enable_grad():  # _intra recomputed: O(S C), not kept from forward
            parts = _intra(*ins, ctx.scale, ctx.chunk)
        dO = (torch.zeros(parts[2].shape, dtype=torch.float32, device=v.device) if do is None
              else _chunks(do, T, ctx.chunk))
        if dS_final is None:
            dS_final = torch.zeros(states.shape[:2] + states.shape[3:], dtype=torch.float32, device=v.device)
        *grads, dS0 = _bwd_op(dO.contiguous(), dS_final, *(p.detach() for p in parts), states)
        dq, dk, dv, dg, dbeta = torch.autograd.grad(parts, ins, grads)
        d_init = None if ctx.state_dtype is None else dS0.to(ctx.state_dtype)
        return dq, dk, dv, dg, dbeta, d_init, None, None


def gated_delta_rule_chunked(q, k, v, g, beta, scale: float | None = None, initial_state=None,
                             output_final_state: bool = False, chunk: int = DEFAULT_CHUNK):
    """kernels/delta_rule_reference.py:gated_delta_rule_recurrent's contract, chunked:
    q, k (B, T, H, dk), v (B, T, H, dv), g and beta (B, T, H), initial_state (B, H, dk, dv) or None ->
    (o (B, T, H, dv) in v's dtype, final state (B, H, dk, dv) fp32 or None). Differentiable in all
    tensor inputs, with O(T / chunk) saved states (module docstring)."""
    check_delta_rule_args(q, k, v, g, beta, initial_state, int(chunk))
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    o, S = GatedDeltaRuleChunked.apply(q, k, v, g, beta, initial_state, scale, int(chunk))
    return o, (S if output_final_state else None)
