"""What each family's config.json means beyond the Llama switches: the per-family fields of ModelConfig.

Every family is the one decoder (models/decoder.py) with a few options; this module reads them from a
config.json, family by family, as transformers' configuration classes derive them (defaults included),
and refuses what the decoder does not compute, naming the field:

  gemma2       sliding/full layers alternating, query_pre_attn_scalar, attention and final-logit
               soft-capping, (1 + w) RMSNorm before and after attention and MLP, embeddings times
               sqrt(hidden), GeGLU (tanh GELU)
  gemma3_text  Gemma 2's layout plus q/k norms per head, RoPE per layer type (rope_local_base_freq),
               sliding_window_pattern; gemma3 (the multimodal config) is refused: train the text model
  gemma4_text  Gemma 3's layout with plain w * x_hat norms, a weightless norm on values, unscaled scores, a
               learned scalar per layer, wider (global_head_dim) heads on full layers whose values may be their
               keys (attention_k_eq_v), proportional RoPE there; refused by field: per-layer input embeddings
               (hidden_size_per_layer_input), KV shared across layers (num_kv_shared_layers), the MoE block
               (enable_moe_block), bidirectional attention (use_bidirectional_attention)
  phi3         fused qkv_proj / gate_up_proj in the checkpoint (split on load, fused on save),
               a window on every layer when sliding_window is set, RoPE on the leading
               partial_rotary_factor of each head (Phi-4-mini), longrope (Phi-3-128k, Phi-3.5, Phi-4-mini):
               per-dimension short or long factors chosen by the sequence length
  smollm3      NoPE layers (no_rope_layers), optional sliding layers
  olmo2/olmo3  norms after attention and MLP only, q/k norms over the whole projection; OLMo 3 adds
               sliding layers and RoPE per layer type
  mistral, qwen2, qwen3  a sliding window where the config puts one in use
  qwen3_moe    Qwen3 with MoE MLPs (models/moe.py) on the layers decoder_sparse_step and mlp_only_layers
               leave sparse (the others dense, intermediate_size), experts of moe_intermediate_size
  mixtral      Mistral with MoE MLPs, the top-k weights always renormalised; router_jitter_noise refused
  olmoe        MoE MLPs, q/k norms over the whole projection; clip_qkv refused
  gpt_oss      MoE MLPs with a biased router and clamped-SwiGLU experts, attention sinks, sliding and full
               layers alternating, YaRN RoPE: models/gpt_oss.py
  qwen3_5_text, qwen3_5  linear-attention layers, partial RoPE, gated attention: models/hybrid.py
  qwen3_5_moe_text, qwen3_5_moe  the same with every MLP MoE (top-k always renormalised) plus a shared expert

The key map of the fused-weight families (FUSED) lives here too: load splits, save fuses.
"""

from __future__ import annotations

import math
import numbers

import torch

from lora_engine.io.safetensors import CheckpointError
from lora_engine.models import gpt_oss
from lora_engine.models.hybrid import HYBRID, HYBRID_MOE, hybrid_fields

FULL, SLIDING = "full_attention", "sliding_attention"
GELU_TANH = "gelu_pytorch_tanh"
# model_type -> the transformers class that a saved folder names in `architectures`
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                 "gemma4_text": "Gemma4ForCausalLM",
                 "phi3": "Phi3ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                 "olmo3": "Olmo3ForCausalLM", "qwen3_5_text": "Qwen3_5ForCausalLM",
                 "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_moe": "Qwen3MoeForCausalLM",
                 "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM", "gpt_oss": "GptOssForCausalLM",
                 "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}
SUPPORTED_MODEL_TYPES = tuple(ARCHITECTURES)
GEMMA = ("gemma2", "gemma3_text", "gemma4_text")
GEMMA4 = "gemma4_text"
OLMO = ("olmo2", "olmo3")
MOE = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss", *HYBRID_MOE)
# Fused checkpoint tensors: stored name (per layer) -> the decoder's modules it holds, in order along dim 0.
FUSED = {"phi3": {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}}
# Families whose own model card says: this is not the text decoder (train the text model instead).
REFUSED = {
    "gemma3": "a Gemma 3 model with its vision tower (Gemma3ForConditionalGeneration) is not supported; train "
              "the text model: a gemma3_text checkpoint (Gemma3ForCausalLM, e.g. google/gemma-3-1b-pt)",
    "gemma4": "a Gemma 4 model with its vision and audio towers (Gemma4ForConditionalGeneration) is not supported; "
              "train the text model: a gemma4_text checkpoint (Gemma4ForCausalLM)",
}


