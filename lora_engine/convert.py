"""`python -m lora_engine.convert FILE.gguf OUT_DIR`, and `le.convert`: GGUF files into Hugging Face folders.

The converter itself is lora_engine/sources/gguf.py; its public names are named here too because
`le.convert` has meant the converter since before the package had layers, and `le.convert` must be
this module whatever was imported first (lora_engine/__init__.py).
"""

import sys

from lora_engine.cli import run_cli
from lora_engine.sources.gguf import CONVERTED, ConvertArgs, GGUFError, GGUFFile, convert_gguf, hf_config, main

__all__ = ["CONVERTED", "ConvertArgs", "GGUFError", "GGUFFile", "convert_gguf", "hf_config", "main"]

if __name__ == "__main__":
    sys.exit(run_cli(main))
