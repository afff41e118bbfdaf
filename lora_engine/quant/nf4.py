"""NF4 (QLoRA) weights: quantize, dequantize, 4-bit linear layers, bitsandbytes-compatible checkpoints.

The format and its bitsandbytes state-dict layout: kernels/nf4_format.py. The PyTorch reference
(bit-exact with bitsandbytes 0.50.2): kernels/nf4_reference.py. This module adds the user-facing API:

  quantize(w, blocksize=64, double_quant=True) -> NF4Tensor          (w: (out, in) fp32/fp16/bf16)
  dequantize(w, dtype=None, backend=None) -> Tensor (w.shape)
  Linear4bit: a frozen linear layer whose `weight` is an NF4Tensor; state_dict in bitsandbytes' keys
  quantize_model / dequantize_model: swap nn.Linear <-> Linear4bit by module name (gpt-fast style)
  checkpoints in the transformers + bitsandbytes layout: quant/checkpoint.py

Backends: "torch" the reference, "triton" (kernels/nf4_triton.py), "cpp" (csrc/, torch.ops.lora_engine,
built by setup.py), chosen by lora_engine.dispatch.choose_backend (re-exported here) and nowhere else.
None picks triton for CUDA tensors when triton is usable, cpp for CPU tensors when the extension is
built, else torch. All of them give identical bytes.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lora_engine import dispatch
from lora_engine.dispatch import BACKENDS, choose_backend
from lora_engine.kernels.dtypes import FLOAT_DTYPES as DTYPES
from lora_engine.kernels.nf4_format import (
    NF4Tensor,
    from_bnb_state_dict,
    to_bnb_state_dict,
)
from lora_engine.quant import nf4_experts

# Module names kept in full precision by default: the output head (its logits feed the loss directly
# and, when tied, it is the embedding). Embeddings and norms are not nn.Linear, so never quantized.
DEFAULT_SKIP = ("lm_head",)

__all__ = [
    "BACKENDS", "DEFAULT_SKIP", "NF4Tensor", "Linear4bit", "quantize", "dequantize", "choose_backend",
    "quantize_model", "dequantize_model", "memory_report",
    "save_nf4_weight", "load_nf4_weight", "move_nf4_weight", "expose_nf4_parameters",
]


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, backend: str | None = None) -> NF4Tensor:
    """w (any shape; fp32, fp16 or bf16) -> NF4Tensor, byte for byte what bitsandbytes.functional.quantize_4bit
    (quant_type="nf4", compress_statistics=double_quant) writes. blocksize: 32, 64, ..., 4096."""
    return dispatch.nf4_quantize(w, blocksize, double_quant, backend)


def dequantize(w: NF4Tensor, dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """NF4Tensor -> tensor of w.shape in `dtype` (default w.dtype): code[q] * absmax in fp32, cast once."""
    if not isinstance(w, NF4Tensor):
        raise TypeError(f"nf4.dequantize: expected an NF4Tensor, got {type(w).__name__}")
    dtype = w.dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"nf4.dequantize: dtype {dtype} not supported; use one of {DTYPES}")
    return dispatch.nf4_dequantize(w, dtype, backend=backend)


class Linear4bit(nn.Module):
    """A frozen linear layer with an NF4 weight. x (..., in) -> (..., out) in x's dtype.

    `weight` is the NF4Tensor itself (so LoRA layers can take it over); `bias` a frozen Parameter or
    None. state_dict() uses bitsandbytes' keys (weight, weight.absmax, weight.quant_map, ...), and
    .to(device) moves the NF4 tensors (dtype casts leave the 4-bit format alone).
    """

    def __init__(self, weight: NF4Tensor | None, bias: torch.Tensor | None, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight  # None only while a loader fills the model in
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.backend: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> Linear4bit:
        w = quantize(linear.weight.detach(), blocksize, double_quant)
        return cls(w, linear.bias, linear.in_features, linear.out_features)

    def extra_repr(self) -> str:
        w = self.weight
        fmt = "empty" if w is None else f"blocksize={w.blocksize}, double_quant={w.is_nested}"
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 {fmt}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("Linear4bit: no weight loaded yet (the module was built as a loading placeholder)")
        return dispatch.nf4_linear(x, self.weight, self.bias, backend=self.backend)

    # state_dict / load_state_dict / .to(): the NF4 weight is not a Parameter, these hooks carry it.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        save_nf4_weight(self, destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        load_nf4_weight(self, state_dict, prefix, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        move_nf4_weight(self, fn)
        return self


# Hooks for any module whose `weight` attribute is an NF4Tensor (Linear4bit, and a LoRA layer that took
# one over): bitsandbytes' keys in the state dict, and device moves.
def save_nf4_weight(module: nn.Module, destination: dict, prefix: str) -> None:
    """Add module.weight's bitsandbytes keys (prefix + "weight", "weight.absmax", ...) to `destination`."""
    if isinstance(module.weight, NF4Tensor):
        destination.update(to_bnb_state_dict(module.weight, prefix))


