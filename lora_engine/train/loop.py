"""The run behind `python -m lora_engine.train`: set up, evaluate, train, checkpoint, evaluate, record.

Kept apart from config.py (the config) and command.py (the command line) so that a test or a
notebook can call `run(TrainConfig(...), tokenizer=..., model=...)` with objects it built itself.

One function a stage: _setup (config, data, model, optimizer; the state new or resumed; the
evaluation before), _train (one _step after another, _validate at the evaluation steps, a
checkpoint every --save-every), _finish (final evaluation, adapters, plot, run.json). What carries
from one step to the next is a LoopState, which every checkpoint saves. Messages go through
`logging` (this module's logger) unless `run` is given a `log`.

The objective picks the data and the step function, nothing else: --objective dpo reads preference
pairs (data.preference) and steps with dpo.train_step, and its evaluations add "preference" (the
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
import dataclasses
import functools
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_engine.cli import user_input
from lora_engine.data import quality
from lora_engine.data.formats import read_records
from lora_engine.data.pipeline import Batcher, examples_from_records, prepare, split
from lora_engine.io import atomic
from lora_engine.registry import refs
from lora_engine.train import checkpoint, distributed, dpo
from lora_engine.train import lineage as runs
from lora_engine.train import step as trainer
from lora_engine.train.config import TrainConfig, describe, eval_steps, quantize_method, resolve_device, resolve_resume
from lora_engine.train.evaluate import compare, format_table, general_rows, run_eval
from lora_engine.train.precision import resolve_precision
from lora_engine.train.suite import general_suite, score_suite

logger = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """The run stopped on an error (e.g. a NaN loss); the message says what, where, and which checkpoint is good."""


@dataclass
class LoopState:
    """What the loop carries from one step to the next; every checkpoint saves it, as a plain dict.

    The rest of a resume lives elsewhere in the checkpoint: the data position (epoch, index) is the
    Batcher's state, the RNG states the checkpoint's own; the metrics history is metrics.jsonl, cut
    back to `step` on resume.
    """

    step: int = 0                    # optimizer steps done
    tokens: int = 0                  # tokens trained on (StepResult.tokens summed)
    targets: int | None = 0          # target tokens trained on; None: resumed from a checkpoint older than the count
    skipped: int = 0                 # steps skipped on a non-finite loss (--on-nonfinite skip)
    best_val: float | None = None    # the best mid-run validation loss, whose adapter is adapter-best/
    eval_before: dict | None = None  # the evaluation before training: a resumed run compares against it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoopState:
        """The state as a checkpoint saved it. One from before the target count ("targets" absent) keeps
        the count unknown (None). Raises ValueError on a dict this version cannot read."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown or "step" not in d:
            raise ValueError(f"the loop state {sorted(d)} is not one this version writes (unknown fields "
                             f"{unknown or 'none'}, step {'present' if 'step' in d else 'missing'}); resume with "
                             "the lora_engine version that wrote the checkpoint")
        return cls(**{"targets": None, **d})


@dataclass
class _Stop:
    """Set by the signal handler; the loop looks at it between steps."""

    signal: str | None = None


