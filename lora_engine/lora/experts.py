"""LoRA on mixture-of-experts weights: PEFT's `target_parameters` on the 3-D expert parameters.

For expert weights W (E, N, K) (models/moe.py: gate_up_proj (E, 2F, D), down_proj (E, D, F)) each expert
gets its own low-rank update, y_e = x_e W_e^T + s (x_e A_e^T) B_e^T with A_e (r, K), B_e (N, r), computed
by the grouped op's a/b arguments, never forming W_e + s B_e A_e.

The factors are kept in PEFT 0.21's ParamWrapper layout, so the adapter file is PEFT's byte for byte:
  lora_A (r*E, K)  row e*r + j is A_e's row j         -> a = lora_A.view(E, r, K)
  lora_B (N, r*E)  column j*E + e is B_e's column j   -> b = lora_B.view(N, r, E).permute(2, 0, 1)
PEFT wraps each targeted parameter of a module in one ParamWrapper, in the module's parameter order
(gate_up_proj, then down_proj), each wrapping the previous: the last is outermost, so in the file
`<experts path>.lora_A.weight` is the last targeted parameter's and each earlier one sits one
`base_layer.` deeper. PEFT's own limits carry over: no dropout, no DoRA, no lora_bias on these weights.
The router (`mlp.gate`) stays frozen unless the user targets it (it is an nn.Linear: target_modules).

PEFT also reads the MLP projection names as the experts on the families whose experts transformers v5
fused into 3-D parameters (peft_targets below), so one LoraConfig means the same thing here and there.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn as nn

from lora_engine.models.gpt_oss import GptOssExperts
from lora_engine.models.moe import Experts
from lora_engine.quant.nf4_experts import EXPERT_WEIGHTS, NF4ExpertWeights, expert_slices

MOE_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# PEFT 0.22 (utils/transformers_weight_conversion.py, _convert_peft_config_moe, called by every LoRA
# injection under transformers v5) rewrites a LoraConfig on these families: the per-expert projection names
# of transformers v4 become target_parameters on the fused 3-D weights, gate and up together (naming one
# alone is an error), and the fused gate_up_proj gets rank 2r and alpha 2*alpha so each half keeps alpha/r.
# "all-linear" is resolved first, so it reaches the experts too. Mixtral's v4 names were w1/w3/w2; its
# gate_proj/up_proj/down_proj (our CLI's default list) are read the same way here, where PEFT would leave
# every expert silently frozen; gpt-oss likewise (no module has those names, so PEFT skips them silently).
_QWEN2_MOE = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
PEFT_EXPERT_NAMES = {"qwen3_moe": _QWEN2_MOE, "olmoe": _QWEN2_MOE, "gpt_oss": _QWEN2_MOE,
                     "mixtral": {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj", **_QWEN2_MOE}}
_FUSED_HALVES = {"qwen3_moe": ("gate_proj", "up_proj"), "olmoe": ("gate_proj", "up_proj"),
                 "gpt_oss": ("gate_proj", "up_proj"), "mixtral": ("w1", "w3")}


class LoraExperts(Experts):
    """Experts whose `factors` returns the per-expert LoRA of each targeted parameter (lora_<name>_A/_B)."""

    def factors(self, name: str):
        if name not in self.lora:
            return None, None, 1.0
        lora = self.lora[name]
        w = self.grouped_weight(name)
        E, N, K = w.shape
        a = lora.lora_A.view(E, -1, K)  # (E, r, K)
        b = lora.lora_B.view(N, -1, E).permute(2, 0, 1)  # (E, N, r)
        return a.to(w.dtype), b.to(w.dtype), lora.scale


class LoraGptOssExperts(LoraExperts, GptOssExperts):
    """gpt-oss's experts (their forward, (E, K, N) storage) with LoraExperts' factors."""


class _Factors(nn.Module):
    def __init__(self, E: int, N: int, K: int, r: int, alpha: float, scale: float, dtype, device):
        super().__init__()
        self.r, self.lora_alpha, self.scale = r, alpha, scale
        self.lora_A = nn.Parameter(torch.empty(r * E, K, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(N, r * E, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init_lora_weights=True


def peft_targets(model: nn.Module, config):
    """`config` as PEFT rewrites it for this model (PEFT_EXPERT_NAMES above); the same config where nothing
    is rewritten. ValueError where gate and up are not named together, as PEFT's."""
    mapping = PEFT_EXPERT_NAMES.get(getattr(getattr(model, "config", None), "model_type", None))
    if not mapping or not expert_modules(model):
        return config
    t = config.target_modules
    all_linear = isinstance(t, str) and t.lower() == "all-linear"
    if isinstance(t, str) and not all_linear:
        return config  # a regular expression names modules as the user wrote it
    names = set(mapping) if all_linear else {n.rsplit(".", 1)[-1] for n in t}
    hit = {n: mapping[n] for n in names if n in mapping}
    if not hit:
        return config
    halves = _FUSED_HALVES[model.config.model_type]
    if not all_linear:
        for pair in (halves, ("gate_proj", "up_proj")):
            named = [n for n in pair if n in hit]
            if len(named) == 1:
                other = next(n for n in pair if n not in hit)
                raise ValueError(f"LoraConfig.target_modules: {named[0]!r} without {other!r}: the experts keep "
                                 f"them fused in one gate_up_proj parameter; name both or neither (as PEFT requires)")
    params = list(config.target_parameters) + [f"mlp.experts.{p}" for p in sorted(set(hit.values()))
                                               if f"mlp.experts.{p}" not in config.target_parameters]
    ranks, alphas = dict(config.rank_pattern), dict(config.alpha_pattern)
    if "gate_up_proj" in hit.values():
        ranks[r".*\.gate_up_proj"] = 2 * config.r  # PEFT's key and values, so the saved config is PEFT's
        alphas[r".*\.gate_up_proj"] = 2 * config.lora_alpha
    linear = {n: n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if all_linear:  # PEFT resolves it to the linear layers' leaf names first, each of which stays a module target
        modules = tuple(sorted({leaf for n, leaf in linear.items() if n != "lm_head"}))
    else:  # PEFT 0.22: a name that also names linear layers (a dense layer's MLP, Qwen3-MoE's mlp_only_layers)
        leaves = set(linear.values())  # keeps them as module targets beside the experts
        modules = tuple(n for n in t if n.rsplit(".", 1)[-1] not in hit or n.rsplit(".", 1)[-1] in leaves)
    return dataclasses.replace(config, target_modules=modules, target_parameters=tuple(params),
                               rank_pattern=ranks, alpha_pattern=alphas)


def expert_modules(model: nn.Module) -> dict[str, Experts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Experts)}