def family_fields(cfg: dict, model_type: str, layers: int, where: str) -> dict:
    """ModelConfig's family fields (see ModelConfig) from config.json `cfg`; CheckpointError naming the field."""
    act_key = "hidden_activation" if model_type in GEMMA else "hidden_act"
    want = GELU_TANH if model_type in GEMMA else "silu"
    act = cfg.get(act_key, want)
    if act != want:
        raise CheckpointError(f"{where}: {act_key} {_show(act)} is not supported for {model_type}; supported: {want}")
    types, window = _windows(cfg, model_type, layers, where)
    out = dict(layer_types=types, sliding_window=window, hidden_act=act)
    if model_type == GEMMA4:
        out.update(_gemma4_fields(cfg, types or (FULL,) * layers, where), norm_style="olmo",
                   norm_layout="sandwich", embed_scale=True, query_scale=1.0,
                   final_softcap=_number(cfg, "final_logit_softcapping", None, where))
    elif model_type in GEMMA:
        out.update(norm_style="gemma", norm_layout="sandwich", embed_scale=True,
                   query_scale=_number(cfg, "query_pre_attn_scalar", 256, where),
                   attn_softcap=_number(cfg, "attn_logit_softcapping", 50.0 if model_type == "gemma2" else None,
                                        where),
                   final_softcap=_number(cfg, "final_logit_softcapping", 30.0 if model_type == "gemma2" else None,
                                         where))
    if model_type in OLMO:
        out.update(norm_style="olmo", norm_layout="post", qk_norm_full=True)
    if model_type in HYBRID:
        out.update(hybrid_fields(cfg, layers, where))
    if model_type == "smollm3":
        out["rope_layers"] = _no_rope_layers(cfg, layers, where)
    if model_type == "phi3":
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
        factor = (rope if isinstance(rope, dict) else {}).get("partial_rotary_factor",
                                                              cfg.get("partial_rotary_factor", 1.0))
        factor = 1.0 if factor is None else factor
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0 < factor <= 1:
            raise CheckpointError(f"{where}: partial_rotary_factor must be a number in (0, 1], got {_show(factor)}")
        out.update(fused_projections=True, partial_rotary_factor=float(factor))
    if model_type in MOE:
        out.update(_moe_fields(cfg, model_type, layers, where))
    if model_type == "gpt_oss":
        out.update(gpt_oss.gpt_oss_fields(cfg, where))
    if model_type == "olmoe":
        out["qk_norm_full"] = True
        if cfg.get("clip_qkv") is not None:
            raise CheckpointError(f"{where}: clip_qkv {_show(cfg['clip_qkv'])} (q, k, v clamped) is not supported "
                                  "for olmoe; supported: null")
    return out


# Gemma 4 fields whose mechanism the decoder does not compute: (default as Gemma4TextConfig has it, why).
_GEMMA4_REFUSED = {
    "hidden_size_per_layer_input": (256, "per-layer input embeddings (Gemma 4 E2B/E4B)"),
    "num_kv_shared_layers": (0, "layers reusing an earlier layer's keys and values"),
    "enable_moe_block": (False, "the mixture-of-experts block beside the MLP (Gemma 4 26B-A4B)"),
    "use_bidirectional_attention": (None, "bidirectional attention"),
}


