"""`python -m lora_engine.convert FILE.gguf OUT_DIR`: the command; the converter is lora_engine/sources/gguf.py."""

import sys

from lora_engine.cli import run_cli
from lora_engine.sources.gguf import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
