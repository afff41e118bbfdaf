"""How llama.cpp lays out each family in GGUF: tensor names, architectures, and the tensor transforms.

One table for both directions: sources/gguf.py reads Llama GGUF files with TENSOR_NAMES,
sources/gguf_write.py writes every family in FAMILIES.

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
             holds 1 + w (Gemma 2 and 3: every "*norm.weight", q/k norms included)
  cat        Phi-3's fused projections: q, k, v (and gate, up) concatenated along the rows
  half0/1    experts stored (E, 2F, H), gate rows first: ffn_gate_exps / ffn_up_exps (E, F, H) each
  even/odd_t gpt-oss experts stored (E, H, 2F) with gate and up interleaved along the last axis:
             the even (gate) or odd (up) columns, transposed to (E, F, H)
  even/odd   gpt-oss expert biases (E, 2F): the even (gate) or odd (up) entries
  t          gpt-oss down experts (E, F, H) -> (E, H, F)
"""

from __future__ import annotations

import warnings
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
    plus_one: bool = False  # norms stored as 1 + w (Gemma)


def _drop(table: dict, *names: str) -> dict:
    return {k: v for k, v in table.items() if k not in names}


def _experts(split_op: str) -> tuple[Derived, ...]:
    """Transformers v5's (E, 2F, H) gate_up_proj and (E, H, F) down_proj as llama.cpp's ffn_*_exps."""
    gate_up = (f"{_L}mlp.experts.gate_up_proj",)
    return (Derived("blk.{}.ffn_gate_exps.weight", gate_up, split_op + "0"),
            Derived("blk.{}.ffn_up_exps.weight", gate_up, split_op + "1"),
            Derived("blk.{}.ffn_down_exps.weight", (f"{_L}mlp.experts.down_proj",), "copy"))


_MOE = {**_drop(TENSOR_NAMES, *_DENSE_MLP), **ROUTER}
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
    return s


def derive(op: str, ws: list[np.ndarray]) -> np.ndarray:
    """Apply `op` to the source tensors (float32, Hugging Face layout)."""
    w = ws[0]
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


# ---- metadata -------------------------------------------------------------------------------------
FULL, SLIDING = "full_attention", "sliding_attention"
# Families whose llama.cpp architecture has no sliding-window attention: a window in use is refused.
NO_WINDOW = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "olmoe", "olmo2", "smollm3")


def layer_types(config: dict) -> list[str]:
    """Per layer FULL or SLIDING; config["layer_types"] when given (deploy/gguf.py writes what the engine
    resolved), else every layer FULL."""
    return list(config.get("layer_types") or [FULL] * config.get("num_hidden_layers", 0))


def check_family(config: dict) -> None:
    """ValueError naming the family and the setting llama.cpp's architecture cannot express."""
    mt = config["model_type"]
    where = f"GGUF export: a {mt} model"
    types = layer_types(config)
    if mt in NO_WINDOW and SLIDING in types:
        raise ValueError(f"{where} with a sliding window in use (sliding_window {config.get('sliding_window')}) is "
                         f"not supported: llama.cpp's {ARCHITECTURES[mt]!r} attends to every position")
    if mt in ("gemma2", "gemma3_text"):
        if not config.get("tie_word_embeddings", True) and mt == "gemma2":
            raise ValueError(f"{where} with an untied lm_head is not supported: llama.cpp's 'gemma2' reuses "
                             "token_embd as the output layer")
        period = 2 if mt == "gemma2" else swa_period(types)
        if SLIDING in types and types != _pattern(len(types), period):
            raise ValueError(f"{where} with layer_types {types} is not supported: llama.cpp's "
                             f"{ARCHITECTURES[mt]!r} takes every n-th layer full, the others sliding")
        head_dim = config.get("head_dim") or config.get("hidden_size", 0) // config.get("num_attention_heads", 1)
        scalar = config.get("query_pre_attn_scalar", 256)
        # llama.cpp scales queries by head_dim^-1/2, except for the 27B models, which it recognises by their
        # layer count (Gemma 2: 46, Gemma 3: 62) and scales by (hidden / heads)^-1/2, as their configs say.
        big = config.get("num_hidden_layers") == (46 if mt == "gemma2" else 62)
        wanted = config.get("hidden_size", 0) // config.get("num_attention_heads", 1) if big else head_dim
        if "hidden_size" in config and scalar != wanted:
            raise ValueError(f"{where} with query_pre_attn_scalar {scalar} != head_dim {head_dim} is not supported: "
                             f"llama.cpp's {ARCHITECTURES[mt]!r} scales queries by head_dim^-1/2 (except the 27B "
                             "sizes it knows by their layer count)")
    if mt == "gemma3_text":
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if config.get(key) is not None:
                raise ValueError(f"{where} with {key} {config[key]} is not supported: llama.cpp's 'gemma3' "
                                 "has no soft-capping")
    if mt == "smollm3":
        want = [int((i + 1) % 4 != 0) for i in range(config.get("num_hidden_layers", 0))]
        if list(config.get("no_rope_layers") or want) != want:
            raise ValueError(f"{where} with no_rope_layers {config['no_rope_layers']} is not supported: llama.cpp's "
                             "'smollm3' skips RoPE on every 4th layer exactly")
    if mt == "qwen3_moe" and (config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1):
        raise ValueError(f"{where} with dense layers (mlp_only_layers {config.get('mlp_only_layers')}, "
                         f"decoder_sparse_step {config.get('decoder_sparse_step', 1)}) is not supported: llama.cpp's "
                         "'qwen3moe' makes every layer's MLP the experts")
    heads = config.get("num_attention_heads")
    if mt == "olmoe" and config.get("num_key_value_heads", heads) != heads:
        raise ValueError(f"{where} with {config['num_key_value_heads']} key/value heads for {heads} query heads is "
                         "not supported: llama.cpp's 'olmoe' sizes the k norm for as many key as query heads")
    if mt == "gpt_oss" and (config.get("swiglu_limit", 7.0) != 7.0 or config.get("swiglu_alpha", 1.702) != 1.702):
        raise ValueError(f"{where} with swiglu_limit/swiglu_alpha other than 7.0/1.702 is not supported: llama.cpp's "
                         "'gpt-oss' has them built in")


