"""Everything a training run does before its first step, one function a stage, composed by `setup`.

    resolve      --resume's saved config overlaid with today's flags; the output folder named
    claim_out    an existing run in --out refused, unless --resume continues it or --overwrite replaces it
    load_inputs  the data (data/prepare.py, before the model: a bad file is reported in seconds and leaves
                 no run folder), then the tokenizer
    open_out     the folder made (emptied of the old run with --overwrite), config.json written
    build_model  the model with LoRA (or every weight trainable), its memory options set
    make_run     batcher, optimizer, scheduler, scaler, manifest: the Run
    start        the checkpoint restored with --resume, metrics.jsonl cut back to it, run.json
    evaluate_before  the evaluation before training (the loop calls it, where a failure is recorded)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import shutil
import time
from pathlib import Path

import torch

from lora_engine.cli import CliError, to_yaml, user_input
from lora_engine.data import stream
from lora_engine.data.pipeline import Batcher
from lora_engine.data.prepare import DataSpec, Prepared, prepare_data, read_data
from lora_engine.io import atomic
from lora_engine.registry import refs
from lora_engine.train import checkpoint, distributed, dpo, lineage, reporting, step, trackers
from lora_engine.train.config import TrainConfig, describe, eval_steps, quantize_method, resolve_device, resolve_resume
from lora_engine.train.evaluate import general_rows
from lora_engine.train.options import MemoryOptions, refuse
from lora_engine.train.precision import Precision, resolve_precision
from lora_engine.train.state import LoopState, Run
from lora_engine.train.suite import general_suite, score_suite

logger = logging.getLogger(__name__)

# What a run writes into its folder (train/command.py's list); --overwrite deletes these and nothing else.
RUN_ENTRIES = ("checkpoints", "adapter", "adapter-best", "model", "model-best", "metrics.jsonl", "loss.png",
               "config.json", "config.yaml", "tensorboard", "wandb",
               lineage.MANIFEST)


def setup(cfg: TrainConfig, explicit, tokenizer, model, log, dist: distributed.Dist) -> tuple[Run, LoopState]:
    """Everything before the first step; the state is the checkpoint's with --resume, else new."""
    cfg, ckpt = resolve(cfg, explicit, dist)
    log(describe(cfg))
    trackers.require(cfg.report_to)  # a --report-to package missing: said before anything loads
    claim_out(cfg, ckpt, dist)
    if cfg.pack:  # packed rows and a model's linear-attention layers (Qwen3.5) refused before anything loads
        from lora_engine.train.planning import has_linear_attention

        with user_input("--model"):
            linear = has_linear_attention(str(refs.local_path(cfg.model, cfg.registry)), model)
        refuse(cfg.choices(linear_attention=linear), CliError)
    if cfg.objective == "grpo":  # a --reward that does not import is reported before anything loads
        from lora_engine.train.rewards import load_rewards

        load_rewards(cfg.reward, cfg.reward_weights)
    tokenizer, data = load_inputs(cfg, tokenizer, log)
    open_out(cfg, dist)
    step.seed_everything(cfg.seed)  # before apply_lora, which draws the initial lora_A
    device = dist.device(resolve_device(cfg.device))
    prec = resolve_precision(device, cfg.precision)
    refuse(cfg.choices(strategy=dist.strategy, resolved=True, autocast=prec.name if prec.autocast else "fp32"),
           distributed.DistributedError)
    if cfg.auto_memory:  # the memory options, picked by planning this run's step before anything is loaded
        from lora_engine.train import planning

        cfg = planning.plan_training(cfg, device, str(refs.local_path(cfg.model, cfg.registry)), log)
    model = prepare_model(cfg, model, device, log)
    model = distributed.prepare(dist, model)
    if dist.active:
        log(f"distributed: {dist.strategy} over {dist.world} processes ({dist.backend}); each step takes "
            f"{dist.world} x {cfg.grad_accum} micro-batches of {cfg.batch_size}")
    r = make_run(cfg, tokenizer, model, data, prec, device, ckpt, dist, log)
    return r, start(r, ckpt, log)