@dataclass
class _Run:
    """What the stages share, set up once by _setup."""

    cfg: TrainConfig
    out: Path
    tokenizer: Any
    model: torch.nn.Module
    val_rows: list
    general: list | None  # general-English rows, None without --general-eval
    suite: list | None  # the general-ability suite (the registry's promotion gate reads its scores), or None
    batcher: Batcher
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler | None
    amp: torch.dtype | None
    total: int  # optimizer steps of the whole run
    evals_at: set[int]
    manifest: dict
    step_fn: Callable = trainer.train_step  # step.train_step, or dpo.train_step with --objective dpo
    val_pairs: list | None = None  # --objective dpo: the held-out preference batches
    dist: distributed.Dist = dataclasses.field(default_factory=distributed.Dist)  # this process's rank and world

    def evaluate(self, general: list | None = None) -> dict:
        """run_eval's dict; with DPO also "preference" (dpo.evaluate on the held-out pairs)."""
        out = run_eval(self.model, self.tokenizer, self.val_rows, general, self.cfg.eval_batch_size, self.amp)
        if self.val_pairs:
            out["preference"] = dpo.evaluate(self.model, self.val_pairs, self.cfg.dpo_beta, self.amp)
        return out

    def val_loss(self, ev: dict) -> float | None:
        """The loss that picks the best weights: the DPO loss with DPO, else the target loss."""
        key = "preference" if self.val_pairs else "target"
        return ev[key]["loss"] if key in ev else None

    def save_result(self, name: str) -> None:
        """The trained weights as <out>/<name>: the adapter (LoRA), or a Hugging Face model folder (full, named
        model... in place of adapter...). Every rank calls it (sharded weights are gathered); rank 0 writes."""
        with self.dist.gathered(self.model):
            if self.dist.main and self.cfg.finetune == "full":
                from lora_engine.export import save_model

                save_model(self.model, self.out / name.replace("adapter", "model"))
            elif self.dist.main:
                _save_adapter(self.model, self.out / name)
        self.dist.barrier()

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    def save(self, state: LoopState) -> Path:
        """A checkpoint of `state` (every rank calls it; rank 0 writes full tensors, the same at any world size)."""
        with self.dist.gathered(self.model):
            opt_state = self.dist.optimizer_state(self.opt) if self.dist.active else None
            if self.dist.main:
                checkpoint.save_checkpoint(self.out, state.step, self.model, self.opt, self.sched, state.to_dict(),
                                           self.batcher.state_dict(), self.scaler, self.cfg.keep_checkpoints,
                                           opt_state, {"world_size": self.dist.world,
                                                       "grad_accum": self.cfg.grad_accum})
        self.dist.barrier()
        return checkpoint.checkpoint_dir(self.out, state.step)


