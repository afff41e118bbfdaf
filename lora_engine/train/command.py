"""`python -m lora_engine.train`: the command line over TrainConfig (config.py) and run (loop.py)."""

from __future__ import annotations

import sys

from lora_engine.cli import parse
from lora_engine.train.config import TrainConfig
from lora_engine.train.config import __doc__ as _config_doc


def main(argv=None) -> int:
    from lora_engine.data.formats import DataError
    from lora_engine.train.checkpoint import ResumeError
    from lora_engine.train.loop import TrainingStopped, run

    cfg, explicit = parse(TrainConfig, argv, "python -m lora_engine.train", _config_doc.splitlines()[0])
    try:
        manifest = run(cfg, explicit, log=print)
    except (DataError, ResumeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if manifest["status"] in ("completed", "interrupted") else 1
