"""The run behind `python -m lora_engine.train`: set up, evaluate, train, checkpoint, evaluate, record.

Kept apart from train.py (the config and command line) so that a test or a notebook can call
`run(TrainConfig(...), tokenizer=..., model=...)` with objects it built itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from lora_engine.cli import user_input
from lora_engine.data.formats import read_records
from lora_engine.data.pipeline import Batcher, examples_from_records, prepare, split
from lora_engine.io import atomic
from lora_engine.train import checkpoint
from lora_engine.train import lineage as runs
from lora_engine.train import step as trainer
from lora_engine.train.evaluate import compare, format_table, general_rows, run_eval
from lora_engine.train.suite import general_suite, score_suite


class TrainingStopped(RuntimeError):
    """The run stopped on an error (e.g. a NaN loss); the message says what, where, and which checkpoint is good."""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_data_files(cfg) -> dict[str, list]:
    """The records of --data and --val-data by path: read and checked (UTF-8, JSON) without a tokenizer."""
    if cfg.data is None:
        return {}  # the embedded corpus (--val-data goes with --data only)
    return {p: read_records(p) for p in (cfg.data, cfg.val_data) if p}


def load_data(cfg, tok, stats: dict, records: dict[str, list] | None = None):
    """(train rows, val rows, data files to hash); `records` as read_data_files returns them."""
    from lora_engine.data.embedded import chatterbot_files, chatterbot_split

    if cfg.data is None:
        tr, va = chatterbot_split()
        train_ex = examples_from_records(tr, tok, "chat", cfg.completion_only, stats, "the embedded corpus")
        val_ex = examples_from_records(va, tok, "chat", cfg.completion_only, {}, "the embedded held-out split")
        files = chatterbot_files()
    else:
        records = records if records is not None else read_data_files(cfg)
        train_ex = examples_from_records(records[cfg.data], tok, cfg.format, cfg.completion_only, stats, cfg.data)
        files = [Path(cfg.data)]
        if cfg.val_data:
            val_ex = examples_from_records(records[cfg.val_data], tok, cfg.format, cfg.completion_only, {},
                                           cfg.val_data)
            files.append(Path(cfg.val_data))
        else:
            train_ex, val_ex = split(train_ex, cfg.val_split, cfg.seed)
    train_rows = prepare(train_ex, cfg.max_length, cfg.pack, stats)
    val_rows = prepare(val_ex, cfg.max_length, False, {}) if val_ex else []
    return train_rows, val_rows, files


def _save_adapter(model, folder: Path) -> None:
    with atomic.atomic_dir(folder) as tmp:
        checkpoint.save_adapter_if_available(model, tmp)


class _Progress:
    """A one-line progress bar on stderr: step, loss, lr, tokens/s, ETA."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.time()
        self.tty = sys.stderr.isatty()

    def update(self, step: int, loss: float, lr: float, tps: float):
        done = step - self.start
        eta = (time.time() - self.t0) / max(1, done) * (self.total - step)
        bar = "#" * int(20 * step / self.total)
        line = (f"step {step}/{self.total} [{bar:<20}] loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step % max(1, self.total // 20) == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.tty:
            print(file=sys.stderr)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics of steps <= step (a resumed run rewrites what came after its checkpoint)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic.write_text(path, "".join(line + "\n" for line in keep))


def run(cfg, explicit: set[str] = frozenset(), tokenizer=None, model=None, log=print) -> dict:
    """Train per `cfg` (a train.TrainConfig); returns the run manifest (also written to run.json).

    SIGINT (Ctrl-C) and SIGTERM, from the start on, end the run at the next step boundary with a
    checkpoint (handlers are installed only in the main thread, where Python allows them).
    """
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    main = threading.current_thread() is threading.main_thread()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        return _run(cfg, explicit, tokenizer, model, log, stop)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _run(cfg, explicit, tokenizer, model, log, stop) -> dict:  # noqa: C901
    from lora_engine.train.config import describe, eval_steps, resolve_resume

    cfg, ckpt = resolve_resume(cfg, set(explicit))
    out = Path(cfg.out or time.strftime("runs/%Y%m%d-%H%M%S"))
    cfg = dataclasses.replace(cfg, out=str(out))
    log(describe(cfg))
    # The data first, then the model: a bad data file is reported in seconds, and leaves no run folder.
    records = read_data_files(cfg)
    if tokenizer is None:
        from lora_engine.models.tokenizer import load_tokenizer

        with user_input("--model"):
            tokenizer = load_tokenizer(cfg.model)
    stats: dict = {}
    train_rows, val_rows, data_files = load_data(cfg, tokenizer, stats, records)
    log(f"data: {stats.get('records')} records {stats.get('formats')}, {stats.get('empty', 0)} skipped (empty), "
        f"{stats['truncated']} truncated at {cfg.max_length} tokens, {stats['dropped_no_targets']} dropped (no "
        f"target left); {stats['rows']} training rows, {stats['target_tokens']:,} target tokens; "
        f"{len(val_rows)} validation rows")
    out.mkdir(parents=True, exist_ok=True)
    atomic.clean_temporaries(out)
    atomic.write_json(out / "config.json", dataclasses.asdict(cfg))
    trainer.seed_everything(cfg.seed)
    device = _device(cfg.device)

    if model is None:
        from lora_engine.loading import load_model

        kw = {"quantize": cfg.quantize} if cfg.quantize != "none" else {}
        with user_input("--model"):
            model = load_model(cfg.model, dtype=torch.float32 if device.type == "cpu" else None, device=device, **kw)
        from lora_engine.lora.layers import LoraConfig, apply_lora

        counts = apply_lora(model, LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                              target_modules=tuple(cfg.target_modules.split(",")),
                                              use_rslora=cfg.use_rslora), verbose=False)
        log(f"LoRA: {counts['trainable']:,} trainable of {counts['total']:,} parameters")
    model.gradient_checkpointing = cfg.gradient_checkpointing
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    batcher = Batcher(train_rows, cfg.batch_size, cfg.seed, pad, group_by_length=cfg.group_by_length)
    steps_per_epoch = math.ceil(batcher.batches_per_epoch / cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    opt = trainer.make_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = trainer.make_scheduler(opt, cfg.warmup_steps, total, cfg.min_lr_ratio)
    amp = trainer.autocast_dtype(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None

    base_dir = getattr(model, "source_dir", None)
    manifest = runs.new_manifest(dataclasses.asdict(cfg),
                                 runs.hash_files(runs.model_weight_files(base_dir)) if base_dir else {},
                                 runs.hash_files(data_files), str(ckpt) if ckpt else None)
    manifest["data"].update({k: v for k, v in stats.items() if isinstance(v, int | dict)})
    loop = {"step": 0, "tokens": 0, "targets": 0, "skipped": 0, "best_val": None, "eval_before": None}
    if ckpt is not None:
        restored = checkpoint.load_checkpoint(ckpt, model, opt, sched, scaler)
        loop = restored["loop"]
        batcher.load_state_dict(restored["data"])
        loop.setdefault("targets", None)  # a checkpoint from before the count: it stays unknown
        log(f"resumed from {ckpt} at step {loop['step']}")
    metrics_path = out / "metrics.jsonl"
    if ckpt is not None and checkpoint.run_dir_of(ckpt).resolve() != out.resolve() and not metrics_path.exists():
        # Resumed into a new folder: start its metrics with the history up to the checkpoint.
        src = checkpoint.run_dir_of(ckpt) / "metrics.jsonl"
        if src.is_file():
            atomic.write_text(metrics_path, src.read_text())
    _truncate_metrics(metrics_path, loop["step"])
    runs.write_manifest(out, manifest)

    general = general_rows(tokenizer, tokens=cfg.general_tokens) if cfg.general_eval else None
    suite = general_suite() if cfg.general_eval else None  # the registry's promotion gate reads its scores
    if loop["eval_before"] is None:
        loop["eval_before"] = run_eval(model, tokenizer, val_rows, general, cfg.eval_batch_size, amp)
        if suite:
            loop["eval_before"]["suite"] = {"general": score_suite(model, tokenizer, suite)}
    manifest["eval"]["before"] = loop["eval_before"]
    log("before training: " + ", ".join(f"{k} loss {v['loss']:.4f} ppl {v['ppl']:.2f}"
                                        for k, v in loop["eval_before"].items() if k != "suite"))

    def save(step):
        return checkpoint.save_checkpoint(out, step, model, opt, sched, dict(loop), batcher.state_dict(), scaler,
                                          cfg.keep_checkpoints)

    evals_at = set(eval_steps(total, cfg.eval_every)) if val_rows else set()
    bar = _Progress(total, loop["step"])
    status = "completed"
    with open(metrics_path, "a") as mf:
        while loop["step"] < total:
            if stop["signal"]:  # arrived during setup or evaluation
                status = "interrupted"
                break
            t0 = time.time()
            micro = [batcher.next() for _ in range(cfg.grad_accum)]
            where = f"step {loop['step'] + 1} (epoch {batcher.epoch}, rows {', '.join(micro[0]['where'][:3])})"
            try:
                res = trainer.train_step(model, opt, sched, micro, cfg.max_grad_norm, amp, scaler,
                                         cfg.on_nonfinite, where)
            except trainer.NonFiniteError as e:
                good = checkpoint.list_checkpoints(out)
                msg = (f"{e}. Training stopped; nothing was saved after the last good checkpoint "
                       f"({good[-1] if good else 'none yet'}). Lower --lr, check the data at those rows, "
                       "or pass --on-nonfinite skip")
                manifest.update(status="failed", error=msg, final_step=loop["step"], ended=runs.now())
                runs.write_manifest(out, manifest)
                raise TrainingStopped(msg) from e
            dt = time.time() - t0
            loop["step"] += 1
            loop["tokens"] += res.tokens
            if loop["targets"] is not None:
                loop["targets"] += res.targets
            loop["skipped"] += int(res.skipped)
            row = {"step": loop["step"], "loss": res.loss, "lr": res.lr, "grad_norm": res.grad_norm,
                   "tokens": res.tokens, "targets": res.targets, "tokens_per_s": res.tokens / dt,
                   "epoch": batcher.epoch, "skipped": res.skipped}
            if loop["targets"] is not None:
                row["target_tokens_seen"] = loop["targets"]  # the plot's second axis
            if loop["step"] in evals_at:
                v = run_eval(model, tokenizer, val_rows, None, cfg.eval_batch_size, amp)["target"]["loss"]
                row["val_loss"] = v
                if loop["best_val"] is None or v < loop["best_val"]:
                    loop["best_val"] = v
                    _save_adapter(model, out / "adapter-best")
            if loop["step"] % cfg.log_every == 0 or row.get("val_loss") is not None:
                mf.write(json.dumps(row) + "\n")
                mf.flush()
            bar.update(loop["step"], res.loss, res.lr, res.tokens / dt)
            if cfg.save_every and loop["step"] % cfg.save_every == 0 and loop["step"] < total:
                save(loop["step"])
            if stop["signal"] or (cfg.stop_after and loop["step"] >= cfg.stop_after and loop["step"] < total):
                status = "interrupted"
                break
    bar.close()
    path = save(loop["step"])
    if status == "interrupted":
        why = stop["signal"] or f"--stop-after {cfg.stop_after}"
        log(f"stopped by {why} at step {loop['step']}; checkpoint {path}; continue with --resume {out}")
        manifest.update(status="interrupted", final_step=loop["step"], ended=runs.now())
        runs.write_manifest(out, manifest)
        return manifest

    _save_adapter(model, out / "adapter")
    after = run_eval(model, tokenizer, val_rows, general, cfg.eval_batch_size, amp)
    if suite:
        after["suite"] = {"general": score_suite(model, tokenizer, suite)}
        if "suite" in loop["eval_before"]:
            log(f"general suite: {loop['eval_before']['suite']['general']['score']:.1f} -> "
                f"{after['suite']['general']['score']:.1f} points")
    # The last step has no mid-run evaluation (eval_steps): the final one decides whether it is the best.
    best_kept = loop["best_val"] is not None and (out / "adapter-best").exists()
    if not best_kept or ("target" in after and after["target"]["loss"] <= loop["best_val"]):
        _save_adapter(model, out / "adapter-best")
    cmp = compare(loop["eval_before"], after, cfg.forgetting_threshold)
    log(format_table(cmp))
    if cfg.plot:
        from lora_engine.train.plot import plot_loss

        points = [(0, loop["eval_before"]["target"]["loss"]), (loop["step"], after["target"]["loss"])] \
            if "target" in after else []
        note = plot_loss(metrics_path, out / "loss.png", points)
        if note:
            log(note)
    manifest.update(status="completed", final_step=loop["step"], ended=runs.now(), skipped_steps=loop["skipped"],
                    tokens=loop["tokens"])
    manifest["eval"] = cmp
    runs.write_manifest(out, manifest)
    return manifest