class ProgressLog:
    """The default progress report: one line through `log` every 5% of the run and at its end.

    The interface `run` expects of a progress report: built as `progress(total, first_step)`, then
    update(step, loss, lr, tokens_per_s) after every step and close() at the end.
    """

    def __init__(self, total: int, start: int, log: Callable[[str], None] | None = None):
        self.total, self.start, self.t0 = total, start, time.time()
        self.log = log or logger.info

    def line(self, step: int, loss: float, lr: float, tps: float) -> str:
        eta = (time.time() - self.t0) / max(1, step - self.start) * (self.total - step)
        bar = "#" * int(20 * step / self.total)
        return (f"step {step}/{self.total} [{bar:<20}] loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        if step % max(1, self.total // 20) == 0 or step == self.total:
            self.log(self.line(step, loss, lr, tps))

    def close(self) -> None:
        pass


def read_data_files(cfg) -> dict[str, list]:
    """The records of --data and --val-data by path: read and checked (UTF-8, JSON) without a tokenizer."""
    if cfg.data is None:
        return {}  # the embedded corpus (--val-data goes with --data only)
    return {p: read_records(p) for p in (cfg.data, cfg.val_data) if p}


def load_pairs(cfg, tok, stats: dict, records: dict[str, list] | None = None, warn=None):
    """--objective dpo: (train pair rows, val pair rows, data files to hash), as load_data for preference records;
    the embedded default is chatterbot_preference_split. `warn` hears of pairs truncation drops."""
    from lora_engine.data import preference
    from lora_engine.data.embedded import chatterbot_files, chatterbot_preference_split

    if cfg.data is None:
        (tr, va), src = chatterbot_preference_split(), ("the embedded pairs", "the embedded held-out pairs")
        files = chatterbot_files()
    else:
        records = records if records is not None else read_data_files(cfg)
        tr, va, src = records[cfg.data], records.get(cfg.val_data), (cfg.data, cfg.val_data)
        files = [Path(p) for p in (cfg.data, cfg.val_data) if p]
    train_pairs = preference.pairs_from_records(tr, tok, stats, src[0])
    if va is not None:
        val_pairs = preference.pairs_from_records(va, tok, {}, src[1])
    else:
        train_pairs, val_pairs = split(train_pairs, cfg.val_split, cfg.seed)
    train_rows = preference.prepare_pairs(train_pairs, cfg.max_length, stats, warn)
    val_rows = preference.prepare_pairs(val_pairs, cfg.max_length, {}, warn) if val_pairs else []
    return train_rows, val_rows, files


def load_data(cfg, tok, stats: dict, records: dict[str, list] | None = None):
    """(train rows, val rows, data files to hash); `records` as read_data_files returns them.

    stats gets the data counts, "quality" (quality.analyse's summary of the training records against the
    validation records, the file's or the held-out split's) and with --dedup "dedup" (records dropped).
    """
    from lora_engine.data.embedded import chatterbot_files, chatterbot_split

    if cfg.data is None:
        (tr, va), fmt, src = chatterbot_split(), "chat", ("the embedded corpus", "the embedded held-out split")
        files = chatterbot_files()
    else:
        records = records if records is not None else read_data_files(cfg)
        tr, va, fmt, src = records[cfg.data], records.get(cfg.val_data), cfg.format, (cfg.data, cfg.val_data)
        files = [Path(p) for p in (cfg.data, cfg.val_data) if p]
    if cfg.dedup:  # before the split, so that the held-out part shares no duplicate with the rest
        tr, stats["dedup"] = quality.dedup(tr, fmt, against=va)
    train_ex = examples_from_records(tr, tok, fmt, cfg.completion_only, stats, src[0])
    if va is not None:
        val_ex = examples_from_records(va, tok, fmt, cfg.completion_only, {}, src[1])
    else:
        train_ex, val_ex = split(train_ex, cfg.val_split, cfg.seed)
    by_where = {r.where: r for r in tr}
    val_used = va if va is not None else [by_where[e.where] for e in val_ex]
    stats["quality"] = quality.analyse([by_where[e.where] for e in train_ex], fmt, val_used).summary()
    train_rows = prepare(train_ex, cfg.max_length, cfg.pack, stats)
    val_rows = prepare(val_ex, cfg.max_length, False, {}) if val_ex else []
    return train_rows, val_rows, files


def _save_adapter(model, folder: Path) -> None:
    with atomic.atomic_dir(folder) as tmp:
        checkpoint.save_adapter_if_available(model, tmp)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps <= step (a resumed run rewrites what came after its checkpoint)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic.write_text(path, "".join(line + "\n" for line in keep))


def run(cfg: TrainConfig, explicit: set[str] = frozenset(), tokenizer=None, model=None,
        log: Callable[[str], None] | None = None, progress=None) -> dict:
    """Train per `cfg`; returns the run manifest (also written to run.json).

    tokenizer, model: objects built by the caller (model with LoRA on it), else loaded from cfg.
    log: where the run's messages go (default: this module's logger, at INFO). progress: a class
    like ProgressLog, called as progress(total, first_step) (default: ProgressLog through `log`).
    SIGINT (Ctrl-C) and SIGTERM, from the start on, end the run at the next step boundary with a
    checkpoint (handlers are installed only in the main thread, where Python allows them).
    """
    dist = distributed.init(cfg)
    package_log = logging.getLogger("lora_engine")
    level = package_log.level
    if not dist.main:  # rank 0 reports for all
        log, progress = (lambda *_: None), _Silent
        package_log.setLevel(logging.WARNING)
    log = log or logger.info
    stop = _Stop()

    def on_signal(signum, _frame):
        stop.signal = signal.Signals(signum).name

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        r, state = _setup(cfg, explicit, tokenizer, model, log, dist)
        bar = progress(r.total, state.step) if progress else ProgressLog(r.total, state.step, log)
        status = _train(r, state, stop, bar)
        bar.close()
        return _finish(r, state, status, stop.signal, log)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        dist.close()
        package_log.setLevel(level)


class _Silent(ProgressLog):
    """The progress report of ranks other than 0."""

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        pass


def _setup(cfg: TrainConfig, explicit, tokenizer, model, log, dist=None) -> tuple[_Run, LoopState]:
    """Everything before the first step; the state is the checkpoint's with --resume, else new."""
    dist = dist or distributed.Dist()
    cfg, ckpt = resolve_resume(cfg, set(explicit))
    out = Path(dist.broadcast_object(cfg.out or time.strftime("runs/%Y%m%d-%H%M%S")))  # rank 0's clock names it
    cfg = dataclasses.replace(cfg, out=str(out))
    log(describe(cfg))
    tokenizer, train_rows, val_rows, data_files, stats = _load_inputs(cfg, tokenizer, log)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic.clean_temporaries(out)
        atomic.write_json(out / "config.json", dataclasses.asdict(cfg))
    trainer.seed_everything(cfg.seed)  # before apply_lora, which draws the initial lora_A
    device = dist.device(resolve_device(cfg.device))
    if cfg.auto_memory:  # the memory options, picked by planning this run's step before anything is loaded
        from lora_engine.train import planning

        cfg = planning.plan_training(cfg, device, str(refs.local_path(cfg.model, cfg.registry)), log)
    if model is None:
        model = _build_model(cfg, device, log)
    elif cfg.finetune == "full":
        trainer.full_finetuning(model)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.offload_activations = cfg.offload_activations
    model.mlp_chunk_size = cfg.mlp_chunk_size
    model.loss_chunk_size = cfg.loss_chunk_size
    model.keep_on_host(embedding=cfg.embedding_on_cpu, head=cfg.head_on_cpu)
    prec = resolve_precision(device, cfg.precision)
    if dist.strategy == "fsdp" and prec.autocast == torch.float16:
        raise distributed.DistributedError("--distributed fsdp with fp16 needs a sharded grad scaler, not implemented: "
                                           "use --precision bf16 or fp32, or --distributed ddp")
    model = distributed.prepare(dist, model)
    if dist.active:
        log(f"distributed: {dist.strategy} over {dist.world} processes ({dist.backend}); each step takes "
            f"{dist.world} x {cfg.grad_accum} micro-batches of {cfg.batch_size}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    val_pairs = None
    if cfg.objective == "dpo":
        from lora_engine.data.preference import PairBatcher, pair_batches

        batcher = PairBatcher(train_rows, cfg.batch_size, cfg.seed, pad, group_by_length=cfg.group_by_length)
        val_pairs = pair_batches(val_rows, cfg.eval_batch_size, pad) if val_rows else None
        val_rows = [c for c, _ in val_rows]  # the target loss before and after: on the chosen responses
    else:
        batcher = Batcher(train_rows, cfg.batch_size, cfg.seed, pad, group_by_length=cfg.group_by_length)
    per_step = cfg.grad_accum * dist.world  # micro-batches of the global stream per optimizer step
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(batcher.batches_per_epoch / per_step)))
    opt = trainer.make_optimizer(model, cfg.lr, cfg.weight_decay, loraplus_lr_ratio=cfg.loraplus_lr_ratio)
    amp = prec.autocast
    stored = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad})
    log(f"precision: {prec.name} ({prec.reason}); frozen weights stored in {', '.join(stored) or '-'}, "
        f"LoRA adapters and optimizer state in float32")
    if prec.warning:
        logger.warning(f"precision: {prec.warning}")
    base_dir = getattr(model, "source_dir", None)
    manifest = runs.new_manifest(dataclasses.asdict(cfg),
                                 runs.hash_files(runs.model_weight_files(base_dir)) if base_dir else {},
                                 runs.hash_files(data_files), str(ckpt) if ckpt else None)
    manifest["precision"] = prec.to_dict()
    manifest["distributed"] = dist.to_dict()
    manifest["data"].update({k: v for k, v in stats.items() if isinstance(v, int | dict)})
    r = _Run(cfg, out, tokenizer, model, val_rows,
             general_rows(tokenizer, tokens=cfg.general_tokens) if cfg.general_eval else None,
             general_suite() if cfg.general_eval else None, batcher, opt,
             trainer.make_scheduler(opt, cfg.warmup_steps, total, cfg.min_lr_ratio),
             torch.amp.GradScaler(device.type) if amp == torch.float16 else None, amp, total,
             set(eval_steps(total, cfg.eval_every)) if val_rows else set(), manifest,
             functools.partial(dpo.train_step, beta=cfg.dpo_beta) if cfg.objective == "dpo" else trainer.train_step,
             val_pairs, dist)
    state = _restore(r, ckpt, log) if ckpt is not None else LoopState()
    if dist.main:
        _start_metrics(r, ckpt, state.step)
        runs.write_manifest(out, manifest)
    if state.eval_before is None:
        state.eval_before = r.evaluate(r.general)
        if r.suite:
            state.eval_before["suite"] = {"general": score_suite(model, tokenizer, r.suite)}
    manifest["eval"]["before"] = state.eval_before
    log("before training: " + _eval_line(state.eval_before))
    return r, state


