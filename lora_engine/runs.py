"""`python -m lora_engine.runs list DIR`: the command; lineage itself is lora_engine/train/lineage.py."""

import sys

from lora_engine.cli import run_cli
from lora_engine.train.lineage import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