def resolve(cfg: TrainConfig, explicit, dist: distributed.Dist) -> tuple[TrainConfig, Path | None]:
    """(the config as run, the checkpoint to resume or None): --resume's saved config under today's flags, and
    --out named (runs/<time> by default, from rank 0's clock)."""
    cfg, ckpt = resolve_resume(cfg, set(explicit))
    out = dist.broadcast_object(cfg.out or time.strftime("runs/%Y%m%d-%H%M%S"))
    return dataclasses.replace(cfg, out=str(out)), ckpt


def run_entries(out: Path) -> list[Path]:
    """What a run wrote in `out` (RUN_ENTRIES present there)."""
    return [out / n for n in RUN_ENTRIES if (out / n).exists()] if out.is_dir() else []


def claim_out(cfg: TrainConfig, ckpt: Path | None, dist: distributed.Dist) -> None:
    """Refuse an --out that holds a run, unless --resume continues it or --overwrite replaces it: a new run there
    would rewrite its metrics and run.json and leave its checkpoints of higher steps to be resumed or kept.
    Decided on rank 0 (before it writes anything) for every rank."""
    found = [p.name for p in run_entries(Path(cfg.out))] if dist.main and ckpt is None and not cfg.overwrite else []
    found = dist.broadcast_object(found)
    if found:
        raise CliError(f"--out {cfg.out} holds a run already ({', '.join(found)}): continue it with --resume "
                       f"{cfg.out}, replace it with --overwrite, or give another --out")


def load_inputs(cfg: TrainConfig, tokenizer, log) -> tuple[object, Prepared]:
    """(tokenizer, the prepared data); the tokenizer is cfg.model's unless given. The data files are read first:
    a bad one is reported before the tokenizer loads."""
    spec = DataSpec.of(cfg)
    records = read_data(spec)
    if tokenizer is None:
        from lora_engine.models.tokenizer import load_tokenizer

        with user_input("--model"):
            tokenizer = load_tokenizer(refs.local_path(cfg.model, cfg.registry))
    data = prepare_data(spec, tokenizer, records, log)
    if isinstance(data.train, stream.TextStream):
        if not cfg.max_steps:  # a stream is not counted before it is read, so no epoch has a known number of steps
            raise CliError("--max-steps 0 trains --epochs, and a streamed corpus is not counted before training: give "
                           "--max-steps, or --no-stream to read it in memory")
        lines = stream.data_lines(data.stats, len(data.val), cfg.max_length, cfg.val_data)
    else:
        lines = reporting.data_lines(data.stats, len(data.val), cfg.objective, cfg.max_length, cfg.data)
    for line in lines:
        log(line)
    return tokenizer, data


def open_out(cfg: TrainConfig, dist: distributed.Dist) -> None:
    """The output folder, ready (rank 0): the old run's entries deleted with --overwrite, temporaries of an
    interrupted write removed, config.json and config.yaml written."""
    out = Path(cfg.out)
    if dist.main:
        if cfg.overwrite:
            for p in run_entries(out):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        atomic.clean_temporaries(out)
        atomic.write_json(out / "config.json", dataclasses.asdict(cfg))
        atomic.write_text(out / "config.yaml", to_yaml(cfg))  # the same, for `--config config.yaml`
    dist.barrier()


def prepare_model(cfg: TrainConfig, model, device: torch.device, log) -> torch.nn.Module:
    """The model to train: the caller's (every weight made trainable with --finetune full), else build_model's;
    with the memory options set."""
    if model is None:
        model = build_model(cfg, device, log)
    elif cfg.finetune == "full":
        step.full_finetuning(model)
    return MemoryOptions.of(cfg).apply(model)