def _eval_line(ev: dict) -> str:
    return ", ".join(f"{k} loss {v['loss']:.4f} " + (f"reward accuracy {v['reward_accuracy']:.3f}" if k == "preference"
                                                      else f"ppl {v['ppl']:.2f}")
                     for k, v in ev.items() if k != "suite")


def _load_inputs(cfg: TrainConfig, tokenizer, log):
    """(tokenizer, train rows, val rows, data files, data stats); the tokenizer is cfg.model's unless given."""
    # The data first, then the model: a bad data file is reported in seconds, and leaves no run folder.
    records = read_data_files(cfg)
    if tokenizer is None:
        from lora_engine.models.tokenizer import load_tokenizer

        with user_input("--model"):
            tokenizer = load_tokenizer(refs.local_path(cfg.model, cfg.registry))
    stats: dict = {}
    if cfg.objective == "dpo":
        train_rows, val_rows, data_files = load_pairs(cfg, tokenizer, stats, records, log)
        log(f"data: {stats['records']} preference records {stats['formats']}, {stats['truncated']} pairs truncated "
            f"at {cfg.max_length} tokens, {stats['dropped_no_targets']} dropped (no response token left); "
            f"{stats['rows']} training pairs, {stats['target_tokens']:,} response tokens; {len(val_rows)} "
            "validation pairs")
        return tokenizer, train_rows, val_rows, data_files, stats
    train_rows, val_rows, data_files = load_data(cfg, tokenizer, stats, records)
    log(f"data: {stats.get('records')} records {stats.get('formats')}, {stats.get('empty', 0)} skipped (empty), "
        f"{stats['truncated']} truncated at {cfg.max_length} tokens, {stats['dropped_no_targets']} dropped (no "
        f"target left); {stats['rows']} training rows, {stats['target_tokens']:,} target tokens; "
        f"{len(val_rows)} validation rows")
    if "dedup" in stats:
        d = stats["dedup"]
        log(f"--dedup dropped {sum(d.values())} training records: {d['exact']} exact duplicates, {d['near']} "
            f"near-duplicates, {d['val_overlap']} duplicating validation records")
    q = stats["quality"]
    log("data quality: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in q.items() if k != "records")
        + (f" (details: python -m lora_engine.data check {cfg.data})" if cfg.data and any(
            n for k, n in q.items() if k != "records") else ""))
    return tokenizer, train_rows, val_rows, data_files, stats


