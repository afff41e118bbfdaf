"""The model layer: ModelConfig (config.py), the Llama-family decoder CausalLM (decoder.py), the one
builder that makes every model from a config and a checkpoint (builder.py) and the tokenizer with its
chat template (tokenizer.py). Knows nothing of LoRA or quantization (a quantizer hands the builder swaps)."""

from lora_engine.models.config import ModelConfig
from lora_engine.models.decoder import CausalLM
from lora_engine.models.tokenizer import Tokenizer, load_tokenizer

__all__ = ["CausalLM", "ModelConfig", "Tokenizer", "load_tokenizer"]