def build_model(cfg: TrainConfig, device: torch.device, log):
    """cfg.model loaded in --precision's storage dtype (train/precision.py), quantized per --quantize, with LoRA
    on cfg.target_modules (fp32 adapters)."""
    from lora_engine.loading import load_model
    from lora_engine.lora.layers import apply_lora, count_parameters

    with user_input("--model"):
        model = load_model(refs.local_path(cfg.model, cfg.registry),
                           dtype=resolve_precision(device, cfg.precision).storage, device=device,
                           quantize=quantize_method(cfg.quantize))
    if cfg.router_aux_loss and not model.config.num_experts:
        raise CliError(f"--router-aux-loss: {cfg.model} has no mixture-of-experts layers, so no router loss; drop "
                       "the flag")
    model.router_aux_loss = cfg.router_aux_loss
    if cfg.finetune == "full":
        step.full_finetuning(model)
        n = count_parameters(model)["trainable"]
        log(f"full fine-tuning: {n:,} trainable parameters; fp32 AdamW holds ~{16 * n / 2**30:.2f} GiB "
            "(16 bytes per parameter) before activations")
        return model
    apply_lora(model, lora_config(cfg), verbose=False)
    counts = count_parameters(model)
    log(f"LoRA: {counts['trainable']:,} trainable of {counts['total']:,} parameters")
    return model


def lora_config(cfg: TrainConfig):
    """The LoraConfig of the run's flags."""
    from lora_engine.lora.layers import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=tuple(cfg.target_modules.split(",")), use_rslora=cfg.use_rslora,
                      use_dora=cfg.use_dora,
                      modules_to_save=tuple(cfg.modules_to_save.split(",")) if cfg.modules_to_save else (),
                      target_parameters=tuple(cfg.target_parameters.split(",")) if cfg.target_parameters else ())