def _build_model(cfg: TrainConfig, device: torch.device, log):
    """cfg.model loaded in --precision's storage dtype (train/precision.py), quantized per --quantize, with LoRA
    on cfg.target_modules (fp32 adapters)."""
    from lora_engine.loading import load_model
    from lora_engine.lora.layers import LoraConfig, apply_lora, count_parameters

    with user_input("--model"):
        model = load_model(refs.local_path(cfg.model, cfg.registry),
                           dtype=resolve_precision(device, cfg.precision).storage, device=device,
                           quantize=quantize_method(cfg.quantize))
    if cfg.finetune == "full":
        trainer.full_finetuning(model)
        n = count_parameters(model)["trainable"]
        log(f"full fine-tuning: {n:,} trainable parameters; fp32 AdamW holds ~{16 * n / 2**30:.2f} GiB "
            "(16 bytes per parameter) before activations")
        return model
    apply_lora(model, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=tuple(cfg.target_modules.split(",")), use_rslora=cfg.use_rslora,
                                 use_dora=cfg.use_dora,
                                 modules_to_save=tuple(cfg.modules_to_save.split(",")) if cfg.modules_to_save else ()),
               verbose=False)
    counts = count_parameters(model)
    log(f"LoRA: {counts['trainable']:,} trainable of {counts['total']:,} parameters")
    return model