def swa_period(types: list[str]) -> int:
    """n when every n-th layer is FULL and the others SLIDING (llama.cpp's sliding_window_pattern); 0 if none."""
    if FULL not in types:
        return 0
    return types.index(FULL) + 1


def _pattern(n: int, period: int) -> list[str]:
    return [SLIDING if period == 0 or (i + 1) % period else FULL for i in range(n)]


def family_metadata(config: dict) -> list[tuple[str, object, str]]:
    """[(key after "{arch}.", value, GGUF value type)] a family adds to the Llama keys; warns where llama.cpp
    will compute something slightly different from the model and there is nothing to write about it."""
    mt = config["model_type"]
    types = layer_types(config)
    kv = []
    if mt == "phi3" and SLIDING in types:
        warnings.warn(f"GGUF export: llama.cpp runs phi3 without its sliding window (it disables Phi's SWA); past "
                      f"{config['sliding_window']} tokens its logits differ from this model's", stacklevel=3)
    if mt == "gpt_oss" and not full_rope_truncates(config):
        warnings.warn("GGUF export: this gpt-oss config says YaRN truncate false; llama.cpp rounds YaRN's ramp "
                      "bounds (truncate true), so a few RoPE frequencies differ slightly from the model's",
                      stacklevel=3)
    if SLIDING in types:
        kv.append(("attention.sliding_window", int(config["sliding_window"]), "UINT32"))
        if mt != "gemma2":
            kv.append(("attention.sliding_window_pattern", swa_period(types), "UINT32"))
    if mt == "gemma2":
        kv += [("attn_logit_softcapping", float(config.get("attn_logit_softcapping", 50.0)), "FLOAT32"),
               ("final_logit_softcapping", float(config.get("final_logit_softcapping", 30.0)), "FLOAT32")]
    if mt == "gemma3_text":
        local = config.get("rope_local_base_freq")
        params = config.get("rope_parameters") or {}
        if isinstance(params.get(SLIDING), dict):
            local = params[SLIDING].get("rope_theta", local)
        kv.append(("rope.freq_base_swa", float(local if local is not None else 10000.0), "FLOAT32"))
    if mt in ("qwen3_moe", "olmoe", "mixtral", "gpt_oss"):
        experts = config.get("num_experts") or config.get("num_local_experts")  # save_pretrained writes either
        inner = config["moe_intermediate_size"] if mt == "qwen3_moe" else config["intermediate_size"]
        kv += [("expert_count", int(experts), "UINT32"),
               ("expert_used_count", int(config["num_experts_per_tok"]), "UINT32"),
               ("expert_feed_forward_length", int(inner), "UINT32")]
        if mt in ("qwen3_moe", "olmoe"):
            kv.append(("expert_weights_norm", bool(config.get("norm_topk_prob", False)), "BOOL"))
    return kv


def full_rope(config: dict) -> dict:
    """The RoPE parameters of the full-attention layers ({"rope_type", "rope_theta", "factor", ...}), from
    rope_parameters (maybe per layer type) or the older rope_theta and rope_scaling."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    rope = dict(params if isinstance(params, dict) else config.get("rope_scaling") or {})
    if rope.get("rope_theta") is None:
        default = 1_000_000.0 if config.get("model_type") == "gemma3_text" else 10000.0
        rope["rope_theta"] = config.get("rope_theta") if config.get("rope_theta") is not None else default
    return rope


def full_rope_truncates(config: dict) -> bool:
    """Whether the YaRN RoPE rounds its ramp bounds to whole dimensions (transformers' `truncate`, default true)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return bool(params.get("truncate", True)) if isinstance(params, dict) else True


# ---- tensors ---------------------------------------------------------------------------------------
class Planned:
    """One GGUF tensor: its name, shape (Hugging Face orientation) and how it is made from HF tensors.

    f32: kept F32 whatever the type asked, as llama.cpp's converter keeps every bias (gpt-oss's 2-D expert
    biases: its CPU add_id takes F32 only) and the MoE router (ffn_gate_inp)."""

    def __init__(self, name: str, shape: tuple[int, ...], sources: tuple[str, ...], op: str):
        self.name, self.shape, self.sources, self.op = name, shape, sources, op
        self.f32 = not name.endswith(".weight") or name.endswith("ffn_gate_inp.weight")


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
            plan.append(Planned(g, tuple(shape), (hf,), plus_one if g.endswith("norm.weight") else "copy"))
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
    w = ws[0] + 1 if p.op == "plus_one" else derive(p.op, ws)
    kind = p.name.split(".")[-2]
    if FAMILIES[config["model_type"]].permuted and kind in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"]
        w = permute_rows(w, heads if kind == "attn_q" else config.get("num_key_value_heads") or heads)
    return np.ascontiguousarray(w, dtype=np.float32)


def _as_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)
