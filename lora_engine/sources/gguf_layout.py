"""How llama.cpp lays out each family in GGUF: tensor names, architectures, and the tensor transforms.

One table for both directions: sources/gguf.py reads Llama GGUF files with TENSOR_NAMES,
sources/gguf_write.py writes every family in FAMILIES (tensor_plan: which GGUF tensor is made from which
Hugging Face tensors, build_tensor: its data).

Names: llama.cpp's (gguf-py constants.TENSOR_NAMES, e.g. "blk.{bid}.attn_q") plus ".weight" or
".bias"; "{}" below is the layer index. tests/test_export_gguf*.py check every name against the
gguf package's list for the architecture, and load the files with llama.cpp itself.

RoPE: llama.cpp's "llama" and "smollm3" architectures rotate adjacent pairs (x0, x1), (x2, x3), ...
while Hugging Face's rotate-half rotates (x0, x_{d/2}), ...; its converter therefore permutes the rows
of Q and K so that each head's first and second halves interleave, and the reader undoes it. The other
architectures here run llama.cpp's NEOX RoPE, which is rotate-half, so their rows are stored as Hugging
Face has them. Mistral and Mixtral are the "llama" architecture in llama.cpp (Mixtral with experts).

Transforms (what convert_hf_to_gguf.py does to the tensors, by `Derived.op`):
  plus_one   Gemma's norms compute x_hat * (1 + w); llama.cpp's RMSNorm computes x_hat * w, so the file
             holds 1 + w (Gemma 2 and 3, Qwen3.5: every "*norm.weight", q/k norms included; not
             Qwen3.5's DeltaNet output norm, which is w * x_hat)
  cat        Phi-3's fused projections: q, k, v (and gate, up) concatenated along the rows
  half0/1    experts stored (E, 2F, H), gate rows first: ffn_gate_exps / ffn_up_exps (E, F, H) each
  even/odd_t gpt-oss experts stored (E, H, 2F) with gate and up interleaved along the last axis:
             the even (gate) or odd (up) columns, transposed to (E, F, H)
  even/odd   gpt-oss expert biases (E, 2F): the even (gate) or odd (up) entries
  t          gpt-oss down experts (E, F, H) -> (E, H, F)
  v_*        Qwen3.5's DeltaNet: A_log stored as -exp(A_log), the conv kernel squeezed to (C, K), and the
             value heads reordered from grouped by key head to tiled (v_heads_tiled)

The metadata each architecture reads, and what it cannot express: sources/gguf_metadata.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# GGUF tensor name -> Hugging Face name: what the Llama families have (the reader's table).
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
_L = "model.layers.{}."
QKV_BIAS = {f"blk.{{}}.attn_{x}.bias": f"{_L}self_attn.{x}_proj.bias" for x in "qkv"}
QK_NORM = {f"blk.{{}}.attn_{x}_norm.weight": f"{_L}self_attn.{x}_norm.weight" for x in "qk"}
# Norms around attention and MLP (Gemma: both sides; OLMo 2: after only). Hugging Face's
# post_attention_layernorm is llama.cpp's ffn_norm in the Llama layout, post_attention_norm here.
SANDWICH = {
    "blk.{}.attn_norm.weight": f"{_L}input_layernorm.weight",
    "blk.{}.post_attention_norm.weight": f"{_L}post_attention_layernorm.weight",
    "blk.{}.ffn_norm.weight": f"{_L}pre_feedforward_layernorm.weight",
    "blk.{}.post_ffw_norm.weight": f"{_L}post_feedforward_layernorm.weight",
}
ROUTER = {"blk.{}.ffn_gate_inp.weight": f"{_L}mlp.gate.weight"}
_DENSE_MLP = ("blk.{}.ffn_gate.weight", "blk.{}.ffn_up.weight", "blk.{}.ffn_down.weight")
_ATTN_QKV = ("blk.{}.attn_q.weight", "blk.{}.attn_k.weight", "blk.{}.attn_v.weight")


@dataclass(frozen=True)
class Derived:
    """A GGUF tensor computed from Hugging Face tensors (templates, "{}" = layer index) by `op`."""
    gguf: str
    sources: tuple[str, ...]
    op: str


@dataclass(frozen=True)
class Family:
    arch: str  # general.architecture
    names: dict  # GGUF template -> HF template, copied as they are
    derived: tuple = ()  # Derived entries
    permuted: bool = False  # Q/K rows interleaved for llama.cpp's NORM RoPE
    plus_one: bool = False  # norms stored as 1 + w (Gemma, Qwen3.5)
    ops: tuple = ()  # (GGUF template, op) for copied tensors that are changed on the way (Qwen3.5's DeltaNet)


def _drop(table: dict, *names: str) -> dict:
    return {k: v for k, v in table.items() if k not in names}


def _experts(split_op: str) -> tuple[Derived, ...]:
    """Transformers v5's (E, 2F, H) gate_up_proj and (E, H, F) down_proj as llama.cpp's ffn_*_exps."""
    gate_up = (f"{_L}mlp.experts.gate_up_proj",)
    return (Derived("blk.{}.ffn_gate_exps.weight", gate_up, split_op + "0"),
            Derived("blk.{}.ffn_up_exps.weight", gate_up, split_op + "1"),
            Derived("blk.{}.ffn_down_exps.weight", (f"{_L}mlp.experts.down_proj",), "copy"))


_MOE = {**_drop(TENSOR_NAMES, *_DENSE_MLP), **ROUTER}
_LIN = "model.layers.{}.linear_attn."
# Qwen3.5: Gated DeltaNet layers (ssm_*, attn_qkv, attn_gate) beside full-attention layers (attn_q holds the
# query and the output gate, head by head, as the checkpoint does); post_attention_layernorm is llama.cpp's
# post_attention_norm here.
_QWEN35 = {
    **_drop(TENSOR_NAMES, "blk.{}.ffn_norm.weight"), **QK_NORM,
    "blk.{}.post_attention_norm.weight": f"{_L}post_attention_layernorm.weight",
    "blk.{}.attn_qkv.weight": _LIN + "in_proj_qkv.weight",
    "blk.{}.attn_gate.weight": _LIN + "in_proj_z.weight",
    "blk.{}.ssm_beta.weight": _LIN + "in_proj_b.weight",
    "blk.{}.ssm_alpha.weight": _LIN + "in_proj_a.weight",
    "blk.{}.ssm_a": _LIN + "A_log",
    "blk.{}.ssm_dt.bias": _LIN + "dt_bias",
    "blk.{}.ssm_conv1d.weight": _LIN + "conv1d.weight",
    "blk.{}.ssm_norm.weight": _LIN + "norm.weight",
    "blk.{}.ssm_out.weight": _LIN + "out_proj.weight",
}
# What llama.cpp's converter does to them: A_log stored as A = -exp(A_log), the conv kernel (C, 1, K) as
# (C, K), the DeltaNet's own norm (w * x_hat) not shifted, and every value-head axis reordered from grouped
# by key head to tiled (v_*: see v_heads_tiled).
_QWEN35_OPS = (("blk.{}.attn_qkv.weight", "v_qkv"), ("blk.{}.attn_gate.weight", "v_rows"),
               ("blk.{}.ssm_beta.weight", "v_heads"), ("blk.{}.ssm_alpha.weight", "v_heads"),
               ("blk.{}.ssm_a", "v_neg_exp"), ("blk.{}.ssm_dt.bias", "v_heads"), ("blk.{}.ssm_conv1d.weight", "v_conv"),
               ("blk.{}.ssm_norm.weight", "copy"), ("blk.{}.ssm_out.weight", "v_cols"))
_GPT_OSS_EXPERTS = "model.layers.{}.mlp.experts."
FAMILIES = {
    "llama": Family("llama", TENSOR_NAMES, permuted=True),
    "mistral": Family("llama", TENSOR_NAMES, permuted=True),
    "qwen2": Family("qwen2", {**TENSOR_NAMES, **QKV_BIAS}),
    "qwen3": Family("qwen3", {**TENSOR_NAMES, **QK_NORM}),
    "gemma2": Family("gemma2", {**TENSOR_NAMES, **SANDWICH}, plus_one=True),
    "gemma3_text": Family("gemma3", {**TENSOR_NAMES, **SANDWICH, **QK_NORM}, plus_one=True),
    "phi3": Family("phi3", _drop(TENSOR_NAMES, *_ATTN_QKV, "blk.{}.ffn_gate.weight", "blk.{}.ffn_up.weight"),
                   derived=(Derived("blk.{}.attn_qkv.weight", tuple(f"{_L}self_attn.{x}_proj.weight" for x in "qkv"),
                                    "cat"),
                            Derived("blk.{}.ffn_up.weight", (f"{_L}mlp.gate_proj.weight", f"{_L}mlp.up_proj.weight"),
                                    "cat"))),
    "smollm3": Family("smollm3", TENSOR_NAMES, permuted=True),
    "olmo2": Family("olmo2", {**_drop(TENSOR_NAMES, "blk.{}.attn_norm.weight", "blk.{}.ffn_norm.weight"),
                              **_drop(SANDWICH, "blk.{}.attn_norm.weight", "blk.{}.ffn_norm.weight"), **QK_NORM}),
    "qwen3_moe": Family("qwen3moe", {**_MOE, **QK_NORM}, derived=_experts("half")),
    "olmoe": Family("olmoe", {**_MOE, **QK_NORM}, derived=_experts("half")),
    "mixtral": Family("llama", _MOE, derived=_experts("half"), permuted=True),
    "gpt_oss": Family("gpt-oss", {
        **_drop(TENSOR_NAMES, *_DENSE_MLP, "blk.{}.ffn_norm.weight"), **QKV_BIAS,
        "blk.{}.attn_output.bias": f"{_L}self_attn.o_proj.bias",
        "blk.{}.attn_sinks.weight": f"{_L}self_attn.sinks",
        "blk.{}.post_attention_norm.weight": f"{_L}post_attention_layernorm.weight",
        "blk.{}.ffn_gate_inp.weight": f"{_L}mlp.router.weight",
        "blk.{}.ffn_gate_inp.bias": f"{_L}mlp.router.bias",
        "blk.{}.ffn_down_exps.bias": _GPT_OSS_EXPERTS + "down_proj_bias",
    }, derived=(Derived("blk.{}.ffn_gate_exps.weight", (_GPT_OSS_EXPERTS + "gate_up_proj",), "even_t"),
                Derived("blk.{}.ffn_up_exps.weight", (_GPT_OSS_EXPERTS + "gate_up_proj",), "odd_t"),
                Derived("blk.{}.ffn_down_exps.weight", (_GPT_OSS_EXPERTS + "down_proj",), "t"),
                Derived("blk.{}.ffn_gate_exps.bias", (_GPT_OSS_EXPERTS + "gate_up_proj_bias",), "even"),
                Derived("blk.{}.ffn_up_exps.bias", (_GPT_OSS_EXPERTS + "gate_up_proj_bias",), "odd"))),
    "qwen3_5_text": Family("qwen35", _QWEN35, plus_one=True, ops=_QWEN35_OPS),
    "qwen3_5_moe_text": Family("qwen35moe", {**_drop(_QWEN35, *_DENSE_MLP), **ROUTER, **{
        f"blk.{{}}.ffn_{x}_shexp.weight": f"{_L}mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")},
        "blk.{}.ffn_gate_inp_shexp.weight": f"{_L}mlp.shared_expert_gate.weight"},
        derived=_experts("half"), plus_one=True, ops=_QWEN35_OPS),
}
# Hugging Face model_type -> llama.cpp architecture (general.architecture).
ARCHITECTURES = {mt: f.arch for mt, f in FAMILIES.items()}


def hf_to_gguf_names(model_type: str) -> dict[str, str]:
    """{Hugging Face template: GGUF template} of the tensors a family copies as they are ("{}" = layer index)."""
    return {hf: g for g, hf in FAMILIES[model_type].names.items()}


def derived_shape(op: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape `op` makes of its sources' shapes (see the module docstring)."""
    s = shapes[0]
    if op == "cat":
        return (sum(x[0] for x in shapes), *s[1:])
    if op in ("half0", "half1"):
        return (s[0], s[1] // 2, s[2])
    if op in ("even_t", "odd_t"):
        return (s[0], s[2] // 2, s[1])
    if op in ("even", "odd"):
        return (*s[:-1], s[-1] // 2)
    if op == "t":
        return (s[0], s[2], s[1])
    if op == "v_conv":
        return (s[0], s[-1])
    return s


def derive(op: str, ws: list[np.ndarray], config: dict | None = None) -> np.ndarray:
    """Apply `op` to the source tensors (float32, Hugging Face layout)."""
    w = ws[0]
    if op.startswith("v_"):
        return _qwen35_op(op, w, config)
    if op == "cat":
        return np.concatenate(ws, axis=0)
    if op in ("half0", "half1"):
        half = w.shape[1] // 2
        return w[:, :half] if op == "half0" else w[:, half:]
    if op in ("even_t", "odd_t"):
        return w[..., op == "odd_t"::2].swapaxes(1, 2)
    if op in ("even", "odd"):
        return w[..., op == "odd"::2]
    if op == "t":
        return w.swapaxes(1, 2)
    return w


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


# ---- tensors ---------------------------------------------------------------------------------------
class Planned:
    """One GGUF tensor: its name, shape (Hugging Face orientation) and how it is made from HF tensors.

    f32: kept F32 whatever the type asked, as llama.cpp's converter keeps every bias (gpt-oss's 2-D expert
    biases: its CPU add_id takes F32 only), the MoE router (ffn_gate_inp) and the DeltaNet's conv kernel."""

    def __init__(self, name: str, shape: tuple[int, ...], sources: tuple[str, ...], op: str):
        self.name, self.shape, self.sources, self.op = name, shape, sources, op
        self.f32 = not name.endswith(".weight") or name.endswith(("ffn_gate_inp.weight", "ssm_conv1d.weight"))


def tensor_plan(config: dict, shapes: dict[str, tuple[int, ...]]) -> list[Planned]:
    """The GGUF tensors in llama.cpp's order (globals, then block by block); refuses unknown tensors.

    shapes: {HF name: shape} of the tensors to write. Each HF tensor is copied under its GGUF name, or
    is one of the sources of a derived tensor (gguf_layout.Derived: fused, split, transposed)."""
    family = FAMILIES[config["model_type"]]
    table = hf_to_gguf_names(config["model_type"])
    plus_one = "plus_one" if family.plus_one else "copy"
    plan, unknown, used = [], [], set()
    for hf, shape in shapes.items():
        parts = hf.split(".")
        layer = parts[2] if hf.startswith("model.layers.") and len(parts) > 3 and parts[2].isdigit() else None
        template = ".".join(parts[:2] + ["{}"] + parts[3:]) if layer is not None else hf
        if template in table:
            g = table[template].format(layer)
            op = dict(family.ops).get(table[template], plus_one if g.endswith("norm.weight") else "copy")
            plan.append(Planned(g, derived_shape(op, [tuple(shape)]), (hf,), op))
        elif not any(template in d.sources for d in family.derived):
            unknown.append(hf)
        elif layer is not None:
            used.add(layer)
    for layer in sorted(used, key=int):
        for d in family.derived:
            sources = tuple(s.format(layer) for s in d.sources)
            missing = [s for s in sources if s not in shapes]
            if missing:
                raise ValueError(f"GGUF export: {d.gguf.format(layer)} needs {', '.join(missing)}, which the model "
                                 "does not have")
            plan.append(Planned(d.gguf.format(layer), derived_shape(d.op, [tuple(shapes[s]) for s in sources]),
                                sources, d.op))
    if unknown:
        raise ValueError(f"GGUF export: {len(unknown)} tensors have no llama.cpp name for a {config['model_type']} "
                         f"model: {', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}")

    def order(p):
        g = p.name
        return (1, int(g.split(".")[1]), g) if g.startswith("blk.") else (0, 0, {"token_embd.weight": 0}.get(g, 1), g)
    return sorted(plan, key=order)


def build_tensor(p: Planned, tensor: Callable[[str], object], config: dict) -> np.ndarray:
    """The float32 data of planned tensor `p`: its sources read with tensor(hf_name), transformed."""
    ws = [_as_numpy(tensor(hf)) for hf in p.sources]
    for hf, w in zip(p.sources, ws):
        if p.op == "copy" and tuple(w.shape) != p.shape:
            raise ValueError(f"GGUF export: tensor {hf} has shape {tuple(w.shape)}, announced {p.shape}")
    w = ws[0] + 1 if p.op == "plus_one" else derive(p.op, ws, config)
    kind = p.name.split(".")[-2]
    if FAMILIES[config["model_type"]].permuted and kind in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"]
        w = permute_rows(w, heads if kind == "attn_q" else config.get("num_key_value_heads") or heads)
    return np.ascontiguousarray(w, dtype=np.float32)


def _as_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def v_heads_tiled(w: np.ndarray, axis: int, k_heads: int, head_dim: int) -> np.ndarray:
    """Value heads grouped by key head (k0v0, k0v1, ..., k1v0, ...) -> tiled (k0v0, k1v0, ..., k0v1, ...) along
    `axis` (k_heads * per_k * head_dim long): llama.cpp broadcasts the key heads over the value heads by
    repeating them whole, so its converter stores the value heads in that order (a no-op when per_k is 1)."""
    w = np.moveaxis(w, axis, 0)
    per_k = w.shape[0] // (k_heads * head_dim)
    w = w.reshape(k_heads, per_k, head_dim, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
    return np.moveaxis(w, 0, axis)


def _qwen35_op(op: str, w: np.ndarray, config: dict) -> np.ndarray:
    hk, dk, dv = (config[f"linear_{x}"] for x in ("num_key_heads", "key_head_dim", "value_head_dim"))
    if op == "v_qkv":  # rows q (hk dk), k (hk dk), v (hv dv): only v's
        return np.concatenate([w[:2 * hk * dk], v_heads_tiled(w[2 * hk * dk:], 0, hk, dv)])
    if op == "v_conv":  # (C, 1, K) over the qkv channels
        w = w.reshape(w.shape[0], w.shape[-1])
        return np.concatenate([w[:2 * hk * dk], v_heads_tiled(w[2 * hk * dk:], 0, hk, dv)])
    if op == "v_rows":
        return v_heads_tiled(w, 0, hk, dv)
    if op == "v_cols":
        return v_heads_tiled(w, 1, hk, dv)
    if op == "v_neg_exp":
        return v_heads_tiled(-np.exp(w), 0, hk, 1)
    return v_heads_tiled(w, 0, hk, 1)  # v_heads: one entry (row) per value head