def load_nf4_weight(module: nn.Module, state_dict: dict, prefix: str, missing_keys: list, unexpected_keys: list,
                    error_msgs: list) -> None:
    """Set module.weight from the bitsandbytes keys under `prefix`; call after nn.Module._load_from_state_dict
    (which reports those keys as unexpected: they are taken off that list here)."""
    mine = {k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")}
    unexpected_keys[:] = [k for k in unexpected_keys if k not in mine]
    if prefix + "weight" not in state_dict:
        missing_keys.append(prefix + "weight")
        return
    try:
        w = from_bnb_state_dict(state_dict, prefix, "state_dict")
    except ValueError as e:
        error_msgs.append(str(e))
        return
    want = (module.out_features, module.in_features)
    if w.shape != want:
        error_msgs.append(f"{prefix}weight is an NF4 weight of shape {w.shape}, the layer is {want}")
        return
    old = module.weight
    device = old.device if old is not None else (module.bias.device if module.bias is not None else w.device)
    module.weight = w.to(device)


def move_nf4_weight(module: nn.Module, fn) -> None:
    """Follow a Module._apply: move the NF4 tensors with `fn`'s device; dtype casts leave the format alone."""
    w = module.weight
    if isinstance(w, NF4Tensor):
        moved = fn(w.packed)  # uint8: a float cast returns it unchanged, a move moves it
        if moved.device != w.device:
            module.weight = w.to(moved.device)


# ---- FSDP2 (train/fsdp.py): the NF4 weight as tensors the sharder sees ---------------------------------------------
# An NF4Tensor is a dataclass, not a torch.Tensor, so fully_shard would leave it whole on every rank. Exposed, the
# parts that grow with the weight become frozen 1-D Parameters (FSDP2 shards them along dim 0 and all-gathers them
# as they are: uint8 bytes and fp32/uint8 absmax, never a dense weight), the two code tables (16 and 256 values)
# stay whole as non-persistent buffers, and the NF4Tensor is rebuilt over whatever tensors the module holds when
# its forward starts: the gathered ones inside an FSDP unit's forward. The autograd Functions keep that view for
# backward; it points at FSDP's unsharded parameters, whose storage FSDP frees after forward and refills before
# the layer's backward, so backward reads the gathered bytes again.
_SHARDED_PARTS = ("packed", "absmax", "nested_absmax")
_TABLE_PARTS = ("code", "nested_code")


def expose_nf4_parameters(module: nn.Module) -> None:
    """Turn module.weight (an NF4Tensor) into Parameters weight_packed (uint8), weight_absmax (fp32, or uint8
    when double-quantized) and weight_nested_absmax (fp32), all frozen and 1-D, plus buffers weight_code and
    weight_nested_code; module.weight is the NF4Tensor view inside forward and None outside it.

    For sharding only: the state dict then has these names (the bitsandbytes keys are gone), so gather the
    trainable state for saving (train/fsdp.py:full_trainable_state) rather than calling state_dict().
    """
    w = module.weight
    if not isinstance(w, NF4Tensor):
        raise TypeError(f"expose_nf4_parameters: {type(module).__name__}.weight must be an NF4Tensor, got "
                        f"{type(w).__name__}")
    for part in _SHARDED_PARTS:
        if (t := getattr(w, part)) is not None:
            module.register_parameter(f"weight_{part}", nn.Parameter(t.reshape(-1), requires_grad=False))
    for part in _TABLE_PARTS:
        if (t := getattr(w, part)) is not None:
            module.register_buffer(f"weight_{part}", t, persistent=False)
    module.nf4_layout = {"blocksize": w.blocksize, "shape": w.shape, "dtype": w.dtype,
                         "nested_offset": w.nested_offset, "nested_blocksize": w.nested_blocksize}
    module.weight = None
    module.register_forward_pre_hook(_nf4_view)
    module.register_forward_hook(_drop_nf4_view)


def _nf4_view(module: nn.Module, args) -> None:
    p, b = module._parameters, module._buffers
    module.weight = NF4Tensor(packed=p["weight_packed"], absmax=p["weight_absmax"], code=b["weight_code"],
                              nested_absmax=p.get("weight_nested_absmax"), nested_code=b.get("weight_nested_code"),
                              **module.nf4_layout)


def _drop_nf4_view(module: nn.Module, args, output) -> None:
    # Outside forward the parameters are shards: a view over them would be a wrong weight, so there is none.
    module.weight = None


def _skipped(name: str, skip) -> bool:
    parts = name.split(".")
    return any(name == s or name.endswith("." + s) or s in parts for s in skip)


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   skip=DEFAULT_SKIP) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a Linear4bit, except modules named in `skip`
    (a name matches the module path, its last part, or any part of it) and MoE routers; MoE experts
    become NF4 slice by slice (quant/nf4_experts.py). Returns the model."""
    routers = nf4_experts.routers(model)
    nf4_experts.quantize_experts(model, blocksize, double_quant)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not _skipped(name, skip) and name not in routers:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit.from_linear(module, blocksize, double_quant))
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every Linear4bit by an nn.Linear holding its dequantized weight (in place), e.g. to export.

    A LoRA layer over an NF4 base (any module whose `weight` is an NF4Tensor) gets a dense frozen
    weight instead. Merging LoRA afterwards is lossy with respect to the original full-precision
    model: the base becomes the dequantized 4-bit weight, and that is warned about here.
    """
    lora_over_nf4 = []
    nf4_experts.dequantize_experts(model, dtype)
    for name, module in list(model.named_modules()):
        w = getattr(module, "weight", None)
        if not isinstance(w, NF4Tensor):
            continue
        dense = dequantize(w, dtype or w.dtype)
        if isinstance(module, Linear4bit):
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device=dense.device, dtype=dense.dtype)
            with torch.no_grad():
                lin.weight.copy_(dense)
                if module.bias is not None:
                    lin.bias.copy_(module.bias)
            lin.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
        else:
            lora_over_nf4.append(name)
            module.weight = nn.Parameter(dense, requires_grad=False)
    if lora_over_nf4:
        warnings.warn(f"nf4.dequantize_model: {len(lora_over_nf4)} LoRA layers ({lora_over_nf4[0]}, ...) sit on a "
                      "4-bit base; their base is now the dequantized NF4 weight, so merging the adapters gives the "
                      "QLoRA model, not the original full-precision weights plus the update (lossy)", stacklevel=2)
    return model


def memory_report(model: nn.Module) -> dict:
    """Bytes of the NF4 weights and of everything else; bits_per_param of the quantized linears."""
    q_params = q_bytes = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, NF4Tensor):
            q_params += w.numel
            q_bytes += w.nbytes
    for w in nf4_experts.nf4_expert_tensors(model):
        q_params += w.numel
        q_bytes += w.nbytes
    seen = {id(p): p for p in list(model.parameters()) + list(model.buffers())}
    other = sum(p.numel() * p.element_size() for p in seen.values())
    return {"quantized_params": q_params, "quantized_bytes": q_bytes, "other_bytes": other,
            "bits_per_param": 8 * q_bytes / q_params if q_params else 0.0}
