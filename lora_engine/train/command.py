"""`python -m lora_engine.train`: the command line over TrainConfig (config.py) and run (loop.py).

The run's messages (the resolved config, data counts, evaluations) are log records shown on stdout;
the progress bar goes to stderr.

Exit status: 0 when the run completed (or stopped at --stop-after, as asked); 128 + the signal's
number when SIGINT (130) or SIGTERM (143) stopped it, as a shell reports a command it killed, so
that a script or scheduler does not take a stopped run for a finished one (the checkpoint is saved
either way); 1 when a signal to another rank stopped it, or it failed; 2 for bad input.
"""

from __future__ import annotations

import signal
import sys

from lora_engine.cli import CliError, logs_to, parse
from lora_engine.train.config import TrainConfig
from lora_engine.train.config import __doc__ as _config_doc


class ProgressBar:
    """On a terminal one line on stderr, redrawn in place after every step; elsewhere (a log file) a
    line every 5% of the run (reporting.ProgressLog's lines, printed)."""

    def __init__(self, total: int, start: int):
        from lora_engine.train.reporting import ProgressLog  # here: `--help` stays free of torch

        self.lines = ProgressLog(total, start, log=lambda line: print(line, file=sys.stderr, flush=True))
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        if self.tty:
            print("\r" + self.lines.line(step, loss, lr, tps), end="", file=sys.stderr, flush=True)
        else:
            self.lines.update(step, loss, lr, tps)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


@logs_to("stdout")
def main(argv=None) -> int:
    from lora_engine.data.formats import DataError
    from lora_engine.train.checkpoint import ResumeError
    from lora_engine.train.distributed import DistributedError, peer_failed, world_from_env
    from lora_engine.train.loop import run
    from lora_engine.train.state import TrainingStopped

    cfg, explicit = parse(TrainConfig, argv, "python -m lora_engine.train", _config_doc.splitlines()[0])
    # Under torchrun these errors come from the same input or an agreed decision on every rank: rank 0 says it.
    say = (lambda e: print(f"error: {e}", file=sys.stderr)) if world_from_env()[0] == 0 else (lambda e: None)
    try:
        if cfg.dry_run:
            from lora_engine.train.dry_run import dry_run

            dry_run(cfg, explicit)
            return 0
        manifest = run(cfg, explicit, progress=ProgressBar)
    except (DataError, ResumeError, DistributedError, CliError) as e:
        say(e)
        return 2
    except TrainingStopped as e:
        say(e)
        return 1
    except Exception as e:
        rank, world, _ = world_from_env()
        if world > 1 and peer_failed(e):  # a consequence: the rank that failed first shows the cause
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"error: rank {rank} stopped: another rank failed (its error is shown above) or timed out: {first}",
                  file=sys.stderr)
            return 1
        raise
    return exit_status(manifest)


def exit_status(manifest: dict) -> int:
    """The command's exit status for a run's manifest (see the module's docstring)."""
    if manifest["status"] == "completed":
        return 0
    if manifest["status"] == "interrupted":
        by = manifest.get("stopped_by") or ""
        if by in signal.Signals.__members__:
            return 128 + signal.Signals[by].value
        return 0 if by.startswith("--stop-after") else 1
    return 1