def _gemma4_fields(cfg: dict, types: tuple, where: str) -> dict:
    """Gemma 4's text-decoder options; CheckpointError naming a field whose mechanism is not computed."""
    for key, (default, what) in _GEMMA4_REFUSED.items():
        v = cfg.get(key, default)
        if v not in (None, 0, False):
            want = "false" if isinstance(default, bool) else "null" if default is None else "0"
            raise CheckpointError(f"{where}: {key} {_show(v)} ({what}) is not supported for gemma4_text; "
                                  f"supported: {want}")
    k_eq_v = cfg.get("attention_k_eq_v", False)
    if not isinstance(k_eq_v, bool):
        raise CheckpointError(f"{where}: attention_k_eq_v must be true or false, got {_show(k_eq_v)}")
    head_dim, kv = cfg.get("global_head_dim") or 512, cfg.get("num_global_key_value_heads") if k_eq_v else None
    per_layer = cfg.get("per_layer_config")
    if per_layer is not None:  # what save_pretrained writes instead: {layer: {"head_dim", "num_key_value_heads"}}
        full = {str(i) for i, t in enumerate(types) if t == FULL}
        values = list(per_layer.values()) if isinstance(per_layer, dict) else []
        if not isinstance(per_layer, dict) or set(per_layer) != full or any(v != values[0] for v in values) or \
                not isinstance(values[0], dict) or set(values[0]) - {"head_dim", "num_key_value_heads"}:
            raise CheckpointError(f"{where}: per_layer_config must give every full-attention layer ({sorted(full)}) "
                                  f"the same head_dim and num_key_value_heads, nothing else; got {_show(per_layer)}")
        head_dim, kv = values[0].get("head_dim", cfg.get("head_dim", 256)), values[0].get("num_key_value_heads")
    return dict(global_head_dim=_whole("global_head_dim", head_dim, where),
                global_kv_heads=None if kv is None else _whole("num_global_key_value_heads", kv, where),
                attention_k_eq_v=k_eq_v, v_norm=True, layer_scalar=True)


def _moe_fields(cfg: dict, model_type: str, layers: int, where: str) -> dict:
    """The MoE fields of ModelConfig, with transformers' defaults for each family."""
    # Qwen3MoeConfig maps num_local_experts to num_experts (and save_pretrained writes the former).
    key = "num_local_experts" if model_type == "mixtral" or "num_experts" not in cfg else "num_experts"
    hybrid = model_type in HYBRID_MOE
    experts = _whole(key, cfg.get(key, 256 if hybrid else {"qwen3_moe": 128, "mixtral": 8, "olmoe": 64,
                                                           "gpt_oss": 128}[model_type]), where)
    top_k = _whole("num_experts_per_tok", cfg.get("num_experts_per_tok", 8 if hybrid else {
        "qwen3_moe": 8, "mixtral": 2, "olmoe": 8, "gpt_oss": 4}[model_type]), where)
    if top_k > experts:
        raise CheckpointError(f"{where}: num_experts_per_tok ({top_k}) is more than the {experts} experts ({key})")
    # Mixtral's and Qwen3.5-MoE's routers always renormalise (their configs have no norm_topk_prob)
    norm = True if model_type == "mixtral" or hybrid else cfg.get("norm_topk_prob", False)
    if not isinstance(norm, bool):
        raise CheckpointError(f"{where}: norm_topk_prob must be true or false, got {_show(norm)}")
    if model_type == "mixtral" and cfg.get("router_jitter_noise") not in (None, 0, 0.0):
        raise CheckpointError(f"{where}: router_jitter_noise {_show(cfg['router_jitter_noise'])} (random router "
                              "input noise in training) is not supported; supported: 0.0")
    inner_key = "moe_intermediate_size" if model_type == "qwen3_moe" or hybrid else "intermediate_size"
    inner = _whole(inner_key, cfg.get(inner_key, {"gpt_oss": 2880}.get(model_type, 512 if hybrid else 768)), where)
    coef = cfg.get("router_aux_loss_coef", 0.01 if model_type == "olmoe" else 0.001)
    if isinstance(coef, bool) or not isinstance(coef, numbers.Real) or coef < 0:
        raise CheckpointError(f"{where}: router_aux_loss_coef must be a number >= 0, got {_show(coef)}")
    moe_layers = ()
    if model_type == "qwen3_moe":
        step = _whole("decoder_sparse_step", cfg.get("decoder_sparse_step", 1), where)
        dense = cfg.get("mlp_only_layers") or []
        if not isinstance(dense, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in dense):
            raise CheckpointError(f"{where}: mlp_only_layers must list layer numbers, got {_show(dense)}")
        moe_layers = tuple(i not in dense and (i + 1) % step == 0 for i in range(layers))
    return dict(num_experts=experts, experts_per_token=top_k, moe_intermediate_size=inner, norm_topk_prob=norm,
                moe_layers=moe_layers, router_aux_loss_coef=float(coef), shared_expert=hybrid)


