"""`python -m lora_engine.registry ...`: see lora_engine/registry/command.py."""

import sys

from lora_engine.cli import run_cli
from lora_engine.registry.command import main

sys.exit(run_cli(main))
