"""Qwen3.5's hybrid decoder layers: Gated DeltaNet (linear attention) beside gated full attention.

The family qwen3_5_text (Qwen3_5ForCausalLM) is the one decoder (models/decoder.py) with these options,
read from config.json by `hybrid_fields`:

  layer_types   per layer "linear_attention" (GatedDeltaNet below) or "full_attention" (GatedAttention);
                default every full_attention_interval-th (4th) layer full, as transformers derives it
  linear_*      the DeltaNet sizes: key/value heads and head dims, the conv kernel width
  partial RoPE  rotary on the first head_dim * partial_rotary_factor dims of each head only
  output gate   q_proj gives each head's query and a gate; the attention output times sigmoid(gate)
  norms         (1 + w) RMSNorm in fp32 everywhere (norm_style "gemma"), q/k norms per head; the
                DeltaNet's output norm is w * x_hat times silu(z) (GatedRMSNorm)

The multimodal config (model_type qwen3_5, Qwen3_5ForConditionalGeneration: the released checkpoints)
loads as its text model: config.json's text_config, the checkpoint's model.language_model.* tensors as
our model.* (`checkpoint_name`). The vision tower (model.visual.*) is not trained: its tensors, like the
multi-token-prediction heads (mtp.*, kept by every Qwen3.5 checkpoint for speculative decoding), are
carried through load and save untouched (`carry`), byte for byte, so an exported folder is again the full
checkpoint.

Qwen3.5-MoE (qwen3_5_moe_text, Qwen3_5MoeForCausalLM; qwen3_5_moe, its multimodal checkpoint read the same
way) is the same schedule with every MLP a mixture of experts plus a shared expert (models/moe.py
SharedExpertMoE); its config.json has no dense intermediate_size, so the shared expert's
(shared_expert_intermediate_size) stands in for it (`shared_expert_config`).

Gated DeltaNet, per token t (the shapes: B batch, T length, Hk key heads, Hv value heads, dk, dv):
  qkv = silu(causal depthwise conv1d(in_proj_qkv(x)))     (B, T, 2 Hk dk + Hv dv), kernel K, left padded
  q, k = l2norm(q), l2norm(k); each key head serves Hv / Hk consecutive value heads
  beta = sigmoid(in_proj_b(x)); g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)       (B, T, Hv)
  o = gated delta rule(q, k, v, g, beta)                    (kernels/delta_rule_reference.py has the math)
  out_proj(GatedRMSNorm(o, in_proj_z(x)))
Padding positions (attention_mask 0) enter the layer as zeros, as transformers does: with zero inputs
the conv output is zero, k is zero and the state is only decayed, so left padding leaves it untouched.

The two recurrent ops each go through one function here (`_causal_conv1d`, `_delta_rule`), so a faster
kernel replaces the plain PyTorch one in one line; until then the delta rule is the token-by-token fp32
recurrence, exact but slow at long context.

Not yet: packed rows (segment_ids; refused, the state would cross documents). Adapters of the multimodal
checkpoint use PEFT's names on it, model.language_model.layers.* (lora/adapter.py maps them).
"""

from __future__ import annotations

import dataclasses
import numbers
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_engine import dispatch
from lora_engine.io.safetensors import CheckpointError
from lora_engine.kernels.delta_rule_reference import gated_delta_rule_recurrent

LINEAR, FULL = "linear_attention", "full_attention"
# Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration: the text model read out of them
MULTIMODAL = ("qwen3_5", "qwen3_5_moe")
HYBRID_MOE = ("qwen3_5_moe_text", "qwen3_5_moe")  # every MLP the MoE block with a shared expert
HYBRID = ("qwen3_5_text", "qwen3_5_moe_text", *MULTIMODAL)
_TEXT = "model.language_model."  # where the multimodal checkpoint keeps our model.* tensors
_CARRIED = {"qwen3_5_text": ("mtp.",), "qwen3_5_moe_text": ("mtp.",),
            **dict.fromkeys(MULTIMODAL, ("mtp.", "model.visual."))}
