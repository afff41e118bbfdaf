"""`python -m lora_engine.data check FILE`."""

import sys

from lora_engine.cli import run_cli
from lora_engine.data.check import main

sys.exit(run_cli(main))
