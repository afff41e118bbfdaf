"""The run behind `python -m lora_engine.train`: set up, evaluate, train, checkpoint, evaluate, record.

Kept apart from config.py (the config) and command.py (the command line) so that a test or a
notebook can call `run(TrainConfig(...), tokenizer=..., model=...)` with objects it built itself.

One function a stage: setup.setup (config, data, model, optimizer; the state new or resumed),
setup.evaluate_before (where its failure is recorded as the run's), _train (one _one_step after
another, _validate at the evaluation steps, a checkpoint every --save-every), _finish (final
evaluation, adapters, plot, run.json). What carries from one step to the next is a LoopState
(state.py), which every checkpoint saves. Messages go through `logging` (this module's logger)
unless `run` is given a `log`; reporting.py words them.

A run that ends otherwise than by finishing says so in run.json: "interrupted" (with "stopped_by",
the signal or --stop-after), or "failed" with the error, whatever raised (a NaN loss, a full disk).

The objective picks the data and the step function, nothing else: --objective dpo reads preference
pairs (data/prepare.py) and steps with dpo.train_step, and its evaluations add "preference" (the
held-out DPO loss, reward margin and accuracy; mid-run, the loss that picks the best adapter) to the
target loss on the chosen responses. --finetune full trains every weight (step.full_finetuning) and
writes model/ and model-best/ (export.save_model) where LoRA writes adapter/ and adapter-best/.

Under torchrun (train/distributed.py) every rank runs this same loop on the same global data stream,
keeping its share of each step's micro-batches; rank 0 alone logs and writes (metrics, run.json,
adapters, checkpoints), the others take part in the collectives that gather what it writes. Every
rank evaluates the whole validation set (FSDP needs all ranks in each forward; under DDP it is
duplicated work, the same numbers on every rank).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from lora_engine.train import checkpoint, distributed, dpo, lineage, setup, step, trackers
from lora_engine.train.config import TrainConfig
from lora_engine.train.evaluate import compare, format_table, run_eval
from lora_engine.train.reporting import ProgressLog, Silent
from lora_engine.train.state import LoopState, Run, TrainingStopped
from lora_engine.train.suite import score_suite

__all__ = ["LoopState", "ProgressLog", "TrainingStopped", "run"]

logger = logging.getLogger(__name__)


@dataclass
class _Stop:
    """Set by the signal handler; the loop looks at it between steps."""

    signal: str | None = None


def run(cfg: TrainConfig, explicit: set[str] = frozenset(), tokenizer=None, model=None,
        log: Callable[[str], None] | None = None, progress=None) -> dict:
    """Train per `cfg`; returns the run manifest (also written to run.json).

    tokenizer, model: objects built by the caller (model with LoRA on it), else loaded from cfg.
    log: where the run's messages go (default: this module's logger, at INFO). progress: a class
    like ProgressLog, called as progress(total, first_step) (default: ProgressLog through `log`).
    SIGINT (Ctrl-C) and SIGTERM, from the start on, end the run at the next step boundary with a
    checkpoint (handlers are installed only in the main thread, where Python allows them); the
    manifest's "stopped_by" names the signal. TrainingStopped when the run cannot go on (a NaN loss, a
    file that cannot be written), after run.json says "failed".
    """
    dist = distributed.init(cfg)
    package_log = logging.getLogger("lora_engine")
    level = package_log.level
    if not dist.main:  # rank 0 reports for all
        log, progress = (lambda *_: None), Silent
        package_log.setLevel(logging.WARNING)
    log = log or logger.info
    stop = _Stop()

    def on_signal(signum, _frame):
        stop.signal = signal.Signals(signum).name

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        r, state = setup.setup(cfg, explicit, tokenizer, model, log, dist)
        with _failures_recorded(r, state):
            setup.evaluate_before(r, state, log)  # before the trackers open: they log it at step 0
            with trackers.opened(r) as tr:
                bar = progress(r.total, state.step) if progress else ProgressLog(r.total, state.step, log)
                status = _train(r, state, stop, bar, tr)
                bar.close()
                manifest = _finish(r, state, status, stop.signal, log)
                trackers.report_end(tr, r, state.step)
                return manifest
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        dist.close()
        package_log.setLevel(level)


@contextlib.contextmanager
def _failures_recorded(r: Run, state: LoopState):
    """run.json says "failed" with the error when anything raises, not "running" as if the run went on (written
    when it can be: a full disk may refuse that too). An OSError (disk full, a read-only folder) becomes a
    TrainingStopped naming the path."""
    try:
        yield
    except Exception as e:
        err = e
        if isinstance(e, OSError):
            where = e.filename or r.out
            err = TrainingStopped(f"could not write {where}: {e.strerror or e}; the run stopped at step {state.step} "
                                  f"(last checkpoint: {_last_checkpoint(r)}); free space or make {r.out} writable, "
                                  f"then --resume {r.out}")
        if r.manifest.get("status") == "running":
            r.manifest.update(status="failed", error=str(err) or type(err).__name__, final_step=state.step,
                              ended=lineage.now())
            if r.dist.main:
                with contextlib.suppress(OSError):
                    lineage.write_manifest(r.out, r.manifest)
        if err is e:
            raise
        raise err from e


def _last_checkpoint(r: Run) -> str:
    good = checkpoint.list_checkpoints(r.out)
    return str(good[-1]) if good else "none yet"


def _train(r: Run, state: LoopState, stop: _Stop, bar, tr: trackers.Trackers) -> str:
    """Steps until the run's end ("completed") or a signal or --stop-after ("interrupted")."""
    cfg = r.cfg
    # A signal may reach one rank only, or the ranks at different steps: they stop together (one
    # all-reduce of the flag a step), else one would wait in a collective the others never enter.
    stopping = lambda: r.dist.any(stop.signal is not None)  # noqa: E731
    if state.step < r.total and stopping():  # arrived during setup or evaluation
        return "interrupted"
    with open(r.metrics_path, "a") if r.dist.main else contextlib.nullcontext() as mf:
        while state.step < r.total:
            row = _one_step(r, state)
            if state.step in r.evals_at:
                _validate(r, state, row)
            if mf and (state.step % cfg.log_every == 0 or row.get("val_loss") is not None):
                mf.write(json.dumps(row) + "\n")
                mf.flush()
                tr.log(trackers.train_metrics(row), state.step)
            bar.update(state.step, row["loss"], row["lr"], row["tokens_per_s"])
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < r.total:
                r.save(state)
            if stopping() or (cfg.stop_after and cfg.stop_after <= state.step < r.total):
                return "interrupted"
    return "completed"


