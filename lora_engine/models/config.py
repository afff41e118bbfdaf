"""ModelConfig: the architecture hyper-parameters, read from a Hugging Face config.json.

Supported families are the decoder-only Llama relatives that differ only in small switches:

  llama    (incl. Llama-3.1 rope_scaling of type "llama3"; optional attention/mlp bias)
  mistral  (sliding window must not be in use)
  qwen2    (bias on q/k/v projections)
  qwen3    (RMSNorm on q and k per head)

Everything else raises ValueError naming what is supported, rather than loading a model that
silently computes something else.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


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
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # the raw config.json

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")

    @classmethod
    def from_hf(cls, path: str | Path | dict) -> ModelConfig:
        """Read a Hugging Face config.json (a path to the file or its folder, or the parsed dict)."""
        if isinstance(path, dict):
            cfg, where = path, "config"
        else:
            p = Path(path)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise FileNotFoundError(f"no config.json at {p}")
            try:
                cfg = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} is not valid JSON: {e}") from e
            where = str(p)
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{where}: model_type {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        _reject_unsupported(cfg, model_type, where)
        rope = _rope_parameters(cfg, where)
        heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        attention_bias = bool(cfg.get("attention_bias", False))
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            torch_dtype=str(dtype).replace("torch.", ""),
            extra=cfg,
        )

    def to_hf(self) -> dict:
        """The config.json that transformers reads for this model, built from the fields (not `extra`):
        ModelConfig.from_hf(c.to_hf()) == c. Raises ValueError when the switches (biases, q/k norm)
        do not fit what the family's transformers class computes."""
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


def _rope_parameters(cfg: dict, where: str) -> dict:
    # transformers >= 5 writes `rope_parameters`; older files carry rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or {})
    if not rope:
        rope = dict(cfg.get("rope_scaling") or {})
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{where}: rope scaling type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    rope["rope_type"] = rope_type
    if rope_type == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor",
                               "original_max_position_embeddings") if k not in rope]
        if missing:
            raise ValueError(f"{where}: llama3 rope scaling lacks {', '.join(missing)}")
    return rope


def _reject_unsupported(cfg: dict, model_type: str, where: str) -> None:
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r} is not supported; supported: silu")
    if cfg.get("num_local_experts") or cfg.get("num_experts"):
        raise ValueError(f"{where}: mixture-of-experts models are not supported")
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", model_type == "mistral")
    max_pos = cfg.get("max_position_embeddings", 2048)
    if uses_window and window is not None and window < max_pos:
        raise ValueError(
            f"{where}: sliding-window attention (window {window} < {max_pos} positions) is not supported; "
            "only full attention is implemented"
        )
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"{where}: pretraining_tp={cfg['pretraining_tp']} is not supported; use 1")
