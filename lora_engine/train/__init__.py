"""Training: the config (config.py, the flags train and plan share in options.py), one optimizer step
(step.py), the run (setup.py before the first step, loop.py the steps and the end, state.py what they
share, reporting.py what they tell), checkpoints and evaluation (checkpoint.py, evaluate.py), the command
line (command.py), lineage (lineage.py) and the loss plot (plot.py).

    python -m lora_engine.train                         # or: from lora_engine.train import TrainConfig, run

Names are resolved lazily so that `import lora_engine.train.step` stays light.
"""

from importlib import import_module

_EXPORTS = {"TrainConfig": "lora_engine.train.config", "main": "lora_engine.train.command",
            "run": "lora_engine.train.loop", "TrainingStopped": "lora_engine.train.state",
            "LoopState": "lora_engine.train.state"}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lora_engine.train' has no attribute {name!r}")
