"""LoRA: low-rank adapters on the linear layers of a model, in PEFT's conventions.

One idea over ~480 lines: the LoRA module and the functions that apply, merge and count it.

    y = x W^T (+ b) + s * dropout(x) A^T B^T        A: (r, in), B: (out, r), s = alpha / r
                                                     (alpha / sqrt(r) with rsLoRA)

`apply_lora` swaps each targeted `nn.Linear` for a `LoraLinear` that owns the frozen base `weight`
(and `bias`) directly, torchtune style, so the base keys (`...q_proj.weight`) are unchanged in the
state dict and the adapter adds only `...q_proj.lora_A` and `...q_proj.lora_B`. The forward goes
through the project's one dispatch point (lora_engine.dispatch.lora_linear), so the Triton kernels
and an NF4 base weight (QLoRA) plug in without touching this file.

Adapter dtype: A and B are created in fp32 by default, whatever the base dtype. With a bf16 base
the optimizer then updates fp32 values (bf16 adapters lose small updates to rounding), and the
cost is negligible (r * (in + out) values per layer). In the forward they are cast to the
activation dtype, so the kernels see one dtype; autograd carries the gradient back to fp32.
PEFT keeps adapters in the base dtype unless autocast is used; pass adapter_dtype=None for that.

Target names follow PEFT: a name matches a module whose path equals it or ends with "." + name;
a single string is a regular expression matched against the whole path; "all-linear" means every
linear layer but the output head. rank_pattern / alpha_pattern override r / lora_alpha for the
modules whose path ends with one of their keys (regular expressions, PEFT's `get_pattern_key`).

DoRA (use_dora=True, PEFT's formulation, peft/tuners/lora/dora.py and variants.py): a trainable
magnitude m (out,), initialised to the row norms of W + s·B@A (= ||W||_row since B = 0), and

    y = m / ||W + s·B@A||_row ⊙ (x W^T + s · x A^T B^T) + b

where the norm is computed without gradient (the DoRA paper, section 4.3: "treating ||V + ΔV||_c as a
constant"). With dropout in training PEFT applies the magnitude to the dropped input only:
y = x W^T + b + (m/n - 1) ⊙ dropout(x) W^T + m/n ⊙ s · dropout(x) A^T B^T; so does this file. The
norm needs the dense W (dequantized on the fly for an NF4 base, QDoRA) and one (out, in) fp32
temporary per layer and forward: that is DoRA's extra cost over LoRA.

modules_to_save (PEFT's name): modules trained in full beside the adapter, e.g. embed_tokens and
lm_head for added tokens. Each gets its own trainable copy of its parameters (as PEFT's
ModulesToSaveWrapper does), so a tied embedding and head come apart, exactly as in PEFT.

Functions that change a model in place return the model, as PEFT's do (apply_lora, merge_lora,
unmerge_lora, adapter.load_adapter); counts come from count_parameters, layers from lora_layers.
Summaries go to this module's logger (`logging`), not to stdout.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_engine import dispatch
from lora_engine.kernels.nf4_format import NF4Tensor
from lora_engine.lora import experts
from lora_engine.lora.names import PatternError, compile_pattern, fullmatch, match_names
from lora_engine.models.families import FUSED
from lora_engine.quant import nf4, nf4_experts

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"

logger = logging.getLogger(__name__)


@dataclass
class LoraConfig:
    """PEFT's field names, so a config moves over unchanged. Invalid values raise ValueError naming the field."""

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()
    # PEFT's LoRA on raw parameters: the 3-D experts of an MoE model (lora/experts.py)
    target_parameters: tuple[str, ...] = ()

    def __post_init__(self):
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        d = self.lora_dropout
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be a number in [0, 1), got {d!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"LoraConfig.use_rslora must be True or False, got {self.use_rslora!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}")
        m = () if self.modules_to_save is None else self.modules_to_save
        if isinstance(m, str) or not isinstance(m, (list, tuple)) or not all(isinstance(n, str) and n for n in m):
            raise ValueError(f"LoraConfig.modules_to_save must be a list of module names such as ['embed_tokens', "
                             f"'lm_head'], got {self.modules_to_save!r}")
        self.modules_to_save = tuple(m)
        tp = () if self.target_parameters is None else self.target_parameters
        if isinstance(tp, str) or not isinstance(tp, (list, tuple)) or not all(isinstance(n, str) and n for n in tp):
            raise ValueError(f"LoraConfig.target_parameters must be a list of parameter names such as "
                             f"['mlp.experts.gate_up_proj'], got {self.target_parameters!r}")
        self.target_parameters = tuple(tp)
        t = self.target_modules
        if self.target_parameters and (t is None or isinstance(t, (list, tuple, set, frozenset)) and not t):
            self.target_modules = ()  # PEFT's config of LoRA on expert parameters alone (target_modules null)
        elif isinstance(t, str):
            if not t:
                raise ValueError("LoraConfig.target_modules is empty; name at least one module, e.g. 'q_proj'")
            try:
                compile_pattern(t)
            except PatternError as e:
                raise ValueError(f"LoraConfig.target_modules {e}") from e
        else:
            t = tuple(t) if isinstance(t, (list, tuple, set, frozenset)) else None
            if not t or not all(isinstance(n, str) and n for n in t):
                raise ValueError(
                    f"LoraConfig.target_modules must be a non-empty list of module names (or one regular "
                    f"expression), got {self.target_modules!r}"
                )
            self.target_modules = tuple(sorted(t)) if isinstance(self.target_modules, (set, frozenset)) else t
        for name in ("rank_pattern", "alpha_pattern"):
            pattern = getattr(self, name)
            if pattern is None:
                setattr(self, name, {})
                continue
            if not isinstance(pattern, dict):
                raise ValueError(f"LoraConfig.{name} must be a dict {{module pattern: value}}, got {pattern!r}")
            check = _check_rank if name == "rank_pattern" else _check_alpha
            for key, value in pattern.items():
                check(f"{name}[{key!r}]", value)
                try:
                    compile_pattern(key)
                except PatternError as e:
                    raise ValueError(f"LoraConfig.{name} key {e}") from e

    def rank_and_alpha(self, path: str) -> tuple[int, float]:
        """(r, lora_alpha) for the module at `path`, after rank_pattern and alpha_pattern."""
        r = self.rank_pattern[k] if (k := _pattern_key(self.rank_pattern, path)) else self.r
        alpha = self.alpha_pattern[k] if (k := _pattern_key(self.alpha_pattern, path)) else self.lora_alpha
        return r, alpha