def _restore(r: _Run, ckpt: Path, log) -> LoopState:
    """Parameters, optimizer, scheduler, scaler, RNG and data position from `ckpt`; returns its loop state."""
    with r.dist.gathered(r.model, write_back=True):
        restored = checkpoint.load_checkpoint(ckpt, r.model, r.opt, r.sched, r.scaler,
                                              r.dist.shard_optimizer_state if r.dist.active else None)
    was = restored["meta"].get("world_size", 1) * restored["meta"].get("grad_accum", r.cfg.grad_accum)
    if was != r.dist.world * r.cfg.grad_accum and r.dist.main:
        logger.warning(f"resuming a checkpoint of {was} micro-batches per step with {r.dist.world} processes x "
                       f"--grad-accum {r.cfg.grad_accum}: the global batch changes, so the losses will not be those "
                       f"the saved run would have had (keep world size x --grad-accum at {was} for that)")
    try:
        state = LoopState.from_dict(restored["loop"])
    except ValueError as e:
        raise checkpoint.ResumeError(f"{ckpt}: {e}") from e
    r.batcher.load_state_dict(restored["data"])
    log(f"resumed from {ckpt} at step {state.step}")
    return state


def _start_metrics(r: _Run, ckpt: Path | None, step: int) -> None:
    """metrics.jsonl holds the steps up to `step`: a resumed run's history, nothing after its checkpoint."""
    if ckpt is not None and checkpoint.run_dir_of(ckpt).resolve() != r.out.resolve() and not r.metrics_path.exists():
        # Resumed into a new folder: start its metrics with the history up to the checkpoint.
        src = checkpoint.run_dir_of(ckpt) / "metrics.jsonl"
        if src.is_file():
            atomic.write_text(r.metrics_path, src.read_text())
    _truncate_metrics(r.metrics_path, step)


def _train(r: _Run, state: LoopState, stop: _Stop, bar) -> str:
    """Steps until the run's end ("completed") or a signal or --stop-after ("interrupted")."""
    cfg = r.cfg
    # A signal may reach one rank only, or the ranks at different steps: they stop together (one
    # all-reduce of the flag a step), else one would wait in a collective the others never enter.
    stopping = lambda: r.dist.any(stop.signal is not None)  # noqa: E731
    if state.step < r.total and stopping():  # arrived during setup or evaluation
        return "interrupted"
    with open(r.metrics_path, "a") if r.dist.main else contextlib.nullcontext() as mf:
        while state.step < r.total:
            row = _step(r, state)
            if state.step in r.evals_at:
                _validate(r, state, row)
            if mf and (state.step % cfg.log_every == 0 or row.get("val_loss") is not None):
                mf.write(json.dumps(row) + "\n")
                mf.flush()
            bar.update(state.step, row["loss"], row["lr"], row["tokens_per_s"])
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < r.total:
                r.save(state)
            if stopping() or (cfg.stop_after and cfg.stop_after <= state.step < r.total):
                return "interrupted"
    return "completed"


