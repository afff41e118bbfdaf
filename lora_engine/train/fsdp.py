"""FSDP2 for training: `shard(model)` wraps each decoder layer, then the root, with fully_shard.

The minimal form, for models whose frozen weights are floating point (LoRA on an fp32/bf16 base):
the base is sharded across ranks and all-gathered layer by layer in forward and backward; the
adapters are sharded like the rest and trained in fp32. NF4 (QLoRA) bases are refused here: their
packed uint8 storage and quant state need all-gather hooks of their own.
"""

from __future__ import annotations

from torch import nn


def shard(model: nn.Module, mesh=None) -> nn.Module:
    """fully_shard on every model.model.layers[i], then on the model; returns it (its parameters now DTensors).

    loss() is registered as a forward method, so calling it unshards the root's parameters (embeddings,
    final norm, head) as forward does. Raises NotImplementedError for a model with NF4 weights.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from lora_engine.kernels.nf4_format import NF4Tensor

    quantized = sorted(n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), NF4Tensor))
    if quantized:
        raise NotImplementedError(f"--distributed fsdp: sharding NF4 (QLoRA) weights is not implemented in this "
                                  f"version ({len(quantized)} quantized modules, e.g. {quantized[0]}); use "
                                  "--distributed ddp, or --quantize none")
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "loss")
    return model
