"""The state of a training run: what the stages share (Run, built once by setup.py) and what carries from one
step to the next (LoopState, which every checkpoint saves)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_engine.data.pipeline import Batcher
from lora_engine.io import atomic
from lora_engine.train import checkpoint, distributed, dpo, step
from lora_engine.train.config import TrainConfig
from lora_engine.train.evaluate import run_eval


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


@dataclass(kw_only=True)
class Run:
    """What the stages share, set up once by setup.setup (by keyword)."""

    cfg: TrainConfig
    out: Path
    tokenizer: Any
    model: torch.nn.Module
    val_rows: list
    general: list | None      # general-English rows, None without --general-eval
    suite: list | None        # the general-ability suite (the registry's promotion gate reads its scores), or None
    batcher: Batcher
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler | None
    amp: torch.dtype | None
    total: int                # optimizer steps of the whole run
    evals_at: set[int]
    manifest: dict
    step_fn: Callable = step.train_step  # step.train_step, or dpo.train_step with --objective dpo
    val_pairs: list | None = None  # --objective dpo: the held-out preference batches
    dist: distributed.Dist = dataclasses.field(default_factory=distributed.Dist)  # this process's rank and world
    held_out: Callable | None = None  # --objective grpo: held_out(model) -> the held-out reward (grpo_step.py)

    def evaluate(self, general: list | None = None) -> dict:
        """run_eval's dict; with DPO also "preference" (dpo.evaluate on the held-out pairs), with GRPO "reward"
        (the mean reward of greedy completions of the held-out prompts)."""
        out = run_eval(self.model, self.tokenizer, self.val_rows, general, self.cfg.eval_batch_size, self.amp)
        if self.val_pairs:
            out["preference"] = dpo.evaluate(self.model, self.val_pairs, self.cfg.dpo_beta, self.amp,
                                             self.cfg.dpo_loss, self.cfg.simpo_gamma)
        if self.held_out is not None:
            out["reward"] = self.held_out(self.model)
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
                with atomic.atomic_dir(self.out / name) as tmp:
                    checkpoint.save_adapter_if_available(self.model, tmp)
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
