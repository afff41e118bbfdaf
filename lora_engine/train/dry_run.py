"""`python -m lora_engine.train --dry-run`: what a run would do, without doing it.

The run's own stages up to its first write, and the planner instead of the model: the resolved config
(--resume's saved one under today's flags), the --out check, the data read and prepared as the run reads
it (its counts and quality lines), the trainable parameter count of the model built on the meta device
(no weight is read), and the memory plan of one step (train/planning.py, as `python -m lora_engine.plan`;
with --auto-memory, the options it would pick). Nothing is trained and nothing is written: --out is
neither created nor touched.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from lora_engine.registry import refs
from lora_engine.train import planning, setup, trackers
from lora_engine.train.config import TrainConfig, describe, resolve_device, resolve_resume
from lora_engine.train.distributed import Dist

logger = logging.getLogger(__name__)


def dry_run(cfg: TrainConfig, explicit=frozenset(), log=None) -> dict:
    """Log what a run of `cfg` would do; returns {"config", "data", "trainable", "total", "plan"}."""
    log = log or logger.info
    cfg, ckpt = resolve_resume(cfg, set(explicit))
    cfg = dataclasses.replace(cfg, out=cfg.out or time.strftime("runs/%Y%m%d-%H%M%S"))
    log(describe(cfg))
    trackers.require(cfg.report_to)
    setup.claim_out(cfg, ckpt, Dist())  # reads --out only: the run would be refused there
    if cfg.objective == "grpo":
        from lora_engine.train.rewards import load_rewards

        load_rewards(cfg.reward, cfg.reward_weights)
    _, data = setup.load_inputs(cfg, None, log)
    device = resolve_device(cfg.device)
    model_path = str(refs.local_path(cfg.model, cfg.registry))
    if cfg.auto_memory:
        cfg = planning.plan_training(cfg, device, model_path, log)
    counts = parameter_counts(cfg, planning.read_config(model_path))
    log(f"{'full fine-tuning' if cfg.finetune == 'full' else 'LoRA'}: {counts['trainable']:,} trainable of "
        f"{counts['total']:,} parameters")
    plan_cfg = planning.plan_config(cfg, device, model_path)
    plan = planning.plan_step(plan_cfg)
    if cfg.objective != "sft" or cfg.finetune == "full":
        log(f"note: the plan is of a LoRA next-token step; --objective {cfg.objective} --finetune {cfg.finetune} "
            "holds more (a reference pass, sampled completions or full optimizer state)")
    log(planning.format_plan(plan_cfg, plan))
    log(f"dry run: nothing trained, nothing written ({cfg.out} untouched)")
    return {"config": dataclasses.asdict(cfg), "data": data.stats, **counts, "plan": plan}


def parameter_counts(cfg: TrainConfig, model_config) -> dict:
    """{"trainable", "total"} of the run's model, built on the meta device (no weight read or allocated)."""
    import torch

    from lora_engine.lora.layers import apply_lora, count_parameters
    from lora_engine.models.builder import build_model
    from lora_engine.train.step import full_finetuning

    model = build_model(model_config, torch.float32)
    model.tie_weights()  # a tied head counts once, as in the loaded model
    if cfg.finetune == "full":
        full_finetuning(model)
    else:
        apply_lora(model, setup.lora_config(cfg), verbose=False)
    return count_parameters(model)
