"""NF4 (QLoRA) mixture-of-experts layers: each expert's 2-D slice quantized on its own.

An MoE layer's experts (models/moe.py: gate_up_proj (E, 2F, D), down_proj (E, D, F)) become, per
parameter, a list of E NF4Tensors, expert e's (N, K) slice each: the bytes bitsandbytes'
quantize_4bit writes for that same 2-D tensor (blocks over the flattened slice, the same blocksize and
double quantization as the dense layers). dispatch.moe_grouped_mm takes the list as it is and
dequantizes one active expert at a time (kernels/moe_nf4.py), so the layer's dense (E, N, K) never
exists. The router (`mlp.gate`, E x D) stays in full precision: transformers v5 holds it as a plain
Parameter (Qwen3MoeTopKRouter), which bitsandbytes' swap of nn.Linear leaves alone, and its logits
pick the experts, so rounding them to 4 bits would change which experts run.

gpt-oss (models/gpt_oss.py) stores its experts (E, K, N): gate_up_proj (E, D, 2F) with gate and up in interleaved
columns, down_proj (E, F, D), and biases. Its slices are quantized as stored, expert e's (K, N), the bytes
bitsandbytes writes for transformers' `gate_up_proj[e]`; `transpose(1, 2)` (GptOssExperts.grouped_weight)
hands the grouped op the same slices marked `transposed`, so it multiplies by them without transposing them
back, and the interleaving is untouched. The biases stay in full precision, as bitsandbytes keeps every bias.
"""

from __future__ import annotations

import torch
from torch import nn

from lora_engine import dispatch
from lora_engine.kernels.nf4_format import NF4Tensor
from lora_engine.models.moe import Experts, MoEBlock

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # the 3-D parameters of models/moe.py:Experts, in its order


class NF4ExpertWeights(list):
    """E NF4Tensors (None while a loader fills them), expert e's (N, K) slice each. `shape` (E, N, K),
    `dtype` (the compute dtype) and `device` stand in for the 3-D parameter's, so expert LoRA
    (lora/experts.py) sizes and places its factors from them as from the dense weight."""

    def __init__(self, weights, shape: tuple[int, int, int], dtype: torch.dtype, device=None, transposed=False):
        super().__init__(weights)
        self.shape, self.dtype = torch.Size(shape), dtype
        self._device = torch.device("meta" if device is None else device)
        self.transposed = transposed  # each slice is (shape[2], shape[1]): a stored (E, K, N) seen as (E, N, K)

    def transpose(self, dim0: int, dim1: int) -> NF4ExpertWeights:
        """The same slices seen with their last two dimensions swapped (no copy), as Tensor.transpose(1, 2)."""
        if sorted((dim0 % 3, dim1 % 3)) != [1, 2]:
            raise ValueError(f"NF4ExpertWeights.transpose({dim0}, {dim1}): only the last two dimensions of the "
                             "(E, N, K) experts can be swapped")
        E, N, K = self.shape
        return NF4ExpertWeights(self, (E, K, N), self.dtype, self._device, not self.transposed)

    @property
    def device(self) -> torch.device:
        return self[0].device if self and self[0] is not None else self._device

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self if w is not None)


def routers(model: nn.Module) -> set[str]:
    """Module paths of the MoE routers (kept in full precision by every NF4 swap): `gate`, gpt-oss's `router`."""
    return {f"{name}.{leaf}" if name else leaf for name, m in model.named_modules() if isinstance(m, MoEBlock)
            for leaf in ("gate", "router") if isinstance(getattr(m, leaf, None), nn.Linear)}


def expert_modules(model: nn.Module) -> dict[str, Experts]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Experts)}


def _replace(m: Experts, name: str, weights: NF4ExpertWeights) -> None:
    m._parameters.pop(name, None)  # a registered Parameter cannot be assigned a list
    setattr(m, name, weights)


def empty_experts(model: nn.Module) -> dict[str, Experts]:
    """Every Experts module's 3-D parameters replaced by NF4ExpertWeights of E Nones (a loader fills them,
    so the full-precision experts are never allocated); returns {path: module}."""
    mods = expert_modules(model)
    for m in mods.values():
        for name in EXPERT_WEIGHTS:
            p = getattr(m, name)
            _replace(m, name, NF4ExpertWeights([None] * p.shape[0], p.shape, p.dtype))
    return mods


def quantize_experts(model: nn.Module, blocksize: int = 64, double_quant: bool = True) -> int:
    """In place: each Experts module's gate_up_proj and down_proj -> NF4ExpertWeights, slice by slice;
    returns how many expert slices were quantized."""
    n = 0
    for m in expert_modules(model).values():
        for name in EXPERT_WEIGHTS:
            p = getattr(m, name)
            if isinstance(p, NF4ExpertWeights):
                continue
            w = p.detach()
            _replace(m, name, NF4ExpertWeights([dispatch.nf4_quantize(w[e], blocksize, double_quant, None)
                                                for e in range(w.shape[0])], w.shape, w.dtype, w.device))
            n += w.shape[0]
    return n


