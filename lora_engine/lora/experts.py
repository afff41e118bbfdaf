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
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from lora_engine.models.gpt_oss import GptOssExperts
from lora_engine.models.moe import Experts
from lora_engine.quant.nf4_experts import EXPERT_WEIGHTS, NF4ExpertWeights, expert_slices

MOE_TARGETS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


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
