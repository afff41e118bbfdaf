"""The mixture-of-experts MLP of Qwen3-MoE, Mixtral and OLMoE: an option of the one decoder.

A layer's `mlp` is a MoEBlock with transformers v5's names, so checkpoint keys map one to one:

  mlp.gate.weight                (E, D)      the router: logits = x W^T, softmax in fp32, top-k,
                                             renormalised over the k when the family does (norm_topk_prob)
  mlp.experts.gate_up_proj       (E, 2F, D)  expert e's gate rows [0, F), up rows [F, 2F)
  mlp.experts.down_proj          (E, D, F)

Tokens are grouped by expert (kernels/moe_reference.sort_by_expert), each expert's block goes through
its SwiGLU MLP (every expert matmul through `_grouped`, the one place a faster kernel plugs in), and the
outputs are weighted back onto their tokens (combine). Qwen3.5-MoE adds a shared expert (SharedExpertMoE).
Expert LoRA (lora/) swaps `Experts` for a subclass whose `factors` returns per-expert A_e, B_e; the model
itself holds none.

Checkpoints: hub checkpoints and transformers 5's save_pretrained store each expert as 2-D weights
(`mlp.experts.3.gate_proj.weight`; Mixtral: `block_sparse_moe.experts.3.w1.weight`, w1 gate, w3 up,
w2 down, and `block_sparse_moe.gate.weight`). `checkpoint_views` maps those names onto views of the
3-D parameters, for the loader (read straight into them) and for export (the layout written).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_engine import dispatch
from lora_engine.kernels import moe_reference


def _grouped(x, counts, w, bias=None, a=None, b=None, scale=1.0, backend=None):
    """Every expert matmul: x (M, K) grouped by expert (counts (E,)), w (E, N, K) -> (M, N): the per-expert
    GEMMs on CPU, the grouped Triton GEMM with the LoRA shrink fused on CUDA (dispatch.moe_grouped_mm)."""
    return dispatch.moe_grouped_mm(x, counts, w, bias, a, b, scale, backend=backend)


class Experts(nn.Module):
    """E SwiGLU MLPs as 3-D parameters (transformers v5's Qwen3MoeExperts / MixtralExperts / OlmoeExperts)."""

    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inner))
        self.backend: str | None = None

    def factors(self, name: str):
        """(a, b, scale) of the LoRA on parameter `name`, or (None, None, 1.0): none in the model."""
        return None, None, 1.0

    def grouped_weight(self, name: str) -> torch.Tensor:
        """Parameter `name` as the grouped op takes it, (E, N, K) (gpt-oss stores (E, K, N): a view)."""
        return getattr(self, name)

    def forward(self, x, counts):
        # x (M, D) grouped by expert -> (M, D)
        be = self.backend
        gate, up = _grouped(x, counts, self.gate_up_proj, None, *self.factors("gate_up_proj"), be).chunk(2, dim=-1)
        return _grouped(F.silu(gate) * up, counts, self.down_proj, None, *self.factors("down_proj"), be)


class MoEBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.top_k = cfg.experts_per_token
        self.norm_topk_prob = cfg.norm_topk_prob
        self.chunk_size = 0  # CausalLM.mlp_chunk_size sets it on every layer's MLP; refused here (see forward)
        self.router_logits: torch.Tensor | None = None  # (B*T, E) of the last forward, for the auxiliary loss

    def route(self, flat):
        """The family's router on tokens flat (N, D): (logits (N, E), weights (N, k) in the logits' dtype,
        experts (N, k)). Here softmax in fp32, top-k, renormalised over the k when the family does."""
        logits = self.gate(flat)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(logits.dtype), experts

    def group(self, experts, num_experts: int):
        """(order, counts): the (token, slot) assignments grouped by expert (kernels/moe_reference.py)."""
        return moe_reference.sort_by_expert(experts, num_experts)

    def forward(self, x):
        if self.chunk_size:
            raise ValueError("mlp_chunk_size: chunking the MLP is not supported for mixture-of-experts layers; "
                             "set it to 0")
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        logits, weights, experts = self.route(flat)
        if self.router_logits is None:
            # The forward's own logits (the decoder clears them first: forget_router_logits). A checkpoint's
            # recomputation in backward must not replace them: their graph would keep every tensor the
            # recomputed layer saved alive until the next forward, one layer's attention and MoE per layer.
            self.router_logits = logits
        order, counts = self.group(experts, logits.shape[-1])
        y = self.experts(flat[order // self.top_k], counts)  # (N*k, D), rows grouped by expert
        return moe_reference.combine(y, order, weights).view(B, T, D)


class SharedExpertMoE(MoEBlock):
    """Qwen3.5-MoE's block: the routed experts plus a dense SwiGLU MLP every token passes through
    (`mlp.shared_expert.{gate,up,down}_proj`), scaled by sigmoid(x w) with w `mlp.shared_expert_gate` (1, D)."""

    def __init__(self, cfg, shared_expert: nn.Module):
        super().__init__(cfg)
        self.shared_expert = shared_expert  # the decoder's MLP (intermediate_size), so LoRA and kernels see it
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x):
        return super().forward(x) + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


def forget_router_logits(model: nn.Module) -> None:
    """Clear every MoE block's router logits: a new forward records its own (MoEBlock.forward)."""
    for m in model.modules():
        if isinstance(m, MoEBlock):
            m.router_logits = None


def aux_loss(logits: list[torch.Tensor], top_k: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """transformers' load_balancing_loss_func (Switch Transformer eqs. 4-6) over the MoE layers' router
    logits (each (B*T, E)): E * sum_e (share of top-k slots sent to e) * (mean router probability of e),
    both averaged over the tokens (the real ones only, with attention_mask (B, T)), pooled over layers."""
    E = logits[0].shape[-1]
    count = torch.zeros(E, dtype=torch.float32, device=logits[0].device)
    prob = torch.zeros_like(count)
    mask = None if attention_mask is None else attention_mask.reshape(-1).float()
    for lg in logits:
        p = torch.softmax(lg.float(), dim=-1)
        chosen = torch.topk(p, top_k, dim=-1).indices.reshape(-1)
        slot_w = torch.ones_like(chosen, dtype=torch.float32) if mask is None else mask.repeat_interleave(top_k)
        count = count + torch.zeros_like(count).scatter_add_(0, chosen, slot_w)
        prob = prob + (p if mask is None else p * mask[:, None]).sum(0)
    rows = len(logits) * (logits[0].shape[0] if mask is None else mask.sum())
    return E * torch.sum((count / rows) * (prob / rows))


def weighted_aux_loss(model, attention_mask, target: torch.Tensor, reduction: str) -> torch.Tensor:
    """router_aux_loss_coef * the aux loss of `model`'s last forward, over the real tokens of attention_mask
    as transformers counts them; times the counted tokens for reduction "sum", so a loop that divides the
    sum by the accumulated batch's token count adds the token-weighted mean."""
    logits = [m.router_logits for m in model.modules() if isinstance(m, MoEBlock) and m.router_logits is not None]
    aux = model.aux_loss if attention_mask is None else aux_loss(logits, model.config.experts_per_token,
                                                                 attention_mask)
    aux = model.config.router_aux_loss_coef * aux
    return aux * (target != -100).sum() if reduction == "sum" else aux


# ---- checkpoint key maps ----------------------------------------------------------------------------
_HUB = {  # family -> (the MLP's stored prefix, the gate, up and down names of an expert's 2-D weights)
    "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "olmoe": ("mlp", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
    **dict.fromkeys(("qwen3_5_moe_text", "qwen3_5_moe"), ("mlp", "gate_proj", "up_proj", "down_proj")),
}


def checkpoint_views(model_type: str, state: dict, stored: set | None = None) -> dict:
    """`state` (a state dict) with each MoE layer's entries renamed to the per-expert 2-D layout of hub
    checkpoints and save_pretrained (module `_HUB`): the 3-D parameters replaced by views of their
    slices, so reading into the views fills the parameters and writing them writes the slices. With
    `stored` (a checkpoint's keys), a layer whose 3-D key the checkpoint holds keeps transformers v5's
    in-memory names instead (a folder written from a v5 state dict)."""
    if model_type not in _HUB:
        return state
    prefix, g, u, d = _HUB[model_type]
    out = {}
    for name, t in state.items():
        layer, dot, leaf = name.partition(".mlp.")
        if not dot or not name.startswith("model.layers.") or (stored is not None and name in stored):
            out[name] = t
        elif leaf == "gate.weight":
            out[f"{layer}.{prefix}.gate.weight"] = t
        elif leaf in ("experts.gate_up_proj", "experts.down_proj"):
            data = t.data
            for e in range(data.shape[0]):
                base = f"{layer}.{prefix}.experts.{e}."
                if leaf == "experts.down_proj":
                    out[base + f"{d}.weight"] = data[e]
                else:
                    half = data.shape[1] // 2
                    out[base + f"{g}.weight"], out[base + f"{u}.weight"] = data[e, :half], data[e, half:]
        else:
            out[name] = t
    return out