def _windows(cfg: dict, model_type: str, layers: int, where: str) -> tuple[tuple[str, ...], int | None]:
    """(layer types, window) as transformers derives them; () and None when every layer attends fully."""
    window = cfg.get("sliding_window", {"gpt_oss": gpt_oss.DEFAULT_WINDOW, GEMMA4: 512}.get(model_type))
    in_use = {"qwen2": "use_sliding_window", "qwen3": "use_sliding_window", "smollm3": "use_sliding_window",
              "qwen3_moe": "use_sliding_window"}
    if model_type in in_use:
        flag = cfg.get(in_use[model_type], False)
        if not isinstance(flag, bool):
            raise CheckpointError(f"{where}: use_sliding_window must be true or false, got {_show(flag)}")
        window = window if flag else None
    if model_type in ("llama", "olmo2", "olmoe"):
        window = None  # no window in these families' attention
    if window is None:
        return (), None
    window = _whole("sliding_window", window, where)
    given = cfg.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or len(given) != layers or any(t not in (FULL, SLIDING) for t in given):
            raise CheckpointError(f"{where}: layer_types must list {layers} entries (num_hidden_layers), each "
                                  f"{FULL!r} or {SLIDING!r}, got {_show(given)}")
        types = tuple(given)
    elif model_type in ("mistral", "phi3", "mixtral", "qwen3_moe"):
        types = (SLIDING,) * layers
    elif model_type in ("qwen2", "qwen3"):
        first = _whole("max_window_layers", cfg.get("max_window_layers", 28), where, zero=True)
        types = tuple(SLIDING if i >= first else FULL for i in range(layers))
    elif model_type in ("gemma2", "gpt_oss"):
        types = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(layers))
    elif model_type == "gemma3_text":
        every = _whole("sliding_window_pattern", cfg.get("sliding_window_pattern", 6), where)
        types = tuple(SLIDING if (i + 1) % every else FULL for i in range(layers))
    elif model_type == GEMMA4:
        types = tuple(SLIDING if (i + 1) % 6 else FULL for i in range(layers))
    elif model_type == "olmo3":
        types = tuple(SLIDING if (i + 1) % 4 else FULL for i in range(layers))
    else:  # smollm3: sliding where a layer has no RoPE
        types = tuple(FULL if use else SLIDING for use in _no_rope_layers(cfg, layers, where))
    if model_type == GEMMA4:  # Gemma4TextConfig makes the last layer full, whatever layer_types says
        types = (*types[:-1], FULL)
    if SLIDING not in types:
        return (), None
    return types, window


def _no_rope_layers(cfg: dict, layers: int, where: str) -> tuple[bool, ...]:
    """SmolLM3's per-layer RoPE switch (1: RoPE, 0: none), default every no_rope_layer_interval-th layer none."""
    given = cfg.get("no_rope_layers")
    if given is None:
        every = _whole("no_rope_layer_interval", cfg.get("no_rope_layer_interval", 4), where)
        return tuple(bool((i + 1) % every) for i in range(layers))
    if not isinstance(given, list) or len(given) != layers or any(v not in (0, 1) or isinstance(v, float)
                                                                  for v in given):
        raise CheckpointError(f"{where}: no_rope_layers must list {layers} entries (num_hidden_layers) of 0 or 1, "
                              f"got {_show(given)}")
    return tuple(bool(v) for v in given)


def rope_by_layer_type(cfg: dict, where: str) -> tuple[dict | None, dict | None]:
    """(the full-attention layers' RoPE parameters, the sliding layers' or None when the same), in the old
    (rope_theta, rope_scaling, rope_local_base_freq) or the new (rope_parameters, maybe per layer type) form.
    None: config.py reads the file's own rope fields (and checks their JSON types)."""
    if cfg.get("model_type") == "gpt_oss":
        return gpt_oss.rope_parameters(cfg), None
    params = cfg.get("rope_parameters")
    if cfg.get("model_type") == GEMMA4 and params is None:  # Gemma4TextConfig's defaults
        params = {SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                  FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0}}
    if isinstance(params, dict) and (FULL in params or SLIDING in params):
        full, sliding = (params.get(k) or {} for k in (FULL, SLIDING))
        if not isinstance(full, dict) or not isinstance(sliding, dict):
            raise CheckpointError(f"{where}: rope_parameters per layer type must be JSON objects, got "
                                  f"{_show(params)}")
        full, sliding = dict(full), dict(sliding)
        full.setdefault("rope_theta", _theta_default(cfg, FULL))
        sliding.setdefault("rope_theta", _theta_default(cfg, SLIDING))
        return full, sliding
    old = params or cfg.get("rope_scaling") or {}
    if cfg.get("model_type") in ("gemma3_text", "olmo3") and isinstance(old, dict):  # one global rope + a local
        full = dict(old)
        full.setdefault("rope_theta", _theta_default(cfg, FULL))
        local = {"rope_type": "default", "rope_theta": _theta_default(cfg, SLIDING)}
        return full, local
    return None, None