def _one_step(r: Run, state: LoopState) -> dict:
    """One optimizer step over --grad-accum micro-batches; advances `state`, returns its metrics row."""
    t0 = time.time()
    # The global step's micro-batches, the same on every rank; this rank trains on its share of them.
    micro = [r.batcher.next() for _ in range(r.cfg.grad_accum * r.dist.world)]
    where = f"step {state.step + 1} (epoch {r.batcher.epoch}, rows {', '.join(micro[0]['where'][:3])})"
    sync = {"sync": r.dist} if r.dist.active else {}
    try:
        res = r.step_fn(r.model, r.opt, r.sched, r.dist.share(micro), r.cfg.max_grad_norm, r.amp, r.scaler,
                        r.cfg.on_nonfinite, where, **sync)
    except step.NonFiniteError as e:
        raise TrainingStopped(f"{e}. Training stopped; nothing was saved after the last good checkpoint "
                              f"({_last_checkpoint(r)}). Lower --lr, check the data at those rows, "
                              "or pass --on-nonfinite skip") from e
    dt = time.time() - t0
    state.step += 1
    state.tokens += res.tokens
    if state.targets is not None:
        state.targets += res.targets
    state.skipped += int(res.skipped)
    row = {"step": state.step, "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm, "tokens": res.tokens,
           "targets": res.targets, "tokens_per_s": res.tokens / dt, "epoch": r.batcher.epoch, "skipped": res.skipped,
           **res.extra}
    if state.targets is not None:
        row["target_tokens_seen"] = state.targets  # the plot's second axis
    return row


