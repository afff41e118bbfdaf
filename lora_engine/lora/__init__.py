"""LoRA in PEFT's conventions: the layers and their application to a model (layers.py), adapter
folders PEFT loads and writes (adapter.py). Built on the model (models/) and NF4 (quant/) layers."""

from lora_engine.lora.adapter import load_adapter, read_adapter_config, save_adapter
from lora_engine.lora.layers import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    count_parameters,
    lora_layers,
    lora_scale,
    merge_lora,
    target_paths,
    unmerge_lora,
)

__all__ = [
    "LoraConfig", "LoraLinear", "apply_lora", "count_parameters", "load_adapter", "lora_layers", "lora_scale",
    "merge_lora", "read_adapter_config", "save_adapter", "target_paths", "unmerge_lora",
]