def _weight_names(m: Experts) -> list[str]:
    # QLoRA: the expert weights are NF4ExpertWeights (quant/nf4_experts.py), not parameters; same names, same order
    nf4 = [n for n in EXPERT_WEIGHTS if isinstance(getattr(m, n, None), NF4ExpertWeights)]
    return nf4 + [n for n, _ in m.named_parameters(recurse=False)]


def expert_targets(model: nn.Module, targets) -> dict[str, list[str]]:
    """{experts module path: [targeted parameter names, in the module's order]} for PEFT's target_parameters
    (each a full `path.param` or a suffix of one); ValueError naming a target that matches nothing."""
    modules = expert_modules(model)
    out, used = {}, set()
    for path, m in modules.items():
        for name in _weight_names(m):
            key = f"{path}.{name}"
            hit = [t for t in targets if key == t or key.endswith("." + t)]
            if hit:
                out.setdefault(path, []).append(name)
                used.update(hit)
    unused = [t for t in targets if t not in used]
    if unused:
        where = "the model has no mixture-of-experts layers" if not modules else \
            f"its expert parameters are named like {next(iter(modules))}.gate_up_proj"
        raise ValueError(f"LoraConfig.target_parameters: {unused[0]!r} matches no parameter ({where}); "
                         f"for the experts use target_parameters={list(MOE_TARGETS)}")
    return out