_ARCH = {"qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}
_LINEAR_KEYS = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
                "linear_num_key_heads": 16, "linear_num_value_heads": 32}


# ---- config.json ---------------------------------------------------------------------------------------
def hybrid_fields(cfg: dict, layers: int, where: str) -> dict:
    """ModelConfig's fields for a hybrid family, defaults as transformers' Qwen3_5TextConfig."""
    sizes = {}
    for key, default in _LINEAR_KEYS.items():
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= 2**16:
            raise CheckpointError(f"{where}: {key} must be a whole number from 1 to {2**16}, got {v!r}")
        sizes[key.removeprefix("linear_")] = int(v)
    if sizes["num_value_heads"] % sizes["num_key_heads"]:
        raise CheckpointError(f"{where}: linear_num_value_heads ({sizes['num_value_heads']}) must be a multiple of "
                              f"linear_num_key_heads ({sizes['num_key_heads']})")
    types = cfg.get("layer_types")
    if types is None:
        every = cfg.get("full_attention_interval", 4)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise CheckpointError(f"{where}: full_attention_interval must be a positive whole number, got {every!r}")
        types = [FULL if (i + 1) % every == 0 else LINEAR for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers or any(t not in (LINEAR, FULL) for t in types):
        raise CheckpointError(f"{where}: layer_types must list {layers} entries (num_hidden_layers), each "
                              f"{LINEAR!r} or {FULL!r}, got {str(types)[:60]}")
    rope = cfg.get("rope_parameters") if isinstance(cfg.get("rope_parameters"), dict) else {}
    factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0 < factor <= 1:
        raise CheckpointError(f"{where}: partial_rotary_factor must be a number in (0, 1], got {factor!r}")
    return dict(layer_types=tuple(types), linear_attn=sizes, partial_rotary_factor=float(factor),
                attn_output_gate=True, norm_style="gemma")


def text_config(cfg: dict, where: str) -> dict:
    """The fields of a multimodal qwen3_5 / qwen3_5_moe config.json that describe its text model: text_config,
    with the top level's model_type and (where given) tie_word_embeddings, as transformers reads them."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointError(f"{where}: a {cfg['model_type']} ({_ARCH[cfg['model_type']]}) config.json holds its "
                              f"text model's fields in text_config, a JSON object; got {str(text)[:60]}")
    out = {**text, "model_type": cfg["model_type"]}
    if "tie_word_embeddings" in cfg:
        out["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return out


def shared_expert_config(cfg: dict) -> dict:
    """A Qwen3.5-MoE config.json with intermediate_size the shared expert's F (its only dense MLP; the file
    names it shared_expert_intermediate_size, transformers' default 512), as ModelConfig counts it."""
    return {**cfg, "intermediate_size": cfg.get("shared_expert_intermediate_size", 512)}


def checkpoint_name(model_type: str, name: str) -> str:
    """The checkpoint's key for our state-dict key `name` (model.* moves under model.language_model.*)."""
    if model_type in MULTIMODAL and name.startswith("model."):
        return _TEXT + name.removeprefix("model.")
    return name


def model_name(model_type: str, key: str) -> str:
    """Our state-dict key for the checkpoint's `key` (checkpoint_name's inverse)."""
    if model_type in MULTIMODAL and key.startswith(_TEXT):
        return "model." + key.removeprefix(_TEXT)
    return key


def carry(model, hook=None):
    """A load hook (io/safetensors.py) that keeps the tensors the model does not compute with (the MTP
    heads, the vision tower) in model.carried_tensors {key: StoredTensor}, unread, for save_model to copy,
    and passes every other tensor to `hook` under our name."""
    model_type = model.config.model_type
    prefixes = _CARRIED.get(model_type, ())
    model.carried_tensors = {}

    def take(stored) -> bool:
        if stored.name.startswith(prefixes):
            model.carried_tensors[stored.name] = stored
            return True
        if hook is None:
            return False
        return hook(dataclasses.replace(stored, name=model_name(model_type, stored.name)))

    return take if prefixes else hook


def warn_untrained(model) -> None:
    """Say (a warning, on stderr) that a loaded vision tower is carried, not trained."""
    n = sum(k.startswith("model.visual.") for k in getattr(model, "carried_tensors", {}))
    if n:
        warnings.warn(f"{model.config.model_type}: the vision tower ({n} tensors, model.visual.*) is not trained; "
                      "it is kept as read and written back unchanged with the text model", stacklevel=3)


def rotary_dim(cfg) -> int:
    """How many leading dims of each head RoPE rotates (transformers: int(head_dim * factor))."""
    return int(cfg.head_dim * cfg.partial_rotary_factor)


# ---- the two recurrent ops: one function each, so a kernel replaces them in one line ---------------------
def _causal_conv1d(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None, keep: bool = False,
                   backend=None):
    """silu(depthwise causal conv) of x (B, T, C) with weight (C, 1, K); state (B, C, K-1): the inputs before
    x (zeros when None). Returns (out (B, T, C) in x's dtype, with keep the new state, the last K-1 inputs,
    else None: training keeps none)."""
    out = dispatch.causal_conv1d(x, weight, None, "silu", state, backend=backend)
    if not keep:
        return out, None
    K = weight.shape[-1]
    past = x.new_zeros(x.shape[0], x.shape[2], K - 1) if state is None else state.to(x.dtype)
    full = torch.cat([past, x.transpose(1, 2)], dim=-1)  # (B, C, K-1+T)
    return out, full[:, :, full.shape[-1] - (K - 1):]


def _delta_rule(q, k, v, g, beta, initial_state=None, output_final_state=False, backend=None):
    """The gated delta rule, q/k (B, T, H, dk) already L2-normalised and repeated to v's H heads.
    Returns (o (B, T, H, dv) in v's dtype, the final state (B, H, dk, dv) fp32 or None). A one-token decoding
    step runs the recurrence itself in fp32 (a chunked kernel would pad it to a whole chunk); everything else
    the chunked kernels (dispatch.gated_delta_rule, O(T) memory)."""
    if q.shape[1] == 1 and initial_state is not None:
        o, state = gated_delta_rule_recurrent(q, k, v, g, beta, None, initial_state, output_final_state,
                                              dtype=torch.float32)
        return o.to(v.dtype), state
    return dispatch.gated_delta_rule(q, k, v, g, beta, None, initial_state, output_final_state, backend=backend)


def _l2norm(x, eps: float = 1e-6):
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)  # transformers' (and FLA's) eps placement