def _theta_default(cfg: dict, kind: str):
    if cfg.get("model_type") == "gemma3_text":
        key, default = ("rope_theta", 1_000_000.0) if kind == FULL else ("rope_local_base_freq", 10_000.0)
        return cfg.get(key) if cfg.get(key) is not None else default
    return cfg.get("rope_theta") if cfg.get("rope_theta") is not None else 500_000.0


# ---- LongRoPE (Phi-3-128k, Phi-3.5, Phi-4-mini), as transformers' _compute_longrope_parameters --------
LONGROPE = "longrope"


def check_longrope(rope: dict, cfg: dict, rotary_dim: int, where: str) -> dict:
    """The longrope parameters completed as Phi3Config does: original_max_position_embeddings is the config's
    top-level field when there is one (Phi3Config's default 4096), the rope dict's otherwise; short_factor and
    long_factor one number per rotated pair. CheckpointError naming the field."""
    rope = dict(rope)
    orig = cfg.get("original_max_position_embeddings",
                   rope.get("original_max_position_embeddings", 4096 if cfg.get("model_type") == "phi3" else None))
    rope["original_max_position_embeddings"] = _whole("original_max_position_embeddings", orig, where)
    for key in ("short_factor", "long_factor"):
        v = rope.get(key)
        if not isinstance(v, list) or len(v) != rotary_dim // 2 or any(
                isinstance(x, bool) or not isinstance(x, numbers.Real) or not x > 0 for x in v):
            raise CheckpointError(f"{where}: longrope {key} must list {rotary_dim // 2} positive numbers (one per "
                                  f"rotated pair of a head), got {_show(v)}")
    for key in ("factor", "attention_factor"):
        if rope.get(key) is not None:
            _number(rope, key, None, where)
    return rope


def longrope_inv_freq(dim: int, base: float, rope: dict, long: bool):
    """The inverse frequencies divided per dimension by the short or the long factors (fp32, exactly
    transformers' expression)."""
    ext = torch.tensor(rope["long_factor" if long else "short_factor"], dtype=torch.float32)
    return 1.0 / (ext * base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def longrope_attention_factor(rope: dict, max_positions: int) -> float:
    """cos and sin (so every score) are multiplied by this: attention_factor, else sqrt(1 + ln f / ln L0) with
    f = factor (default max_position_embeddings / L0) and L0 the original length; 1 when f <= 1."""
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    orig = rope["original_max_position_embeddings"]
    factor = rope.get("factor") or max_positions / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def _number(cfg: dict, key: str, default, where: str) -> float | None:
    v = cfg.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0 or v == float("inf"):
        raise CheckpointError(f"{where}: {key} must be a positive number or null, got {_show(v)}")
    return float(v)


def _whole(name: str, v, where: str, zero: bool = False) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise CheckpointError(f"{where}: {name} must be a whole number, got {_show(v)}")
    if v < (0 if zero else 1) or v > 2**26:
        raise CheckpointError(f"{where}: {name} must be from {0 if zero else 1} to {2**26:,}, got {v}")
    return int(v)


def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# ---- fused checkpoint tensors (Phi-3) ----------------------------------------------------------------
def fused_groups(model_type: str, names: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The checkpoint's keys for the state-dict keys `names`, in order: (stored key, the keys it holds)."""
    fused = FUSED.get(model_type)
    if not fused:
        return [(n, (n,)) for n in names]
    parts = {}  # a part's key -> (fused key, all its parts)
    for n in names:
        for stored, members in fused.items():
            for m in members:
                prefix, dot, leaf = n.rpartition(f".{m}.")
                if dot and prefix.startswith("model.layers."):
                    parts[n] = (f"{prefix}.{stored}.{leaf}", tuple(f"{prefix}.{x}.{leaf}" for x in members))
    out, seen = [], set()
    for n in names:
        key, members = parts.get(n, (n, (n,)))
        if key not in seen:
            seen.add(key)
            out.append((key, members))
    return out