def apply_expert_lora(model: nn.Module, config, scale_of, adapter_dtype) -> int:
    """Per-expert LoRA on config.target_parameters (parameters already frozen); returns how many parameters.
    scale_of(r, alpha) -> the LoRA scale (lora/layers.py lora_scale with the config's rsLoRA flag)."""
    targets = expert_targets(model, config.target_parameters)
    if targets and (config.use_dora or config.lora_dropout):
        raise ValueError("LoraConfig: LoRA on expert parameters (target_parameters) supports neither use_dora nor "
                         "lora_dropout (PEFT's ParamWrapper neither); set them off or drop target_parameters")
    for path, names in targets.items():
        m = model.get_submodule(path)
        if isinstance(m, LoraExperts):
            raise ValueError(f"the model already has expert LoRA ({path}); apply_lora once per model")
        # same parameters, a forward that adds the factors
        m.__class__ = LoraGptOssExperts if isinstance(m, GptOssExperts) else LoraExperts
        m.lora = nn.ModuleDict()
        for name in names:
            w = m.grouped_weight(name)
            r, alpha = config.rank_and_alpha(f"{path}.{name}")
            m.lora[name] = _Factors(*w.shape, r, alpha, scale_of(r, alpha),
                                    adapter_dtype or w.dtype, w.device)
    return sum(len(v) for v in targets.values())


def factor_records(model: nn.Module) -> dict[str, _Factors]:
    """{`experts path.parameter`: its factors (r, lora_alpha)} for every expert LoRA of the model."""
    return {f"{path}.{name}": f for path, m in expert_modules(model).items() if isinstance(m, LoraExperts)
            for name, f in m.lora.items()}


def adapter_keys(model: nn.Module, prefix: str) -> dict[str, tuple[nn.Parameter, tuple[int, ...]]]:
    """{adapter file key: (the factor on the model, its shape)} of every expert LoRA (PEFT's nesting)."""
    out = {}
    for path, m in expert_modules(model).items():
        loras = list(getattr(m, "lora", {}).values())
        for depth, lora in enumerate(reversed(loras)):
            base = f"{prefix}{path}.{'base_layer.' * depth}"
            out[base + "lora_A.weight"] = (lora.lora_A, tuple(lora.lora_A.shape))
            out[base + "lora_B.weight"] = (lora.lora_B, tuple(lora.lora_B.shape))
    return out


def expected_keys(model: nn.Module, config, prefix: str) -> dict[str, tuple[int, ...]]:
    """{adapter file key: shape} that config.target_parameters asks of this model (before or after
    apply_expert_lora): lora_A (r*E, K), lora_B (N, r*E) per targeted parameter, PEFT's nesting."""
    out = {}
    for path, names in expert_targets(model, config.target_parameters).items():
        m = model.get_submodule(path)
        for depth, name in enumerate(reversed(names)):
            E, N, K = m.grouped_weight(name).shape
            r = config.rank_and_alpha(f"{path}.{name}")[0]
            base = f"{prefix}{path}.{'base_layer.' * depth}"
            out[base + "lora_A.weight"], out[base + "lora_B.weight"] = (r * E, K), (N, r * E)
    return out


def targeted(model: nn.Module) -> list[str]:
    """The `path.param` keys that carry an expert LoRA, sorted (the adapter config's target_parameters)."""
    return sorted({f"{path}.{name}".split(".layers.")[-1].split(".", 1)[-1]
                   for path, m in expert_modules(model).items() for name in getattr(m, "lora", {})})


def merged_deltas(model: nn.Module) -> dict:
    """{checkpoint key of an expert weight (models/moe.py:checkpoint_views' per-expert layout): a function
    returning its LoRA update in fp32}, for merged export: rows of s B_e A_e (N, K) per stored tensor, each
    computed when that tensor is written, so the layer's (E, N, K) update never exists at once."""
    out = {}
    for path, m in expert_modules(model).items():
        for name, lora in getattr(m, "lora", {}).items():
            shape = m.grouped_weight(name).shape  # (E, N, K), the factors' layout
            if isinstance(m, GptOssExperts):  # stored (E, K, N), one tensor in its checkpoint
                out[f"{path}.{name}"] = functools.partial(_delta_transposed, lora, shape)
                continue
            for key, slices in expert_slices(model.config.model_type, f"{path}.{name}", shape).items():
                out[key] = functools.partial(_delta, lora, shape, slices)
    return out


def _delta(lora: _Factors, shape, slices) -> torch.Tensor:
    E, N, K = shape
    a = lora.lora_A.detach().float().view(E, -1, K)  # (E, r, K)
    b = lora.lora_B.detach().float().view(N, -1, E)  # (N, r, E)
    return torch.cat([lora.scale * (b[row: row + n, :, e] @ a[e]) for e, row, n in slices])


def _delta_transposed(lora: _Factors, shape) -> torch.Tensor:
    E, N, K = shape
    return _delta(lora, shape, [(e, 0, N) for e in range(E)]).view(E, N, K).transpose(1, 2)