class GatedRMSNorm(nn.Module):
    """w * x_hat (cast to x's dtype first) times silu(z) in fp32, cast once: transformers' RMSNormGated."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, z):
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (self.weight * h * F.silu(z.float())).to(x.dtype)


class LinearState:
    """One linear-attention layer's decoding state: conv (B, C, K-1) and delta rule (B, Hv, dk, dv) fp32."""

    def __init__(self, conv: torch.Tensor | None = None, rule: torch.Tensor | None = None):
        self.conv, self.rule = conv, rule

    def select_rows(self, rows):
        return LinearState(*(None if t is None else t.index_select(0, rows) for t in (self.conv, self.rule)))


class GatedDeltaNet(nn.Module):
    """The linear-attention token mixer, named as the checkpoint stores it (`linear_attn.*`)."""

    def __init__(self, cfg):
        super().__init__()
        s, D = cfg.linear_attn, cfg.hidden_size
        self.hk, self.hv, self.dk, self.dv = s["num_key_heads"], s["num_value_heads"], s["key_head_dim"], \
            s["value_head_dim"]
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        C = 2 * self.key_dim + self.value_dim
        self.in_proj_qkv = nn.Linear(D, C, bias=False)
        self.in_proj_z = nn.Linear(D, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(D, self.hv, bias=False)
        self.in_proj_a = nn.Linear(D, self.hv, bias=False)
        # Depthwise: weight (C, 1, K), the checkpoint's conv1d.weight; no bias in Qwen3.5.
        self.conv1d = nn.Conv1d(C, C, s["conv_kernel_dim"], groups=C, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, D, bias=False)
        self.backend: str | None = None

    def forward(self, x, pad_mask=None, state: LinearState | None = None):
        """x (B, T, D); pad_mask (B, T) 1 real / 0 padding or None; state: read and updated when given."""
        if pad_mask is not None:
            x = (x * pad_mask[:, :, None]).to(x.dtype)
        B, T, _ = x.shape
        qkv, conv_state = _causal_conv1d(self.in_proj_qkv(x), self.conv1d.weight,
                                         state.conv if state is not None else None, state is not None, self.backend)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q, k = (_l2norm(t.reshape(B, T, self.hk, self.dk)) for t in (q, k))
        if self.hv != self.hk:  # grouped values: key head i serves value heads i*r .. i*r + r-1
            q, k = (t.repeat_interleave(self.hv // self.hk, dim=2) for t in (q, k))
        v = v.reshape(B, T, self.hv, self.dv)
        beta = self.in_proj_b(x).sigmoid()
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)  # (B, T, Hv), <= 0
        o, rule = _delta_rule(q, k, v, g, beta, state.rule if state is not None else None, state is not None,
                              self.backend)
        if state is not None:
            state.conv, state.rule = conv_state, rule
        z = self.in_proj_z(x).reshape(B, T, self.hv, self.dv)
        return self.out_proj(self.norm(o, z).reshape(B, T, self.value_dim))


class GatedAttention(nn.Module):
    """Full attention with q/k norms per head, partial RoPE and a sigmoid output gate (`self_attn.*`):
    q_proj gives (B, T, H, 2 hd), each head's query followed by its gate."""

    def __init__(self, cfg, norm):
        super().__init__()
        D, H, Hk, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_head, self.n_kv, self.head_dim, self.rot = H, Hk, hd, rotary_dim(cfg)
        self.q_proj = nn.Linear(D, 2 * H * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, Hk * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, Hk * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=cfg.o_bias)
        self.q_norm, self.k_norm = norm(hd), norm(hd)
        self.window, self.rope_kind = None, "full"
        self.scale = hd**-0.5
        self.backend: str | None = None

    def forward(self, x, cos, sin, mask, cache, layer: int):
        B, T, _ = x.shape
        q, gate = self.q_proj(x).view(B, T, self.n_head, 2 * self.head_dim).chunk(2, dim=-1)
        q = self.q_norm(q).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        r = self.rot
        q_rot, k_rot = dispatch.rope(q[..., :r].contiguous(), k[..., :r].contiguous(), cos, sin, backend=self.backend)
        q, k = torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot, k[..., r:]], dim=-1)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hk, S, hd)
        y = dispatch.attention(q, k, v, mask is None and T > 1, self.scale, mask, backend=self.backend)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y * torch.sigmoid(gate.reshape(B, T, -1)))


def padding_mask(attention_mask, segment_ids, T: int, model_type: str):
    """The (B, T) mask a linear layer zeroes its padding inputs with, or None (none to zero): transformers'
    create_recurrent_attention_mask (one-token steps and all-real rows need none). ValueError for packed
    rows (segment_ids): the recurrent state would carry one document into the next."""
    if segment_ids is not None:
        raise ValueError(f"segment_ids (packed documents) are not supported with linear-attention layers "
                         f"({model_type}): train without packing")
    if attention_mask is None or T == 1 or bool(attention_mask.all()):
        return None
    return attention_mask[:, -T:]
