"""`python -m lora_engine.train`."""

import sys

from lora_engine.cli import run_cli
from lora_engine.train.command import main

sys.exit(run_cli(main))
