"""The torchrun entry point of test_distributed's fault tests: `python -m lora_engine.train`, except that
in optimizer step 2 (keyed on the schedule, which advances once a step) rank 1 raises, or with
FAULT=sigterm sends itself SIGTERM (as a scheduler stopping one worker would)."""

import os
import signal
import sys

from lora_engine.cli import run_cli
from lora_engine.train import step
from lora_engine.train.command import main

real_step = step.train_step


def failing_step(model, optimizer, scheduler, *args, **kwargs):
    if os.environ.get("RANK") == "1" and scheduler.last_epoch + 1 == 2:
        if os.environ.get("FAULT") == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise RuntimeError("injected fault on rank 1 in step 2")
    return real_step(model, optimizer, scheduler, *args, **kwargs)


step.train_step = failing_step
sys.exit(run_cli(main))