def _step(r: _Run, state: LoopState) -> dict:
    """One optimizer step over --grad-accum micro-batches; advances `state`, returns its metrics row."""
    t0 = time.time()
    # The global step's micro-batches, the same on every rank; this rank trains on its share of them.
    micro = [r.batcher.next() for _ in range(r.cfg.grad_accum * r.dist.world)]
    where = f"step {state.step + 1} (epoch {r.batcher.epoch}, rows {', '.join(micro[0]['where'][:3])})"
    sync = {"sync": r.dist} if r.dist.active else {}
    try:
        res = r.step_fn(r.model, r.opt, r.sched, r.dist.share(micro), r.cfg.max_grad_norm, r.amp, r.scaler,
                        r.cfg.on_nonfinite, where, **sync)
    except trainer.NonFiniteError as e:
        good = checkpoint.list_checkpoints(r.out)
        msg = (f"{e}. Training stopped; nothing was saved after the last good checkpoint "
               f"({good[-1] if good else 'none yet'}). Lower --lr, check the data at those rows, "
               "or pass --on-nonfinite skip")
        r.manifest.update(status="failed", error=msg, final_step=state.step, ended=runs.now())
        if r.dist.main:
            runs.write_manifest(r.out, r.manifest)
        raise TrainingStopped(msg) from e
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


def _validate(r: _Run, state: LoopState, row: dict) -> None:
    """The mid-run validation loss into `row` (with DPO also val_reward_accuracy); a new best is saved as
    adapter-best/ (model-best/)."""
    if r.val_pairs:
        ev = dpo.evaluate(r.model, r.val_pairs, r.cfg.dpo_beta, r.amp)
        v, row["val_reward_accuracy"] = ev["loss"], ev["reward_accuracy"]
    else:
        v = run_eval(r.model, r.tokenizer, r.val_rows, None, r.cfg.eval_batch_size, r.amp)["target"]["loss"]
    row["val_loss"] = v
    if state.best_val is None or v < state.best_val:
        state.best_val = v
        r.save_result("adapter-best")


def _finish(r: _Run, state: LoopState, status: str, stopped_by: str | None, log) -> dict:
    """The last checkpoint; when completed, the adapters, the evaluation after, the plot. Returns the manifest."""
    path = r.save(state)
    if status == "interrupted":
        why = stopped_by or (f"--stop-after {r.cfg.stop_after}" if r.cfg.stop_after else "a signal to another rank")
        log(f"stopped by {why} at step {state.step}; checkpoint {path}; continue with --resume {r.out}")
        r.manifest.update(status="interrupted", final_step=state.step, ended=runs.now())
        if r.dist.main:
            runs.write_manifest(r.out, r.manifest)
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
    if r.cfg.plot and r.dist.main:
        from lora_engine.train.plot import plot_loss

        before_loss, after_loss = r.val_loss(state.eval_before), r.val_loss(after)  # the metric the curve plots
        points = [(0, before_loss), (state.step, after_loss)] if after_loss is not None else []
        note = plot_loss(r.metrics_path, r.out / "loss.png", points)
        if note:
            log(note)
    r.manifest.update(status="completed", final_step=state.step, ended=runs.now(), skipped_steps=state.skipped,
                      tokens=state.tokens)
    r.manifest["eval"] = cmp
    if r.dist.main:
        runs.write_manifest(r.out, r.manifest)
    return r.manifest
