"""NF4 (QLoRA) quantization: the API and Linear4bit (nf4.py), checkpoints in the transformers +
bitsandbytes layout (checkpoint.py). Also reachable as `lora_engine.nf4`."""

from lora_engine.quant.checkpoint import load_quantized_model, save_quantized, transformers_quantization_config
from lora_engine.quant.nf4 import *  # noqa: F403  (the NF4 API, listed in nf4.__all__)
from lora_engine.quant.nf4 import __all__ as _nf4_all

__all__ = [*_nf4_all, "load_quantized_model", "save_quantized", "transformers_quantization_config"]
