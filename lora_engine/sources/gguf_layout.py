"""How llama.cpp lays out a Llama-family model in GGUF: tensor names, architectures, the Q/K row order.

One table for both directions: sources/gguf.py reads GGUF with it, sources/gguf_write.py writes it.

Names: llama.cpp's (gguf-py constants.TENSOR_NAMES, e.g. "blk.{bid}.attn_q") plus ".weight" or
".bias"; "{}" below is the layer index. tests/test_export_gguf.py checks every name against the
gguf package's list for the architecture.

RoPE: llama.cpp's "llama" architecture rotates adjacent pairs (x0, x1), (x2, x3), ... while Hugging
Face's rotate-half rotates (x0, x_{d/2}), ...; its converter therefore permutes the rows of Q and K
so that each head's first and second halves interleave, and the reader undoes it. "qwen2" and
"qwen3" run llama.cpp's NEOX RoPE, which is rotate-half, so their rows are stored as Hugging Face
has them. Mistral is the "llama" architecture in llama.cpp.
"""

from __future__ import annotations

import numpy as np

# GGUF tensor name -> Hugging Face name: what every supported family has.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
}
# What some families add: Qwen2's q/k/v biases, Qwen3's per-head RMSNorm on q and k.
EXTRA_TENSOR_NAMES = {
    "qwen2": {
        "blk.{}.attn_q.bias": "model.layers.{}.self_attn.q_proj.bias",
        "blk.{}.attn_k.bias": "model.layers.{}.self_attn.k_proj.bias",
        "blk.{}.attn_v.bias": "model.layers.{}.self_attn.v_proj.bias",
    },
    "qwen3": {
        "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
        "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    },
}
# Hugging Face model_type -> llama.cpp architecture (general.architecture).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Architectures whose Q/K rows llama.cpp stores permuted (interleaved RoPE).
PERMUTED = ("llama",)


def hf_to_gguf_names(model_type: str) -> dict[str, str]:
    """{Hugging Face template: GGUF template} for a family ("{}" = layer index)."""
    table = {**TENSOR_NAMES, **EXTRA_TENSOR_NAMES.get(model_type, {})}
    return {hf: g for g, hf in table.items()}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half -> llama.cpp's interleaved Q/K row order, as convert_hf_to_gguf.py does.

    w: (rows, cols) or (rows,) with rows = n_head * head_dim (n_head: the KV head count for K).
    Within each head, row j of the first half and row j of the second half become rows 2j, 2j+1."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (its interleaved RoPE -> HF rotate-half). w: (rows, cols)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