def make_run(cfg: TrainConfig, tokenizer, model, data: Prepared, prec: Precision, device: torch.device,
             ckpt: Path | None, dist: distributed.Dist, log) -> Run:
    """The Run: the batcher of the objective, optimizer, scheduler, scaler, evaluation steps and the manifest."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    val_rows, val_pairs, step_fn, held_out = data.val, None, step.train_step, None
    if cfg.objective == "dpo":
        from lora_engine.data.preference import PairBatcher, pair_batches

        batcher = PairBatcher(data.train, cfg.batch_size, cfg.seed, pad, group_by_length=cfg.group_by_length)
        val_pairs = pair_batches(data.val, cfg.eval_batch_size, pad) if data.val else None
        val_rows = [c for c, _ in data.val]  # the target loss before and after: on the chosen responses
        step_fn = functools.partial(dpo.train_step, beta=cfg.dpo_beta, loss_type=cfg.dpo_loss,
                                    simpo_gamma=cfg.simpo_gamma)
    elif cfg.objective == "grpo":
        batcher, step_fn = grpo_stepper(cfg, tokenizer, data, device, dist)
        val_rows = []  # prompts have no target loss: the held-out evaluation is the reward of greedy completions
        if data.val:
            from lora_engine.train.grpo_step import HELD_OUT_LIMIT

            if len(data.val) > HELD_OUT_LIMIT:
                log(f"held-out reward: on {HELD_OUT_LIMIT} of the {len(data.val)} held-out prompts, evenly spaced")
            held_out = functools.partial(step_fn.held_out_reward, rows=data.val, batch_size=cfg.eval_batch_size,
                                         amp=prec.autocast)
    elif isinstance(data.train, stream.TextStream):
        batcher = stream.StreamBatcher(data.train, cfg.batch_size, pad)
    else:
        batcher = Batcher(data.train, cfg.batch_size, cfg.seed, pad, group_by_length=cfg.group_by_length)
    per_step = cfg.grad_accum * dist.world  # micro-batches of the global stream per optimizer step
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * math.ceil(batcher.batches_per_epoch / per_step)))
    opt = step.make_optimizer(model, cfg.lr, cfg.weight_decay, loraplus_lr_ratio=cfg.loraplus_lr_ratio)
    stored = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.requires_grad})
    log(f"precision: {prec.name} ({prec.reason}); frozen weights stored in {', '.join(stored) or '-'}, "
        f"LoRA adapters and optimizer state in float32")
    if prec.warning:
        logger.warning(f"precision: {prec.warning}")
    return Run(cfg=cfg, out=Path(cfg.out), tokenizer=tokenizer, model=model, val_rows=val_rows,
               general=general_rows(tokenizer, tokens=cfg.general_tokens) if cfg.general_eval else None,
               suite=general_suite() if cfg.general_eval else None, batcher=batcher, opt=opt,
               sched=step.make_scheduler(opt, cfg.warmup_steps, total, cfg.min_lr_ratio),
               scaler=torch.amp.GradScaler(device.type) if prec.autocast == torch.float16 else None,
               amp=prec.autocast, total=total, evals_at=set(eval_steps(total, cfg.eval_every)) if val_rows else set(),
               manifest=new_manifest(cfg, model, data, prec, ckpt, dist), step_fn=step_fn, val_pairs=val_pairs,
               dist=dist, held_out=held_out)


def grpo_stepper(cfg: TrainConfig, tokenizer, data: Prepared, device: torch.device, dist: distributed.Dist):
    """--objective grpo: (the prompt batcher, which owns the sampling generator; the GRPO step)."""
    from lora_engine.train.grpo import LossSettings
    from lora_engine.train.grpo_step import GRPOStep, PromptBatcher, Sampling
    from lora_engine.train.rewards import load_rewards

    batcher = PromptBatcher(data.train, cfg.batch_size, cfg.seed, cfg.grad_accum * dist.world, cfg.num_iterations,
                            device, dist.rank, dist.world)
    sampling = Sampling(cfg.num_generations, cfg.max_completion_length, cfg.temperature, cfg.top_p, cfg.top_k,
                        cfg.scale_rewards, tuple(cfg.stop))
    loss = LossSettings(cfg.loss_type, cfg.beta, cfg.epsilon,
                        cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high, cfg.importance_sampling_level,
                        cfg.max_completion_length)
    return batcher, GRPOStep(tokenizer, load_rewards(cfg.reward, cfg.reward_weights), sampling, loss, batcher,
                             cfg.num_iterations)


def new_manifest(cfg: TrainConfig, model, data: Prepared, prec: Precision, ckpt: Path | None,
                 dist: distributed.Dist) -> dict:
    """run.json as the run starts ("running"): config, hashes of the base weights and data files, the data counts."""
    base_dir = getattr(model, "source_dir", None)
    manifest = lineage.new_manifest(dataclasses.asdict(cfg),
                                    lineage.hash_files(lineage.model_weight_files(base_dir)) if base_dir else {},
                                    lineage.hash_files(data.files), str(ckpt) if ckpt else None)
    manifest["precision"] = prec.to_dict()
    manifest["distributed"] = dist.to_dict()
    manifest["data"].update({k: v for k, v in data.stats.items() if isinstance(v, int | dict)})
    return manifest


def start(r: Run, ckpt: Path | None, log) -> LoopState:
    """The state to start from (the checkpoint's with --resume), metrics.jsonl and run.json as of it."""
    state = restore(r, ckpt, log) if ckpt is not None else LoopState()
    if r.dist.main:
        start_metrics(r, ckpt, state.step, log)
        lineage.write_manifest(r.out, r.manifest)
    return state


def evaluate_before(r: Run, state: LoopState, log) -> None:
    """The evaluation before training (kept from the checkpoint when it has one). Apart from start: the loop runs
    it where a failure (a GRPO reward function that raises on the held-out prompts) is recorded in run.json."""
    if state.eval_before is None:
        state.eval_before = r.evaluate(r.general)
        if r.suite:
            state.eval_before["suite"] = {"general": score_suite(r.model, r.tokenizer, r.suite)}
    r.manifest["eval"]["before"] = state.eval_before
    log("before training: " + reporting.eval_line(state.eval_before))


def restore(r: Run, ckpt: Path, log) -> LoopState:
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


def start_metrics(r: Run, ckpt: Path | None, step: int, log) -> None:
    """metrics.jsonl holds the steps up to `step`: a resumed run's history, nothing after its checkpoint."""
    if ckpt is not None and checkpoint.run_dir_of(ckpt).resolve() != r.out.resolve() and not r.metrics_path.exists():
        # Resumed into a new folder: start its metrics with the history up to the checkpoint.
        src = checkpoint.run_dir_of(ckpt) / "metrics.jsonl"
        if src.is_file():
            atomic.write_text(r.metrics_path, src.read_text())
    try:
        reporting.truncate_metrics(r.metrics_path, step, log)
    except ValueError as e:
        raise checkpoint.ResumeError(str(e)) from e