def _validate(r: Run, state: LoopState, row: dict) -> None:
    """The mid-run validation loss into `row` (with DPO also val_reward_accuracy); a new best is saved as
    adapter-best/ (model-best/)."""
    if r.val_pairs:
        ev = dpo.evaluate(r.model, r.val_pairs, r.cfg.dpo_beta, r.amp, r.cfg.dpo_loss,
                          r.cfg.simpo_gamma)
        v, row["val_reward_accuracy"] = ev["loss"], ev["reward_accuracy"]
    else:
        v = run_eval(r.model, r.tokenizer, r.val_rows, None, r.cfg.eval_batch_size, r.amp)["target"]["loss"]
    row["val_loss"] = v
    if state.best_val is None or v < state.best_val:
        state.best_val = v
        r.save_result("adapter-best")


def _finish(r: Run, state: LoopState, status: str, stopped_by: str | None, log) -> dict:
    """The last checkpoint; when completed, the adapters, the evaluation after, the plot. Returns the manifest."""
    path = r.save(state)
    if status == "interrupted":
        why = stopped_by or (f"--stop-after {r.cfg.stop_after}" if r.cfg.stop_after else "a signal to another rank")
        log(f"stopped by {why} at step {state.step}; checkpoint {path}; continue with --resume {r.out}")
        r.manifest.update(status="interrupted", stopped_by=why, final_step=state.step, ended=lineage.now())
        if r.dist.main:
            lineage.write_manifest(r.out, r.manifest)
        return r.manifest
    r.save_result("adapter")
    after = r.evaluate(r.general)
    if r.suite:
        after["suite"] = {"general": score_suite(r.model, r.tokenizer, r.suite)}
        if "suite" in state.eval_before:
            log(f"general suite: {state.eval_before['suite']['general']['score']:.1f} -> "
                f"{after['suite']['general']['score']:.1f} points")
    # The last step has no mid-run evaluation (eval_steps): the final one decides whether it is the best.
    best = "model-best" if r.cfg.finetune == "full" else "adapter-best"
    best_kept = state.best_val is not None and (r.out / best).exists()
    final = r.val_loss(after)
    if not best_kept or (final is not None and final <= state.best_val):
        r.save_result("adapter-best")
    cmp = compare(state.eval_before, after, r.cfg.forgetting_threshold)
    log(format_table(cmp))
    if "preference" in after and "preference" in state.eval_before:
        b, a = state.eval_before["preference"], after["preference"]
        log(f"held-out preference pairs: DPO loss {b['loss']:.4f} -> {a['loss']:.4f}, reward accuracy "
            f"{b['reward_accuracy']:.3f} -> {a['reward_accuracy']:.3f}")
    rewards = [ev.get("reward", {}).get("mean") for ev in (state.eval_before, after)]
    if "reward" in after and "reward" in state.eval_before:
        b, a = (f"{x:.4f}" if x is not None else "-" for x in rewards)
        log(f"held-out reward (greedy, {after['reward']['prompts']} prompts): {b} -> {a}")
    if r.cfg.plot and r.dist.main:
        from lora_engine.train.plot import plot_loss

        before_loss, after_loss = r.val_loss(state.eval_before), r.val_loss(after)  # the metric the curve plots
        points = [(0, before_loss), (state.step, after_loss)] if after_loss is not None else []
        reward_points = [(s, x) for s, x in zip((0, state.step), rewards) if x is not None]
        note = plot_loss(r.metrics_path, r.out / "loss.png", points, reward_points)
        if note:
            log(note)
    r.manifest.update(status="completed", final_step=state.step, ended=lineage.now(), skipped_steps=state.skipped,
                      tokens=state.tokens)
    r.manifest["eval"] = cmp
    if r.dist.main:
        lineage.write_manifest(r.out, r.manifest)
    return r.manifest
