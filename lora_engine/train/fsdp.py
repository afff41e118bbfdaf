"""FSDP2 for LoRA, QLoRA and DoRA: the frozen base sharded across ranks, an NF4 base in its packed bytes.

    shard(model, mesh=None) -> model          fully_shard per decoder layer, then the root (in place)
    full_trainable_state(model) -> {name: t}  the trainable parameters gathered whole, on CPU, every rank
    load_full_trainable_state(model, state)   the inverse: each rank keeps its shard of the whole tensors
    gathered_trainable(model)                 a block in which they are plain whole Parameters (save_adapter)
    local_parameter_bytes(model)              {"frozen": bytes, "trainable": bytes} held by this rank

Each decoder layer is one FSDP unit: its frozen base and its adapters are split along dim 0 across the
ranks, all-gathered before the layer's forward, freed after it and gathered again before its backward;
adapter gradients are reduce-scattered. The root unit holds the embedding, final norm and head.

An NF4 weight (Linear4bit, or a LoraLinear over one) is not a torch.Tensor, so fully_shard would not see
it; quant/nf4.py:expose_nf4_parameters first turns its packed bytes, absmax and nested absmax into frozen
1-D Parameters, which FSDP2 shards and all-gathers as they are (uint8 and fp32, 4.1 bits a weight), and
the layer rebuilds its NF4Tensor over the gathered tensors at each forward. Nothing dense travels.

No MixedPrecisionPolicy: each tensor travels in the dtype it is stored in. A param_dtype would cast the
fp32 absmax of a plain NF4 weight (FSDP2 casts every floating parameter), which makes it unusable, and
the fp32 base of an fp32 run; a bf16 base is already stored in bf16; the adapters are r*(in+out) values
a layer, so gathering them in fp32 costs nothing, and their gradients reduce in fp32 like one process's.

Gradients are summed across ranks, not averaged (gradient divide factor 1): the training step
normalises each rank's loss by the target tokens of the whole global batch, so the sum is exactly the
one-process gradient (up to the order of fp32 sums; with 2 ranks against one process accumulating the
same two micro-batches it is bit for bit, tests/test_fsdp.py). With gradient accumulation call
model.set_requires_gradient_sync(False) for all but the last micro-batch to reduce once per step.

Saving and resuming: full_trainable_state / load_full_trainable_state for the adapters (names as in one
process, any world size); save_adapter inside gathered_trainable; the optimizer state gathered and
re-sharded by train/distributed.py (Dist.optimizer_state / shard_optimizer_state, what the training
loop's checkpoints use). state_dict() of a sharded NF4 model names the exposed parts (weight_packed, ...),
not bitsandbytes' keys. Not covered: code that reads the head outside model.forward / model.loss (DPO's
hidden_states + lm_head.weight): register it with register_fsdp_forward_method first.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor

from lora_engine.kernels.nf4_format import NF4Tensor
from lora_engine.lora.layers import LoraLinear
from lora_engine.quant import nf4

# Methods of the model that read parameters of the root unit (embedding, norm, head) without going through
# forward(): FSDP2 must gather the root around them too. step.py trains through model.loss.
FORWARD_METHODS = ("loss",)


def shard(model: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
    """Shard `model` (a CausalLM with LoRA/DoRA layers, over an fp32/bf16/fp16 or NF4 base) in place; returns it.

    mesh: a 1-D DeviceMesh over the ranks that share the model (None: all ranks, on the device type of
    the model's parameters). Needs torch.distributed initialised (torchrun + init_process_group). Call
    after apply_lora / load_adapter and before building the optimizer (it must see the sharded
    parameters). Raises ValueError for a model it cannot shard.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fsdp.shard: torch.distributed is not initialised; start the run with torchrun and call "
                           "torch.distributed.init_process_group() first")
    if isinstance(model, FSDPModule):
        raise ValueError("fsdp.shard: the model is already sharded")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"fsdp.shard: expected a CausalLM with decoder layers at model.model.layers, got "
                         f"{type(model).__name__}")
    merged = [n for n, m in model.named_modules() if isinstance(m, LoraLinear) and m.merged]
    if merged:
        raise ValueError(f"fsdp.shard: {merged[0]} has its LoRA merged into the base; call unmerge_lora(model) "
                         "before sharding")
    if getattr(model, "offload_activations", False):
        raise ValueError("fsdp.shard: activation offloading (offload_activations) reads the layer's parameters "
                         "outside its forward, where FSDP holds only shards; use gradient checkpointing without "
                         "offloading")
    if mesh is None:
        first = next(model.parameters())
        mesh = init_device_mesh(first.device.type, (dist.get_world_size(),))
    for m in model.modules():
        if isinstance(getattr(m, "weight", None), NF4Tensor):
            nf4.expose_nf4_parameters(m)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            # A plain SUM collective: a factor other than the world size is otherwise a PREMUL_SUM, which gloo lacks.
            m.set_force_sum_reduction_for_comms(True)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: whole tensor on CPU} for every trainable parameter, the names and values of the
    unsharded model's named_parameters(). A collective: every rank must call it (each gets the dict)."""
    return {n: _full(p.detach()).cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_full_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Copy whole tensors (full_trainable_state's, saved by any world size) into the trainable parameters of a
    sharded or unsharded model: each rank keeps its own shard. The keys must be exactly the trainable
    parameter names; ValueError naming the first missing or unexpected one, or a shape that differs."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"load_full_trainable_state: {len(missing)} trainable parameters missing (first "
                         f"{missing[:1]}), {len(unexpected)} unexpected (first {unexpected[:1]}): the state was "
                         "saved from a model with other adapters")
    for n, p in params.items():
        if tuple(state[n].shape) != tuple(p.shape):
            raise ValueError(f"load_full_trainable_state: {n} is {tuple(state[n].shape)} in the state, "
                             f"{tuple(p.shape)} in the model")
        if isinstance(p, DTensor):
            full = state[n].to(device=p.device, dtype=p.dtype)
            p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())
        else:
            p.copy_(state[n])
    return model


@contextmanager
def gathered_trainable(model: nn.Module, write_back: bool = False):
    """Within the block every trainable parameter is a plain, whole Parameter (on its device), so code written
    for one process (lora/adapter.py:save_adapter, PEFT key names, a checkpoint's load) reads it unchanged;
    the shards come back after it. write_back: the whole values as the block left them (e.g. loaded from a
    checkpoint) are sharded back into the shards. A collective on entry; do not train inside the block."""
    swapped = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and isinstance(p, DTensor):
                full = nn.Parameter(p.detach().full_tensor(), requires_grad=True)
                module._parameters[name] = full
                swapped.append((module, name, p, full))
    try:
        yield model
    finally:
        for module, name, p, full in swapped:
            module._parameters[name] = p
            if write_back:
                with torch.no_grad():
                    p.to_local().copy_(distribute_tensor(full.detach(), p.device_mesh, p.placements).to_local())


def local_parameter_bytes(model: nn.Module) -> dict[str, int]:
    """{"frozen": bytes, "trainable": bytes} of the parameters this rank holds (its shards when sharded,
    everything otherwise). An NF4 weight counts its packed bytes, absmax and nested absmax, exposed or not;
its two code tables (1.1 kB, whole on every rank) and buffers are left out."""
    out = {"frozen": 0, "trainable": 0}
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        out["trainable" if p.requires_grad else "frozen"] += t.numel() * t.element_size()
    seen = set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, NF4Tensor) and id(w) not in seen:  # the parts that shard, not the two code tables
            seen.add(id(w))
            out["frozen"] += sum(t.numel() * t.element_size() for t in (w.packed, w.absmax, w.nested_absmax)
                                 if t is not None)
    return out
