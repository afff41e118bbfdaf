"""`python -m lora_engine.train`."""

import sys

from lora_engine.train.command import main

sys.exit(main())