def _check_rank(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"LoraConfig.{name} (the rank) must be a positive integer, got {value!r}")


def _check_alpha(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"LoraConfig.{name} must be a positive finite number, got {value!r}")


def _pattern_key(pattern: dict, path: str) -> str | None:
    # PEFT's get_pattern_key: the first key that matches a dotted suffix of the module path.
    for key in pattern:
        if fullmatch(rf"(?:.*\.)?(?:{key})", path):  # re.match(rf"(.*\.)?({key})$", ...) without backtracking
            return key
    return None


def lora_scale(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (rank-stabilized: the update's size stops shrinking with r)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

    weight: (out, in), frozen; bias: (out,) or None, frozen; lora_A: (r, in), kaiming-uniform
    (a = sqrt(5), like nn.Linear and PEFT); lora_B: (out, r), zeros, so the layer starts as the base.
    With use_dora: lora_magnitude_vector (out,), the row norms of W (see the module docstring).
    forward: x (..., in) -> (..., out) in x's dtype.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: torch.dtype | None = torch.float32, use_dora: bool = False):
        super().__init__()
        _check_rank("r", r)
        _check_alpha("lora_alpha", lora_alpha)
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
        if weight.dim() != 2:
            raise ValueError(f"LoraLinear: weight must be (out, in), got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if isinstance(weight, NF4Tensor):  # QLoRA: the frozen 4-bit base is kept as is (quant/nf4.py)
            self.weight = weight
        else:
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
            self.weight.requires_grad_(False)
        if bias is not None:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        dtype = adapter_dtype or weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scale = lora_scale(r, lora_alpha, use_rslora)
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.backend: str | None = None
        self.use_dora = use_dora
        if use_dora:
            self.lora_magnitude_vector = nn.Parameter(self.weight_norm().to(dtype))
        else:
            self.register_parameter("lora_magnitude_vector", None)
        self._merged_norm: torch.Tensor | None = None  # DoRA: the norm used by merge, needed by unmerge
        self.disabled = False  # adapters_disabled(model): the base layer alone (DPO's reference model)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float, **kw) -> LoraLinear:
        """Wrap an nn.Linear; the new layer shares (does not copy) its weight and bias."""
        return cls(linear.weight, linear.bias, r, lora_alpha, **kw)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"scale={self.scale:g}, dora={self.use_dora}, merged={self.merged}")

    def base_linear(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T (+ b): the base matmul alone (used once merged). A quantized base replaces this."""
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:  # B @ A already lives in W: adding the LoRA path again would count it twice
            return self.base_linear(x)
        if self.disabled:
            return self._base(x, self.bias)
        A, B = self.lora_A, self.lora_B
        if A.dtype != x.dtype:  # fp32 adapters on a bf16/fp16 model: compute in the activation dtype
            A, B = A.to(x.dtype), B.to(x.dtype)
        x_dropped = self.dropout(x) if self.training and isinstance(self.dropout, nn.Dropout) else None
        if self.use_dora:
            return self._dora_forward(x, A, B, x_dropped)
        return dispatch.lora_linear(x, self.weight, self.bias, A, B, self.scale, x_dropped=x_dropped,
                                    backend=self.backend)

    def _dora_forward(self, x, A, B, x_dropped):
        # m / ||W + s·BA||_row, the norm a constant (detached) as in PEFT; (out,) fp32
        ratio = self.lora_magnitude_vector.float() / self.weight_norm()
        if x_dropped is None:  # one fused call: ratio ⊙ (x W^T + s x A^T B^T), then the bias
            y = dispatch.lora_linear(x, self.weight, None, A, B, self.scale, backend=self.backend)
            y = y * ratio.to(y.dtype)
            return y + self.bias.to(y.dtype) if self.bias is not None else y
        # PEFT with dropout: the base output of the clean x, the magnitude on the dropped x's paths only
        base = self._base(x, self.bias)
        low_rank = F.linear(F.linear(x_dropped, A), B)
        r = ratio.to(base.dtype)
        return base + (r - 1) * self._base(x_dropped, None) + r * (self.scale * low_rank).to(base.dtype)

    def _base(self, x, bias):
        if isinstance(self.weight, NF4Tensor):
            return dispatch.nf4_linear(x, self.weight, bias, backend=self.backend)
        return F.linear(x, self.weight, bias)

    def dense_weight(self) -> torch.Tensor:
        """The base weight W (out, in) in fp32, dequantized when it is NF4; no gradient."""
        if isinstance(self.weight, NF4Tensor):
            return dispatch.nf4_dequantize(self.weight, torch.float32, backend=self.backend)
        return self.weight.detach().float()

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s·B@A|| of each output row, (out,) fp32, without gradient (DoRA's detached norm)."""
        if self.merged:  # W holds the merged weight; the norm belongs to the unmerged one
            return self._merged_norm
        return torch.linalg.norm(self.dense_weight() + self.delta_lora(), dim=1)

    # An NF4 base is not a Parameter: these hooks keep bitsandbytes' keys in the state dict and move it.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        nf4.save_nf4_weight(self, destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if isinstance(self.weight, NF4Tensor):
            nf4.load_nf4_weight(self, state_dict, prefix, missing, unexpected, errors)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        nf4.move_nf4_weight(self, fn)
        return self

    def delta_lora(self) -> torch.Tensor:
        """s * B @ A as an fp32 (out, in) tensor."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to W, (out, in) fp32: s * B @ A; with DoRA (m/n - 1) ⊙ W + m/n ⊙ s * B @ A, so
        that W + delta = m/n ⊙ (W + s * B @ A) (n = weight_norm(), W dequantized when NF4)."""
        if not self.use_dora:
            return self.delta_lora()
        w, delta = self.dense_weight(), self.delta_lora()
        ratio = (self.lora_magnitude_vector.detach().float() / torch.linalg.norm(w + delta, dim=1)).unsqueeze(1)
        return (ratio - 1) * w + ratio * delta

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + delta_weight(), computed in fp32 and cast once to W's dtype. A second call does nothing."""
        if isinstance(self.weight, NF4Tensor):
            raise ValueError("LoraLinear.merge: the base weight is NF4; merging into 4 bits is lossy. Call "
                             "lora_engine.quant.nf4.dequantize_model(model) first, then merge into the dense weight")
        if not self.merged:
            if self.use_dora:  # unmerge divides by m/n: keep the n of the unmerged weight, as PEFT does
                self._merged_norm = self.weight_norm()
            self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - s * B @ A (DoRA: W / (m/n) - s * B @ A), in fp32: restores W up to one rounding of its dtype."""
        if not self.merged:
            return
        w = self.weight.float()
        if self.use_dora:
            w = w / (self.lora_magnitude_vector.float() / self._merged_norm).unsqueeze(1)
            self._merged_norm = None
        self.weight.copy_((w - self.delta_lora()).to(self.weight.dtype))
        self.merged = False


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """(module path, layer) for every LoraLinear of `model`."""
    for name, m in model.named_modules():
        if isinstance(m, LoraLinear):
            yield name, m


@contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block every LoRA/DoRA layer computes its base layer alone (PEFT's disable_adapter), so the
    model is its own reference without a second copy of the weights. Raises when the adapter is merged or
    the model has modules_to_save (their base values are not kept)."""
    layers = _require_lora(model, "adapters_disabled")
    if any(m.merged for m in layers):
        raise ValueError("adapters_disabled: the LoRA is merged into the weights; call unmerge_lora(model) first")
    saved = getattr(getattr(model, "lora_config", None), "modules_to_save", ())
    if saved:
        raise ValueError(f"adapters_disabled: the model trains modules_to_save {list(saved)} in place, so the base "
                         "model cannot be recovered from it; train without --modules-to-save")
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


def count_parameters(model: nn.Module) -> dict[str, int]:
    """{"trainable": n, "total": n}; a tied (shared) tensor counts once, an NF4 base by its elements."""
    params = list(model.parameters())  # parameters() already skips duplicates
    nf4_bases = {id(m.weight): m.weight.numel for m in model.modules()
                 if isinstance(getattr(m, "weight", None), NF4Tensor)}
    nf4_bases.update({id(w): w.numel for w in nf4_experts.nf4_expert_tensors(model)})  # QLoRA MoE experts
    return {"trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params) + sum(nf4_bases.values())}


def target_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the linear layers named by config.target_modules; raises when a name matches nothing."""
    head = _output_head(model)
    # LoraLinear counts as linear so that load_adapter can match an adapter against a LoRA model.
    linear = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoraLinear, nf4.Linear4bit))}
    t = config.target_modules
    if isinstance(t, str):
        if t.lower() == ALL_LINEAR:
            return [n for n in linear if n != head]
        found = match_names(t, [n for n, _ in model.named_modules() if n])  # re.fullmatch, bounded time
        wanted = {t: found}
    else:
        # Phi-3's stored names (qkv_proj, gate_up_proj: PEFT's targets there) stand for the parts we keep apart
        cfg = getattr(model, "config", None)
        fused = FUSED.get(cfg.model_type, {}) if getattr(cfg, "fused_projections", False) else {}
        parts = {k.rsplit(".", 1)[-1]: [p.rsplit(".", 1)[-1] for p in v] for k, v in fused.items()}
        wanted = {part: [n for n, _ in model.named_modules() if n and (n == part or n.endswith("." + part))]
                  for name in t for part in parts.get(name, [name])}
    for name, found in wanted.items():
        if not found and name in ("gate_proj", "up_proj", "down_proj") and experts.expert_modules(model):
            raise ValueError(f"LoraConfig.target_modules: {name!r} matches no module: the experts of this "
                             "mixture-of-experts model are 3-D parameters, not linear layers; target them with "
                             f"target_parameters={list(experts.MOE_TARGETS)} (and drop {name!r})")
        if not found:
            short = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise ValueError(
                f"LoraConfig.target_modules: {name!r} matches no module of the model; its linear layers "
                f"are named {', '.join(short)} (full paths like {next(iter(linear), '?')!r} work too)"
            )
        not_linear = [n for n in found if n not in linear]
        if not_linear:
            kind = type(model.get_submodule(not_linear[0])).__name__
            raise ValueError(
                f"LoraConfig.target_modules: {name!r} matches {not_linear[0]!r}, a {kind}, not a linear "
                "layer; LoRA applies to linear layers only"
            )
        if head in found:
            raise ValueError(
                f"LoraConfig.target_modules: {name!r} matches the output head {head!r}; LoRA on the head is not "
                "supported (the loss reads its weight directly); target the projections instead"
            )
    order = {n: i for i, n in enumerate(linear)}  # model order, as PEFT would visit them
    return sorted({n for found in wanted.values() for n in found}, key=order.__getitem__)


def saved_module_paths(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules named by config.modules_to_save (PEFT's suffix rule); raises on a name that matches
    nothing, a LoRA target, or a module with an NF4 weight."""
    lora = set(target_paths(model, config)) if config.modules_to_save else set()
    out = []
    for name in config.modules_to_save:
        found = [n for n, _ in model.named_modules() if n and (n == name or n.endswith("." + name))]
        if not found:
            raise ValueError(f"LoraConfig.modules_to_save: {name!r} matches no module of the model (try "
                             "embed_tokens or lm_head)")
        for path in found:
            m = model.get_submodule(path)
            if path in lora or isinstance(m, LoraLinear):
                raise ValueError(f"LoraConfig.modules_to_save: {path!r} is also a LoRA target; train it one way")
            if isinstance(getattr(m, "weight", None), NF4Tensor) or isinstance(m, nf4.Linear4bit):
                raise ValueError(f"LoraConfig.modules_to_save: {path!r} holds an NF4 weight, which cannot be "
                                 "trained; keep it in full precision (load_model quantize_skip)")
            if not any(True for _ in m.parameters(recurse=False)):
                raise ValueError(f"LoraConfig.modules_to_save: {path!r} has no parameters of its own")
            out.append(path)
    return out


def _output_head(model: nn.Module) -> str | None:
    return "lm_head" if isinstance(getattr(model, "lm_head", None), nn.Linear) else None


def apply_lora(model: nn.Module, config: LoraConfig | None = None, *,
               adapter_dtype: torch.dtype | None = torch.float32, verbose: bool = True) -> nn.Module:
    """Put LoRA on the targeted linear layers of `model` (in place) and freeze everything else; returns `model`.

    adapter_dtype: dtype of lora_A / lora_B (fp32 by default, see the module docstring; None = the
    base weight's dtype). Logs a one-line summary (INFO) unless verbose=False; the counts it gives
    are count_parameters(model). The config is kept as `model.lora_config` (save_adapter writes it).
    """
    config = config or LoraConfig()
    existing = [n for n, _ in lora_layers(model)]
    if existing:
        raise ValueError(
            f"the model already has LoRA layers ({existing[0]}, ... {len(existing)} in all); "
            "apply_lora once per model (load_adapter loads weights into existing layers)"
        )
    config = experts.peft_targets(model, config)  # MoE families: the MLP names reach the experts, as in PEFT
    paths = target_paths(model, config)
    saved = saved_module_paths(model, config)  # checked before anything changes
    for p in model.parameters():
        p.requires_grad_(False)
    for path in paths:
        parent_name, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_name)
        r, alpha = config.rank_and_alpha(path)
        layer = LoraLinear.from_linear(getattr(parent, child), r, alpha, lora_dropout=config.lora_dropout,
                                       use_rslora=config.use_rslora, adapter_dtype=adapter_dtype,
                                       use_dora=config.use_dora)
        layer.backend = getattr(model, "backend", None)
        layer.train(parent.training)  # a new module starts in training mode: keep an eval model in eval
        setattr(parent, child, layer)
    n_experts = experts.apply_expert_lora(model, config, lambda r, a: lora_scale(r, a, config.use_rslora),
                                          adapter_dtype)
    if experts.expert_modules(model) and not n_experts:
        logger.warning("LoRA: every expert of this mixture-of-experts model stays frozen (no target_parameters); "
                       f"to train them pass target_parameters={list(experts.MOE_TARGETS)}")
    for path in saved:
        module = model.get_submodule(path)
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(p.detach().clone(), requires_grad=True))
    model.lora_config = config
    if verbose:
        counts = count_parameters(model)
        ranks = sorted({m.r for _, m in lora_layers(model)})
        kind = "DoRA" if config.use_dora else "LoRA"
        logger.info(f"{kind} on {len(paths)} layers (r={'/'.join(map(str, ranks))}): {counts['trainable']:,} "
                    f"trainable of {counts['total']:,} parameters "
                    f"({100 * counts['trainable'] / counts['total']:.3f}%)")
    return model


def _require_lora(model: nn.Module, what: str) -> list[LoraLinear]:
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise ValueError(f"{what}: the model has no LoRA layers; call apply_lora(model, config) first")
    return layers


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W' = W + s * B @ A, fp32 then cast once). Idempotent."""
    for m in _require_lora(model, "merge_lora"):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora: W = W' - s * B @ A, exact up to the rounding of W's dtype. No-op when not merged."""
    for m in _require_lora(model, "unmerge_lora"):
        m.unmerge()
    return model
