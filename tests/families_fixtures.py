"""Tiny random transformers models of every family beyond Llama, saved as real checkpoint folders.

One builder for the dense families (models/families.py), the mixture-of-experts ones (models/moe.py,
models/gpt_oss.py) and the Qwen3.5 hybrids (models/hybrid.py): 2 layers, hidden 32 or 64, each family's
distinctive options on (a sliding layer beside a full one, soft-caps, NoPE, a dense layer in an MoE
model, shared experts, a linear-attention layer beside a full one), every norm, router and expert drawn
random so that a weight we drop or misplace shows in the logits. The transformers import is deferred:
it is a test extra.
"""

from __future__ import annotations

from pathlib import Path

import torch

WINDOW = 8
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DENSE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=256, **_IDS)
_MOE = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, num_experts_per_tok=2, max_position_embeddings=256, **_IDS)
_HYBRID = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
               linear_num_key_heads=2, linear_num_value_heads=4, max_position_embeddings=256,
               layer_types=["linear_attention", "full_attention"], **_IDS)
_MIXED = ["sliding_attention", "full_attention"]

# family: the transformers config of its tiny model (model_type -> fields)
CONFIGS = {
    "gemma2": dict(_DENSE, sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0),
    "gemma3_text": dict(_DENSE, sliding_window=WINDOW, query_pre_attn_scalar=24, layer_types=_MIXED, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    "phi3": dict(_DENSE, sliding_window=WINDOW),
    "smollm3": dict(_DENSE, use_sliding_window=True, sliding_window=WINDOW, no_rope_layers=[1, 0]),
    "olmo2": dict(_DENSE),
    "olmo3": dict(_DENSE, sliding_window=WINDOW, layer_types=_MIXED),
    # layer 1 dense (mlp_only_layers), layer 0 sparse; renormalised top-k
    "qwen3_moe": dict(_MOE, num_experts=4, moe_intermediate_size=16, intermediate_size=40, norm_topk_prob=True,
                      mlp_only_layers=[1]),
    "mixtral": dict(_MOE, num_local_experts=4, intermediate_size=16),
    "olmoe": dict(_MOE, num_experts=4, intermediate_size=16),  # norm_topk_prob false: its default
    "gpt_oss": dict(_MOE, num_local_experts=4, intermediate_size=16, sliding_window=4, rope_parameters={
        "rope_type": "yarn", "factor": 8.0, "beta_fast": 8.0, "beta_slow": 1.0, "truncate": False,
        "original_max_position_embeddings": 256, "rope_theta": 150000.0}),
    "qwen3_5_text": dict(_HYBRID, intermediate_size=48),
    "qwen3_5_moe_text": dict(_HYBRID, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
                             num_experts_per_tok=2),
}
# Phi-4-mini's RoPE: the leading 3/4 of each head rotated, longrope past an original length of 16 (a test
# sequence passes it), per-pair short and long factors far apart so the wrong set shows in the logits.
PHI4_MINI = dict(_DENSE, hidden_size=64, head_dim=16, max_position_embeddings=64, original_max_position_embeddings=16,
                 partial_rotary_factor=0.75, rope_parameters={
                     "rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.75,
                     "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.0, 2.0, 4.0, 8.0, 12.0, 16.0]})
# Gemma 4's dense text decoder (the 31B's mechanisms): full layers with wider heads (global_head_dim), fewer
# key/value heads whose values are their keys (attention_k_eq_v), proportional RoPE on half their angles; no
# per-layer inputs (hidden_size_per_layer_input 0: refused otherwise).
GEMMA4 = dict(_DENSE, sliding_window=WINDOW, layer_types=_MIXED, global_head_dim=16, num_global_key_value_heads=1,
              attention_k_eq_v=True, hidden_size_per_layer_input=0, final_logit_softcapping=3.0, rope_parameters={
                  "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                     "rope_theta": 1_000_000.0},
                  "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})
FAMILIES = tuple(CONFIGS)
DENSE = ("gemma2", "gemma3_text", "phi3", "smollm3", "olmo2", "olmo3", "qwen3_5_text")
MOE = ("qwen3_moe", "mixtral", "olmoe", "gpt_oss", "qwen3_5_moe_text")
# Norms stored as w in (1 + w): drawn around 0, not 1 (Qwen3.5's DeltaNet gated norm is a plain w).
_ONE_PLUS_W = ("gemma2", "gemma3_text", "qwen3_5_text", "qwen3_5_moe_text")


def randomize(model, family: str, prefix: str = "") -> None:
    """Norms around their identity; experts, routers, sinks and biases drawn wide (0.3), so no top-k choice
    is a near tie and every expert's output matters. prefix: only the parameters under it (a text model
    inside a multimodal one)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(prefix):
                continue
            if "norm" in name:
                center = 0.0 if family in _ONE_PLUS_W and "linear_attn.norm" not in name else 1.0
                p.copy_(0.2 * torch.randn_like(p) + center)
            elif p.dim() == 3 or name.endswith((".gate.weight", "shared_expert_gate.weight", "sinks", ".bias")) \
                    or "router" in name:
                p.normal_(0, 0.3)
        for name, b in model.named_buffers():  # Gemma 4's stored per-layer output scalar
            if name.startswith(prefix) and name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)


def make_family(family: str, folder: Path, seed: int = 0, fields: dict | None = None, **over):
    """A random fp32 transformers model of `family` saved to `folder`; returned in eval mode, eager attention
    (its soft-cap and sink paths). fields: the config (default CONFIGS[family]); over: fields to change."""
    from tests.conftest import require_oracle

    tf = require_oracle("transformers")
    torch.manual_seed(seed)
    config = tf.AutoConfig.for_model(family, **{**(CONFIGS[family] if fields is None else fields), **over})
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, family)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()
