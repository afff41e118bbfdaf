"""`python -m lora_engine.data check FILE`."""

import sys

from lora_engine.data.check import main

sys.exit(main())
