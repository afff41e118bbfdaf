"""The GGUF metadata each llama.cpp architecture reads, and what it cannot express (refused by name).

Beyond the Llama keys that sources/gguf_write.py writes for every family: the sliding window and which
layers slide (gemma2's alternation is built into llama.cpp; gemma3 and the others read
sliding_window_pattern, every n-th layer full), Gemma 2's soft-caps, Gemma 3's local RoPE base, the expert
counts, Qwen3.5's DeltaNet sizes (ssm.*) and M-RoPE sections. Settings a llama.cpp architecture computes
its own way (Gemma's query scale, SmolLM3's NoPE layers, gpt-oss's SwiGLU clamp, ...) are checked against
what it assumes, and a model that differs is refused with the family and the setting named.

`config` throughout is the model's config.json as a dict, with "layer_types" (and SmolLM3's
"no_rope_layers") as the engine resolved them (deploy/gguf.py), so transformers' defaults are applied.
"""

from __future__ import annotations

import warnings

from lora_engine.sources.gguf_layout import ARCHITECTURES

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
    if mt in ("qwen3_5_text", "qwen3_5_moe_text"):
        every = config.get("full_attention_interval", 4)
        want = ["full_attention" if (i + 1) % every == 0 else "linear_attention"
                for i in range(config.get("num_hidden_layers", 0))]
        if config.get("layer_types") and list(config["layer_types"]) != want:
            raise ValueError(f"{where} with layer_types {config['layer_types']} is not supported: llama.cpp's "
                             f"'qwen35' makes every {every}-th layer full attention and the others linear")
        dk, dv = config.get("linear_key_head_dim"), config.get("linear_value_head_dim")
        if dk != dv:
            raise ValueError(f"{where} with linear_value_head_dim {dv} != linear_key_head_dim {dk} is not supported: "
                             "llama.cpp's 'qwen35' sizes the DeltaNet's value heads as its key heads")
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


def family_metadata(config: dict) -> list[tuple]:
    """[(key after "{arch}.", value, GGUF value type[, array item type])] a family adds to the Llama keys;
    warns where llama.cpp will compute something slightly different from the model and no key can say it."""
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
    if mt in ("qwen3_5_text", "qwen3_5_moe_text"):
        rope = full_rope(config)
        sections = list(rope.get("mrope_section") or [11, 11, 10])  # transformers' default
        kv += [("ssm.conv_kernel", int(config["linear_conv_kernel_dim"]), "UINT32"),
               ("ssm.state_size", int(config["linear_key_head_dim"]), "UINT32"),
               ("ssm.group_count", int(config["linear_num_key_heads"]), "UINT32"),
               ("ssm.time_step_rank", int(config["linear_num_value_heads"]), "UINT32"),
               ("ssm.inner_size", int(config["linear_value_head_dim"] * config["linear_num_value_heads"]), "UINT32"),
               ("full_attention_interval", int(config.get("full_attention_interval", 4)), "UINT32"),
               # interleaved M-RoPE (t, h, w, e) sections; for text every section rotates by the token position
               ("rope.dimension_sections", [*sections, 0, 0, 0, 0][:4], "ARRAY", "INT32")]
    if mt in ("qwen3_moe", "olmoe", "mixtral", "gpt_oss", "qwen3_5_moe_text"):
        experts = config.get("num_experts") or config.get("num_local_experts")  # save_pretrained writes either
        inner = config["moe_intermediate_size"] if "moe_intermediate_size" in config else config["intermediate_size"]
        kv += [("expert_count", int(experts), "UINT32"),
               ("expert_used_count", int(config["num_experts_per_tok"]), "UINT32"),
               ("expert_feed_forward_length", int(inner), "UINT32")]
        if mt in ("qwen3_moe", "olmoe"):
            kv.append(("expert_weights_norm", bool(config.get("norm_topk_prob", False)), "BOOL"))
        if mt == "qwen3_5_moe_text":
            kv.append(("expert_shared_feed_forward_length", int(config["shared_expert_intermediate_size"]), "UINT32"))
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


def rotary_dim(config: dict, head_dim: int) -> int:
    """The dimensions of each head that RoPE rotates (rope.dimension_count): partial_rotary_factor's share."""
    default = 0.25 if config.get("model_type") in ("qwen3_5_text", "qwen3_5_moe_text") else 1.0
    params = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    return int(head_dim * params.get("partial_rotary_factor", config.get("partial_rotary_factor", default)))