def dequantize_experts(model: nn.Module, dtype: torch.dtype | None = None) -> int:
    """In place: NF4ExpertWeights back to frozen 3-D Parameters of the dequantized slices (e.g. to export);
    returns how many parameters were replaced."""
    n = 0
    for m in expert_modules(model).values():
        for name in EXPERT_WEIGHTS:
            w = getattr(m, name)
            if isinstance(w, NF4ExpertWeights):
                dt = dtype or w.dtype
                dense = torch.stack([dispatch.nf4_dequantize(s, dt, backend=None) for s in w])
                delattr(m, name)
                m.register_parameter(name, nn.Parameter(dense, requires_grad=False))
                n += 1
    return n


def nf4_expert_tensors(model: nn.Module) -> list[NF4Tensor]:
    """Every expert slice held in NF4 (for the memory report)."""
    return [s for m in expert_modules(model).values() for name in EXPERT_WEIGHTS
            if isinstance(w := getattr(m, name), NF4ExpertWeights) for s in w if s is not None]


def expert_slices(model_type: str, key: str, shape, stored: set[str] | None = None) -> dict[str, list[tuple]]:
    """{checkpoint key: [(expert, first row, rows), ...]} of the 3-D expert parameter `key` of `shape` (E, N, K):
    which rows of which experts each stored tensor holds, in the layout models/moe.py:checkpoint_views maps
    (gate_proj and up_proj as row blocks of gate_up_proj[e]; v5's 3-D key, every expert, when `stored` has it)."""
    from lora_engine.models.moe import checkpoint_views

    E, N = shape[0], shape[1]
    # checkpoint_views applied to an index tensor: its views carry their (expert, row) as values, so the key
    # map stays the one in models/moe.py
    index = torch.arange(E * N).view(E, N, 1)
    out = {}
    for name, view in checkpoint_views(model_type, {key: index}, stored).items():
        rows = view.reshape(-1)
        out[name] = [(*divmod(int(rows[i]), N), min(N, rows.numel() - i)) for i in range(0, rows.numel(), N)]
    return out


def loading_hook(model_type: str, mods: dict[str, Experts], stored: set[str], quantize):
    """(placeholders, hook, finish) for the strict loader: the 3-D parameters as meta placeholders (the
    loader maps them onto the checkpoint's per-expert names and checks their shapes), and a hook (with
    `hook.put_expert(key, e, slice)` for a slice another hook made) that takes each stored expert tensor,
    collects an expert's rows (gate_proj and up_proj are stored apart) and quantizes the whole (N, K) slice with
    `quantize(w)` once it is complete; finish reports slices left incomplete. stored: the checkpoint's keys (a
    folder holding v5's 3-D keys keeps those)."""
    placeholders, where = {}, {}
    for path, m in mods.items():
        for name in EXPERT_WEIGHTS:
            weights = getattr(m, name)
            placeholders[f"{path}.{name}"] = torch.empty(*weights.shape, device="meta")
            for key, slices in expert_slices(model_type, f"{path}.{name}", weights.shape, stored).items():
                where[key] = (weights, slices)
    pending: dict[tuple[int, int], dict[int, torch.Tensor]] = {}

    def put_expert(key: str, e: int, w: torch.Tensor) -> None:
        """Expert e's whole slice of the 3-D parameter `key` (as stored), read by another hook (gpt-oss's MXFP4
        experts, dequantized one at a time: models/gpt_oss.py read_mxfp4): quantized at once."""
        weights, _ = where[key]
        weights[e] = quantize(w)

    def hook(t) -> bool:
        if t.name not in where:
            return False
        weights, slices = where[t.name]
        data = t.read().reshape(-1, t.shape[-1])  # (rows, K): one expert's part, or every expert's
        at = 0
        for e, row, n in slices:
            parts = pending.setdefault((id(weights), e), {})
            parts[row] = data[at: at + n]
            at += n
            if sum(p.shape[0] for p in parts.values()) == weights.shape[1]:
                weights[e] = quantize(torch.cat([parts[k] for k in sorted(parts)]))
                del pending[(id(weights), e)]  # the full-precision rows go before the next tensor is read
        return True

    def finish() -> list[str]:
        return [f"expert {e} of a mixture-of-experts layer is incomplete in the checkpoint" for _, e in pending]

    hook.put_expert = put_expert
    return placeholders, hook, finish
