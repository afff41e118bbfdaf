"""ModelConfig: the architecture hyper-parameters, read from a Hugging Face config.json.

Supported families are the decoder-only Llama relatives that differ only in small switches:

  llama    (incl. Llama-3.1 rope_scaling of type "llama3"; optional attention/mlp bias)
  mistral  (sliding window must not be in use)
  qwen2    (bias on q/k/v projections)
  qwen3    (RMSNorm on q and k per head)
  gemma2, gemma3_text, phi3, smollm3, olmo2, olmo3, the mixtures of experts qwen3_moe, mixtral, olmoe,
           and sliding windows in mistral/qwen2/qwen3: the per-family options of models/families.py
  gpt_oss  attention sinks, YaRN RoPE, biased router and clamped-SwiGLU experts (models/gpt_oss.py)
  qwen3_5_text, qwen3_5  Gated DeltaNet layers beside gated full attention (models/hybrid.py)
  qwen3_5_moe_text, qwen3_5_moe  the same with MoE MLPs and a shared expert (models/hybrid.py, models/moe.py)

config.json is checked at this boundary: anything else, and any field that is missing, of the wrong
JSON type, out of range or inconsistent, raises CheckpointError naming the file and the field, rather
than a KeyError deep inside or a model that silently computes something else. The sizes are bounded by
LIMITS (see there), so a config read alone (the memory plan reads nothing else) cannot make the engine
build millions of modules; where weights exist, models/builder.py also checks the config against them.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_engine.io.safetensors import CheckpointError
from lora_engine.models.families import (
    ARCHITECTURES,
    FULL,
    LONGROPE,
    MOE,
    REFUSED,
    SLIDING,
    SUPPORTED_MODEL_TYPES,
    check_longrope,
    family_fields,
    rope_by_layer_type,
)
from lora_engine.models.gpt_oss import check_yarn
from lora_engine.models.hybrid import HYBRID, HYBRID_MOE, LINEAR, MULTIMODAL, shared_expert_config, text_config

SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "yarn", "proportional")
# Upper bounds on the sizes a config may give: far above every released model of these families
# (Llama-3.1-405B: 126 layers, hidden 16384, FFN 53248, 128 heads, vocabulary 128256; Gemma's vocabulary
# 262144 and head_dim 256; Llama-4's 10M positions), and low enough that a hostile or corrupted config
# cannot ask for millions of layers (building them would hang) or for a vocabulary of 10^12.
LIMITS = {"vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**19, "num_hidden_layers": 1024,
          "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 2048,
          "max_position_embeddings": 2**26}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
MAX_CONFIG_BYTES = 16 * 2**20  # a real config.json is a few kB; a bigger one is not read into memory


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    model_type: str = "llama"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    torch_dtype: str = "float32"
    # Family options (models/families.py); the defaults are the Llama decoder.
    layer_types: tuple = ()  # per layer FULL or SLIDING; () = every layer full attention
    sliding_window: int | None = None  # keys a SLIDING layer's query sees: positions q - W < k <= q
    sliding_rope: dict | None = None  # the SLIDING layers' RoPE ({"rope_type", "rope_theta", ...}) if not the same
    rope_layers: tuple = ()  # per layer whether it applies RoPE (SmolLM3's NoPE layers); () = all do
    query_scale: float | None = None  # query_pre_attn_scalar: scores times its -1/2 power instead of head_dim's
    attn_softcap: float | None = None  # scores -> c * tanh(scores / c) before the mask
    final_softcap: float | None = None  # logits -> c * tanh(logits / c), in the loss too
    norm_style: str = "llama"  # "gemma": x_hat * (1 + w) in fp32; "olmo": w * x_hat in fp32, then cast
    norm_layout: str = "pre"  # "sandwich": norms before and after attention and MLP; "post": after only
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), rounded to the embedding's dtype
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh" (GeGLU)
    qk_norm_full: bool = False  # q/k norm over the whole projection (OLMo 2), not per head
    fused_projections: bool = False  # the checkpoint stores fused qkv_proj / gate_up_proj (families.FUSED)
    # Gemma 4: FULL layers' own head size and key/value heads (None: head_dim, num_key_value_heads); their
    # values are their keys (no v_proj) with attention_k_eq_v; values RMS-normed without a weight; each layer's
    # output times a stored scalar.
    global_head_dim: int | None = None
    global_kv_heads: int | None = None
    attention_k_eq_v: bool = False
    v_norm: bool = False
    layer_scalar: bool = False
    # Hybrid linear attention (models/hybrid.py, Qwen3.5): "linear_attention" entries in layer_types.
    linear_attn: dict | None = None  # the Gated DeltaNet sizes (num_key_heads, key_head_dim, conv_kernel_dim, ...)
    partial_rotary_factor: float = 1.0  # RoPE on the first head_dim * factor dims of each head
    attn_output_gate: bool = False  # q_proj doubled: the attention output times sigmoid(gate)
    # Mixture of experts (models/moe.py; families.MOE): 0 experts = a dense model.
    num_experts: int = 0
    experts_per_token: int = 0  # the router's top-k
    moe_intermediate_size: int = 0  # each expert's F
    norm_topk_prob: bool = False  # the k routing weights renormalised to sum to 1
    moe_layers: tuple = ()  # per layer whether its MLP is the MoE block; () = every layer when num_experts
    router_aux_loss_coef: float = 0.0
    shared_expert: bool = False  # Qwen3.5-MoE: a dense MLP of intermediate_size beside the experts, sigmoid-gated
    # gpt-oss (models/gpt_oss.py): a learned sink logit per head in each softmax; moe_style "gpt_oss": the router
    # with a bias and the softmax after the top-k, experts stored (E, K, N) with biases and the clamped SwiGLU.
    attn_sinks: bool = False
    moe_style: str = ""
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # the raw config.json

    def __post_init__(self):
        """CheckpointError (a ValueError) naming the field; from_hf adds the file."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name, limit in LIMITS.items():
            _whole(name, getattr(self, name), limit)
        _real("rms_norm_eps", self.rms_norm_eps)
        # The base of the rotary wavelengths: at or below 1 the frequencies grow instead of falling (and
        # overflow to inf for a tiny base).
        _real("rope_theta", self.rope_theta, above=1.0)
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        rotated = int(self.head_dim * self.partial_rotary_factor)
        if rotated < 2 or rotated % 2:  # RoPE turns pairs of dims
            raise CheckpointError(f"partial_rotary_factor {self.partial_rotary_factor:g} rotates {rotated} of "
                                  f"head_dim {self.head_dim} dims; RoPE needs an even number, at least 2")
        if not isinstance(self.torch_dtype, str):
            raise CheckpointError(f"dtype must be a name such as 'bfloat16', got {self.torch_dtype!r}")
        for name in ("layer_types", "rope_layers"):
            if len(getattr(self, name)) not in (0, self.num_hidden_layers):
                raise CheckpointError(f"{name} must list num_hidden_layers ({self.num_hidden_layers}) entries")
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise CheckpointError("sliding_window must be given when layer_types has sliding layers")
        if LINEAR in self.layer_types and not self.linear_attn:
            raise CheckpointError("linear_attn (the linear_* sizes) must be given when layer_types has "
                                  "linear_attention layers")

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.num_experts) and (self.moe_layers[i] if self.moe_layers else True)

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else FULL

    def attention_dims(self, i: int) -> tuple[int, int]:
        """(key/value heads, head size) of layer i: Gemma 4's full layers have their own."""
        if self.layer_type(i) == FULL:
            return self.global_kv_heads or self.num_key_value_heads, self.global_head_dim or self.head_dim
        return self.num_key_value_heads, self.head_dim

    @classmethod
    def from_hf(cls, path: str | Path | dict) -> ModelConfig:
        """Read a Hugging Face config.json (a path to the file or its folder, or the parsed dict).

        Raises FileNotFoundError when there is no file, CheckpointError naming the file and the field for
        anything in it this engine cannot build exactly.
        """
        cfg, where = _read(path)
        fields = _fields(cfg, where)
        try:
            return cls(**fields, extra=cfg)
        except CheckpointError as e:  # a range or consistency check of __post_init__: name the file too
            raise CheckpointError(f"{where}: {e}") from e

    def to_hf(self) -> dict:
        """The config.json that transformers reads for this model, built from the fields (not `extra`):
        ModelConfig.from_hf(c.to_hf()) == c. Raises ValueError when the switches (biases, q/k norm)
        do not fit what the family's transformers class computes, or for the other families, whose
        config.json is kept as read (`extra`) and written back as it was."""
        if self.model_type not in ("llama", "mistral", "qwen2", "qwen3") or self.layer_types:
            raise ValueError(f"to_hf: a {self.model_type} config.json is written from the one it was read from "
                             "(ModelConfig.extra), not rebuilt from the fields")
        _check_family(self)
        rope = {**(self.rope_scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta}
        cfg = {
            "architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            # transformers >= 5 reads rope_parameters; older versions rope_theta and rope_scaling.
            "rope_parameters": rope, "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings, "dtype": self.torch_dtype,
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(rope)
        if self.model_type in ("llama", "qwen3"):
            cfg["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            cfg["mlp_bias"] = self.mlp_bias
        if self.model_type == "mistral":
            cfg["sliding_window"] = None
        if self.model_type in ("qwen2", "qwen3"):
            cfg["use_sliding_window"] = False
        return cfg

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("extra")
        return d


def _check_family(c: ModelConfig) -> None:
    """What each family's transformers class can express: (qkv_bias, o_bias, mlp_bias, qk_norm)."""
    fixed = {  # None: free (config.json has a switch for it)
        "llama": (None, c.qkv_bias, None, False),  # attention_bias covers q, k, v and o
        "mistral": (False, False, False, False),
        "qwen2": (True, False, False, False),
        "qwen3": (None, c.qkv_bias, False, True),
    }[c.model_type]
    for name, want in zip(("qkv_bias", "o_bias", "mlp_bias", "qk_norm"), fixed):
        if want is not None and getattr(c, name) != want:
            raise ValueError(f"to_hf: a {c.model_type} model with {name}={getattr(c, name)} has no transformers "
                             f"config; {c.model_type} has {name}={want}"
                             + (" (attention_bias sets qkv_bias and o_bias together)" if name == "o_bias" else ""))


def _read(path) -> tuple[dict, str]:
    """(the parsed config.json, its name for messages); CheckpointError unless it is a JSON object."""
    if isinstance(path, dict):
        cfg, where = path, "config"
    else:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no config.json at {p}")
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{p}: {size:,} bytes is not a config.json (a real one is a few kB, at most "
                                  f"{MAX_CONFIG_BYTES:,} is read); point at the model's own config.json")
        try:
            cfg = json.loads(p.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{p} is not valid JSON: {e}") from e
        where = str(p)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: a config.json holds one JSON object ({{...}}) of fields, not "
                              f"{_json_type(cfg)} {_show(cfg)}")
    return cfg, where


def _fields(cfg: dict, where: str) -> dict:
    """ModelConfig's fields from a config.json, each checked for its JSON type; ranges and consistency are
    __post_init__'s (except what must hold before a field can be computed, e.g. head_dim)."""
    model_type = cfg.get("model_type")
    if model_type in MULTIMODAL:  # Qwen3.5 with its vision tower: the text model's fields (models/hybrid.py)
        cfg = text_config(cfg, where)
    if model_type in HYBRID_MOE:  # no dense MLP: intermediate_size is the shared expert's
        cfg = shared_expert_config(cfg)
    if isinstance(model_type, str) and model_type in REFUSED:
        raise CheckpointError(f"{where}: {REFUSED[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{where}: model_type {_show(model_type)} is not supported; "
                              f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    missing = [k for k in REQUIRED if cfg.get(k) is None]
    if missing:
        raise CheckpointError(f"{where}: {', '.join(missing)} missing; a {model_type} config.json gives "
                              f"{', '.join(REQUIRED)}")
    sizes = {k: _whole(k, cfg[k], LIMITS[k], where) for k in REQUIRED}
    max_pos = _whole("max_position_embeddings", _get(cfg, "max_position_embeddings", 2048),
                     LIMITS["max_position_embeddings"], where)
    _reject_unsupported(cfg, model_type, where)
    family = family_fields(cfg, model_type, sizes["num_hidden_layers"], where)
    full_rope, sliding_rope = rope_by_layer_type(cfg, where)
    rope = _rope_parameters(cfg, where, full_rope)
    if SLIDING in family["layer_types"] and sliding_rope is not None:
        sliding_rope = _rope_parameters(cfg, where, sliding_rope)
        # Gemma 4's sliding layers keep their own tables when their heads are narrower than the full layers'
        family["sliding_rope"] = None if sliding_rope == rope and not family.get("global_head_dim") else sliding_rope
    heads, hidden = sizes["num_attention_heads"], sizes["hidden_size"]
    head_dim = cfg.get("head_dim")
    if head_dim is None:  # transformers' default: the hidden size split evenly over the heads
        if hidden % heads:
            raise CheckpointError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}, "
                                  "and no head_dim gives the size of a head")
        head_dim = hidden // heads
    if rope["rope_type"] == LONGROPE:
        rope = check_longrope(rope, cfg, int(head_dim * family.get("partial_rotary_factor", 1.0)), where)
    attention_bias = _flag(cfg, "attention_bias", where, default=model_type == "gpt_oss")
    dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    if not isinstance(dtype, str):
        raise CheckpointError(f"{where}: dtype {_show(dtype)} is not a dtype name such as \"bfloat16\"")
    return dict(
        model_type=model_type, **sizes, max_position_embeddings=max_pos,
        num_key_value_heads=_get(cfg, "num_key_value_heads", heads),
        head_dim=head_dim,
        rms_norm_eps=_real("rms_norm_eps", _get(cfg, "rms_norm_eps", 1e-6), where),
        rope_theta=float(rope["rope_theta"]),
        rope_scaling=rope if rope["rope_type"] != "default" else None,
        tie_word_embeddings=_flag(cfg, "tie_word_embeddings", where),
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=_flag(cfg, "mlp_bias", where),
        qk_norm=model_type in ("qwen3", "gemma3_text", "gemma4_text", "olmo2", "olmo3", *HYBRID, "qwen3_moe", "olmoe"),
        torch_dtype=dtype.replace("torch.", ""),
        **family,
    )


def _rope_parameters(cfg: dict, where: str, given: dict | None = None) -> dict:
    # transformers >= 5 writes `rope_parameters`; older files carry rope_theta + rope_scaling. `given`:
    # one layer type's parameters (models/families.py rope_by_layer_type).
    rope = _object({"rope_parameters": given}, "rope_parameters", where) if given is not None else \
        _object(cfg, "rope_parameters", where)
    if not rope:
        rope = _object(cfg, "rope_scaling", where)
        rope.setdefault("rope_theta", _get(cfg, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if cfg.get("model_type") == "phi3" and rope_type in ("su", "yarn"):  # Phi3Config's names for longrope before it
        rope_type = LONGROPE
    # YaRN is checked against transformers for gpt-oss only so far (tests/test_gptoss.py); longrope for phi3
    supported = [t for t in SUPPORTED_ROPE_TYPES if t != "yarn" or cfg.get("model_type") == "gpt_oss"]
    supported += [LONGROPE] if cfg.get("model_type") == "phi3" else []
    # proportional (Gemma 4's full layers): checked against transformers for gemma4_text only
    supported = [t for t in supported if t != "proportional" or cfg.get("model_type") == "gemma4_text"]
    if rope_type not in supported:
        raise CheckpointError(
            f"{where}: rope scaling type {_show(rope_type)} is not supported; "
            f"supported: {', '.join(supported)}"
        )
    rope["rope_type"] = rope_type
    rope["rope_theta"] = _real("rope_theta", _get(rope, "rope_theta", 10000.0), where, above=1.0)
    if rope_type == "yarn":
        check_yarn(rope, where, _get(cfg, "max_position_embeddings", 2048))
    if rope_type == "proportional":  # the leading partial_rotary_factor of each head's angles, the rest 0
        factor = _get(rope, "partial_rotary_factor", 1.0)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 <= factor <= 1:
            raise CheckpointError(f"{where}: proportional rope partial_rotary_factor must be a number in [0, 1], "
                                  f"got {_show(factor)}")
        _real("rope scaling factor", _get(rope, "factor", 1.0), where)
    if rope_type == "linear":  # positions divided by `factor` (Gemma 3's global layers)
        _real("rope scaling factor", rope.get("factor"), where)
    if rope_type == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings") if k not in rope]
        if missing:
            raise CheckpointError(f"{where}: llama3 rope scaling lacks {', '.join(missing)}")
        for k in ("factor", "low_freq_factor", "high_freq_factor"):
            _real(f"rope scaling {k}", rope[k], where)
        if rope["factor"] < 1:  # transformers' check too: the factor stretches long wavelengths, never shrinks them
            raise CheckpointError(f"{where}: rope scaling factor must be at least 1, got {rope['factor']}")
        _whole("rope scaling original_max_position_embeddings", rope["original_max_position_embeddings"],
               LIMITS["max_position_embeddings"], where)
        if rope["high_freq_factor"] <= rope["low_freq_factor"]:  # the blend between them divides by the difference
            raise CheckpointError(f"{where}: llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                                  f"{rope['high_freq_factor']} and {rope['low_freq_factor']}")
    return rope


def _reject_unsupported(cfg: dict, model_type: str, where: str) -> None:
    # hidden_act and the window: models/families.py family_fields
    if model_type not in MOE and (cfg.get("num_local_experts") or cfg.get("num_experts")):
        raise CheckpointError(f"{where}: mixture-of-experts models are not supported")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise CheckpointError(f"{where}: pretraining_tp={_show(cfg['pretraining_tp'])} is not supported; use 1")


# ---- one JSON value each, its type checked; `where` (the file) starts the message when given ----------
def _get(cfg: dict, key: str, default):
    """cfg[key], or `default` when the key is absent or null (transformers writes null for "the default")."""
    v = cfg.get(key)
    return default if v is None else v


def _whole(name: str, value, limit: int | None = None, where: str = "") -> int:
    at = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise CheckpointError(f"{at}{name} must be a whole number, got {_show(value)}")
    if value <= 0:
        raise CheckpointError(f"{at}config field {name} must be positive, got {value}")
    if limit is not None and value > limit:
        raise CheckpointError(f"{at}{name} is {value:,}, more than the {limit:,} this engine builds (far above any "
                              "released model): the file is corrupted or not this model's")
    return int(value)


def _real(name: str, value, where: str = "", above: float = 0.0) -> float:
    at = f"{where}: " if where else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= above:
        what = "a positive number" if above == 0 else f"a number above {above:g}"
        raise CheckpointError(f"{at}{name} must be {what}, got {_show(value)}")
    return float(value)


def _flag(cfg: dict, key: str, where: str, default: bool = False) -> bool:
    v = _get(cfg, key, default)
    if not isinstance(v, bool):
        raise CheckpointError(f"{where}: {key} must be true or false, got {_show(v)}")
    return v


def _object(cfg: dict, key: str, where: str) -> dict:
    """A copy of the JSON object cfg[key] ({} when absent or null)."""
    v = _get(cfg, key, {})
    if not isinstance(v, dict):
        raise CheckpointError(f"{where}: {key} must be a JSON object, got {_json_type(v)} {_show(v)}")
    return dict(v)


def _json_type(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _show(v) -> str:
    """repr(v) cut to a readable length: a hostile file's value may be megabytes long."""
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."
