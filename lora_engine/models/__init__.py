"""The model layer: ModelConfig (config.py), the Llama-family decoder CausalLM (decoder.py) and the
tokenizer with its chat template (tokenizer.py). Knows nothing of LoRA or quantization."""

from lora_engine.models.config import ModelConfig
from lora_engine.models.decoder import CausalLM
from lora_engine.models.tokenizer import Tokenizer, load_tokenizer

__all__ = ["CausalLM", "ModelConfig", "Tokenizer", "load_tokenizer"]
