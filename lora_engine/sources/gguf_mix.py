"""Which ggml type each tensor gets for an export type: llama-quantize's per-tensor mix, by GGUF name.

    tensor_types({"token_embd.weight": (49152, 576), ...}, "q4_k_m", n_layer=30)  # -> {name: "Q8_0", ...}

An export type names a llama.cpp file type (llama_ftype): Q4_K_M is "mostly Q4_K", and llama.cpp's
quantizer (llama-quant.cpp, llama_tensor_get_type) moves some tensors to other types. We follow it
for the file types we write, so `--gguf-type q4_k_m` gives the same type per tensor as
`llama-quantize model-f16.gguf q4_k_m`:

- output head (and the token embedding when it is tied to the head, i.e. there is no output.weight):
  Q6_K, unless the type is Q8_0 already or its rows are not whole blocks of the type (then Q8_0);
- attn_v: Q6_K on the "more bits" layers (the first and last eighth, and every third between) for
  Q4_K_M / Q5_K_M; Q5_K on the first four for Q4_K_S; Q5_K instead of Q4_K on 70B-shaped
  models (80 layers: Llama with grouped KV, Qwen2); Q8_0 with 8 experts. attn_k: Q8_0 with 8 experts.
- ffn_down: Q6_K on the "more bits" layers for Q4_K_M / Q5_K_M; Q5_K on the first eighth for Q4_K_S.
- attn_output: Q5_K with 8 experts for Q4_K_S / Q4_K_M.
- then the shape fallback: rows that are not whole 256-blocks demote Q4_K -> Q5_0, Q5_K -> Q5_1,
  Q6_K -> Q8_0; rows that are not whole blocks of the result (32) are written as F16.

Only 2-D+ tensors named "...weight" and not norms are quantized (norms and biases stay F32). The
counters llama.cpp keeps (i-th attn_v, i-th ffn_down) run over tensors in its loader's order, layer
by layer and by name within a layer; for a dense model they are the layer index. The names are
llama.cpp's, so a family whose tensors are named elsewhere (sources/gguf_layout.py) gets its mix here
without this file knowing the family.
"""

from __future__ import annotations

import re

# --gguf-type -> (gguf.LlamaFileType name, the ggml type most tensors get)
FILE_TYPES = {
    "f32": ("ALL_F32", "F32"), "f16": ("MOSTLY_F16", "F16"), "bf16": ("MOSTLY_BF16", "BF16"),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0"), "q4_0": ("MOSTLY_Q4_0", "Q4_0"), "q4_1": ("MOSTLY_Q4_1", "Q4_1"),
    "q6_k": ("MOSTLY_Q6_K", "Q6_K"), "q5_k_m": ("MOSTLY_Q5_K_M", "Q5_K"), "q5_k_s": ("MOSTLY_Q5_K_S", "Q5_K"),
    "q4_k_m": ("MOSTLY_Q4_K_M", "Q4_K"), "q4_k_s": ("MOSTLY_Q4_K_S", "Q4_K"),
}
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
         "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# A 256-block type whose rows do not fit -> the 32-block type llama.cpp uses instead.
SHAPE_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"blk\.(\d+)\.")


def _layer(name: str) -> int:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else -1


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama-quantize changes this tensor's type at all (2-D+ weights, not norms or router gates)."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def tensor_types(shapes: dict[str, tuple[int, ...]], gguf_type: str, n_layer: int, n_expert: int = 1,
                 llama_70b: bool = False) -> dict[str, str]:
    """{GGUF name: ggml type name} for every tensor in `shapes` (name -> shape, row-major: (rows, cols)).

    n_layer: the block count; n_expert: experts per MoE layer (1 for dense); llama_70b: llama.cpp's
    LLM_TYPE_70B (80 layers: a llama with fewer KV heads than heads, or a qwen2), which bumps attn_v.
    """
    if gguf_type not in FILE_TYPES:
        raise ValueError(f"GGUF export: type {gguf_type!r} is not supported; supported: {', '.join(FILE_TYPES)}")
    default = FILE_TYPES[gguf_type][1]
    order = sorted(shapes, key=lambda n: (_layer(n), n))  # llama_model_loader's weights_map order
    n_attn_v = sum(_category(n) == "attn_v" for n in order)
    tied = "output.weight" not in shapes
    seen = {"attn_v": 0, "ffn_down": 0}
    types = {}
    for name in order:
        shape = shapes[name]
        if not quantizable(name, shape):
            types[name] = "F32" if len(shape) < 2 else default if BLOCK[default] == 1 else "F16"
            continue
        if BLOCK[default] == 1:  # f32 / f16 / bf16: one type for every weight
            types[name] = default
            continue
        cat = _category(name)
        new = _mixed(gguf_type, default, cat, name, shape[-1], tied, seen, n_attn_v, n_layer, n_expert, llama_70b)
        if cat in seen:
            seen[cat] += 1
        types[name] = _fit_rows(new, shape[-1])
    return {n: types[n] for n in shapes}


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_output.weight", "attn_output"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def _mixed(ftype, new, cat, name, cols, tied, seen, n_attn_v, n_layer, n_expert, llama_70b) -> str:
    """llama_tensor_get_type_impl's choice for the file types in FILE_TYPES."""
    if cat == "output" or (tied and cat == "token_embd"):
        if cols % BLOCK[new]:
            return "Q8_0"
        return new if new == "Q8_0" else "Q6_K"
    if cat == "attn_v":
        i = seen["attn_v"]
        if ftype in ("q4_k_m", "q5_k_m") and more_bits(i, n_attn_v):
            new = "Q6_K"
        elif ftype == "q4_k_s" and i < 4:
            new = "Q5_K"
        if llama_70b and new == "Q4_K":
            new = "Q5_K"
        return "Q8_0" if n_expert == 8 else new
    if cat == "attn_k":
        return "Q8_0" if n_expert == 8 else new
    if cat == "ffn_down":
        i = _layer(name) if n_expert > 1 else seen["ffn_down"]
        if ftype in ("q4_k_m", "q5_k_m") and more_bits(i, n_layer):
            return "Q6_K"
        if ftype == "q4_k_s" and i < n_layer // 8:
            return "Q5_K"
        return new
    if cat == "attn_output" and n_expert == 8 and ftype in ("q4_k_s", "q4_k_m"):
        return "Q5_K"
    return new


def _fit_rows(new: str, cols: int) -> str:
    """tensor_type_fallback: a type whose blocks do not divide the rows is demoted, finally to F16."""
    if cols % BLOCK[new] == 0:
        return new
    new = SHAPE_FALLBACK.get(new, new)
    return new if cols % BLOCK[new] == 0 else "F16"
