"""The training loop as functions, for use inside your own loop or behind `python -m lora_engine.train`.

    import lora_engine as le
    trainer = le.trainer                                          # this module, lora_engine/train/step.py
    opt = trainer.make_optimizer(model, lr=5e-4)                  # AdamW over params that require grad
    sched = trainer.make_scheduler(opt, warmup_steps=10, total_steps=300)
    for step in range(300):
        micro = [batcher.next() for _ in range(grad_accum)]       # lora_engine.data.pipeline.Batcher
        res = trainer.train_step(model, opt, sched, micro, max_grad_norm=1.0)
        print(res.loss, res.lr, res.tokens)
    from lora_engine.train.evaluate import evaluate
    print(evaluate(model, val_batches))                          # {"loss", "ppl", "tokens"}

Accumulation: the loss of one step is the sum of token losses over ALL its micro-batches divided by
the number of target tokens in all of them, so 4 micro-batches of 1 give exactly the loss and
gradients of one batch of 4, whatever the lengths (a mean of per-micro-batch means would weight a
short example's tokens more). Precision (train/precision.py): autocast to bf16 where the CPU or GPU
multiplies bf16 natively, with the frozen weights stored in bf16; fp16 with a grad scaler on a GPU
without bf16; fp32 on other CPUs.
"""

from __future__ import annotations

import math
import random
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from lora_engine.data.pipeline import n_targets
from lora_engine.train.precision import resolve_precision

MODEL_KEYS = ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids")


class NonFiniteError(RuntimeError):
    """The loss or the gradient of a step is NaN or infinite; the message says where."""


@dataclass
class StepResult:
    loss: float          # mean loss per target token over the whole accumulated batch
    grad_norm: float     # before clipping
    lr: float            # the learning rate this step used
    tokens: int          # input tokens (padding excluded) in the accumulated batch
    targets: int         # target tokens in the accumulated batch
    skipped: bool = False
    extra: dict = field(default_factory=dict)  # further per-step metrics (DPO: reward_margin, reward_accuracy)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (when installed) and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires grad: apply LoRA (apply_lora) before training")
    return params


def full_finetuning(model: torch.nn.Module) -> torch.nn.Module:
    """Make every parameter of a plain (un-adapted, unquantized) model trainable, for full fine-tuning; returns it.

    A tied embedding and head are one Parameter, so they stay tied: the optimizer sees it once and
    its gradient is the sum of both uses. Memory with fp32 AdamW: ~16 bytes per parameter (weight 4,
    gradient 4, the two moments 8) before activations, against ~4 for a frozen LoRA base.
    Raises ValueError for a model with LoRA layers or an NF4 (QLoRA) base, whose weights cannot train.
    """
    from lora_engine.kernels.nf4_format import NF4Tensor

    names = [n for n, _ in model.named_parameters()]
    if any(".lora_" in n for n in names):
        raise ValueError("full fine-tuning: the model carries LoRA layers (apply_lora); load the model again without "
                         "them, or train the adapter instead (--finetune lora)")
    if any(isinstance(getattr(m, "weight", None), NF4Tensor) for m in model.modules()) or any(
            not p.is_floating_point() for p in model.parameters()):
        raise ValueError("full fine-tuning: the base weights are quantized (NF4), which cannot be trained; load the "
                         "model in full precision (--quantize none), or train a QLoRA adapter (--finetune lora)")
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def make_optimizer(model, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8,
                   loraplus_lr_ratio: float | None = None):
    """AdamW over the parameters that require grad (the LoRA A and B matrices, DoRA magnitudes, modules_to_save;
    every parameter after full_finetuning).

    loraplus_lr_ratio (LoRA+, Hayou et al. 2024; PEFT's create_loraplus_optimizer): two parameter
    groups, param_groups[0] at `lr` (lora_A and every other matrix) and param_groups[1] at
    lr * ratio (lora_B and, as PEFT groups them, 1-D parameters such as DoRA's magnitude). The
    schedule scales both groups alike; the logged lr is group 0's.
    """
    named = trainable_parameters(model)
    if loraplus_lr_ratio is None:
        return torch.optim.AdamW([p for _, p in named], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if isinstance(loraplus_lr_ratio, bool) or not loraplus_lr_ratio > 0 or math.isinf(loraplus_lr_ratio):
        raise ValueError(f"--loraplus-lr-ratio must be a positive number (16 in the LoRA+ paper), got "
                         f"{loraplus_lr_ratio!r}")
    fast = [p for n, p in named if n.endswith("lora_B") or p.ndim == 1]
    if not fast:
        raise ValueError("--loraplus-lr-ratio: the model has no lora_B parameter to train faster; LoRA+ needs LoRA "
                         "layers (apply_lora)")
    ids = {id(p) for p in fast}
    groups = [{"params": [p for _, p in named if id(p) not in ids], "lr": lr},
              {"params": fast, "lr": lr * loraplus_lr_ratio}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Linear warmup from ~0 to 1 over warmup_steps, then cosine down to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup_steps, total_steps, min_ratio))


def autocast_dtype(device: torch.device | str, precision: str = "auto") -> torch.dtype | None:
    """torch.autocast's dtype for a --precision choice on `device`, None for fp32 (train/precision.py's rule:
    auto is bf16 on a CPU with native bf16 matmul and on a GPU with bf16, fp16 on an older GPU, else fp32)."""
    return resolve_precision(device, precision).autocast


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _to_device(batch: dict, device) -> dict:
    return {k: batch[k].to(device) for k in MODEL_KEYS if batch.get(k) is not None}


def micro_batch_loss_sum(model, batch: dict, amp: torch.dtype | None = None) -> torch.Tensor:
    """Sum of the token losses of one micro-batch (fp32 scalar, differentiable)."""
    device = next(model.parameters()).device
    b = _to_device(batch, device)
    with _autocast(device, amp):
        return model.loss(b["input_ids"], b["labels"], attention_mask=b.get("attention_mask"), reduction="sum",
                          position_ids=b.get("position_ids"), segment_ids=b.get("segment_ids")).float()


def _nonfinite_loss(part: torch.Tensor, i: int, b: dict) -> str:
    # "where" (file:line of each row) is there when data.collate made the batch, not in one
    # built by hand from input_ids/labels/attention_mask: then the shape says which it was.
    rows = (f"rows {', '.join(b['where'][:4])}" if b.get("where")
            else f"input_ids of shape {tuple(b['input_ids'].shape)}")
    return f"non-finite loss ({float(part.detach())}) in micro-batch {i} ({rows})"


def accumulate_gradients(model, micro_batches: list[dict], total: int, amp: torch.dtype | None = None,
                         scaler=None, sync=None) -> tuple[float, str | None]:
    """Backward over each micro-batch of (sum of its token losses) / total, adding into .grad.

    total: target tokens of all micro-batches together, so the gradient is that of the mean over
    the whole accumulated batch. Returns (that mean loss, None) or (partial loss, what went wrong)
    when a micro-batch's loss is not finite (its backward is then not run).
    sync: a train.distributed.Dist when the step spans several ranks (total is then the global count):
    the ranks agree on each micro-batch's finiteness before its backward, so they all run the same
    backward passes (FSDP's collectives live in them); the problem reported is the first rank's.
    """
    loss_sum = 0.0
    for i, b in enumerate(micro_batches):
        part = micro_batch_loss_sum(model, b, amp) / total
        finite = bool(torch.isfinite(part))
        if not finite if sync is None else sync.any(not finite):
            problem = None if finite else _nonfinite_loss(part, i, b)
            if sync is None:
                return loss_sum, problem
            return loss_sum, sync.first(problem and f"{problem} on rank {sync.rank}")
        (scaler.scale(part) if scaler is not None else part).backward()
        loss_sum += float(part.detach())
    return loss_sum, None


def train_step(model, optimizer, scheduler, micro_batches: list[dict], max_grad_norm: float | None = 1.0,
               amp: torch.dtype | None = None, scaler=None, on_nonfinite: str = "stop",
               where: str = "", sync=None) -> StepResult:
    """One optimizer step over `micro_batches`: dicts of (B, T) long tensors, from data.collate or
    built by hand (input_ids and labels, -100 where no loss is taken; attention_mask, position_ids,
    segment_ids optional).

    sync: a train.distributed.Dist when the step spans several ranks, each passing its own share of
    the global step's micro-batches: the counts, the loss and the (DDP) gradients are summed over
    the ranks, so every rank steps on the global step's gradient and returns its global numbers.

    on_nonfinite: "stop" raises NonFiniteError (nothing is updated); "skip" leaves the parameters
    and optimizer state untouched, advances the schedule, and returns skipped=True.
    """
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    model.train()
    total = sum(n_targets(b) for b in micro_batches)
    tokens = sum(int(b["attention_mask"].sum()) if b.get("attention_mask") is not None else b["input_ids"].numel()
                 for b in micro_batches)
    if sync is not None:
        total, tokens = (int(x) for x in sync.sum([total, tokens]))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    if total == 0:
        raise ValueError(f"{where + ': ' if where else ''}the accumulated batch has no target token (all labels "
                         "are -100)")
    loss_sum, problem = accumulate_gradients(model, micro_batches, total, amp, scaler, sync)
    if sync is not None and problem is None:
        loss_sum = sync.sum([loss_sum])[0]
        sync.reduce_gradients([p for g in optimizer.param_groups for p in g["params"]])
    grad_norm, skipped = apply_gradients(model, optimizer, scheduler, max_grad_norm, scaler, on_nonfinite, where,
                                         problem)
    return StepResult(float("nan") if skipped else loss_sum, grad_norm, lr, tokens, total, skipped=skipped)


def apply_gradients(model, optimizer, scheduler, max_grad_norm: float | None, scaler, on_nonfinite: str,
                    where: str, problem: str | None) -> tuple[float, bool]:
    """The second half of a step, after the backward passes: clip, check, update, schedule.

    problem: what went wrong in the backward passes (a non-finite loss), or None. Returns (grad norm
    before clipping, skipped). on_nonfinite "stop" raises NonFiniteError; "skip" drops the gradients,
    advances the schedule and returns skipped=True. Shared by every objective's step (dpo.train_step).
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = float("nan")
    if problem is None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm else float("inf"))
        grad_norm = float(norm)
        if not math.isfinite(grad_norm) and scaler is None:  # with fp16 the scaler handles overflow
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            problem = f"non-finite gradient (norm {grad_norm}) in {', '.join(bad[:4]) or 'the parameters'}"
    if problem is not None:
        optimizer.zero_grad(set_to_none=True)
        if on_nonfinite == "stop":
            raise NonFiniteError(f"{where + ': ' if where else ''}{problem}")
        with warnings.catch_warnings():  # the schedule advances on a skipped step on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            scheduler.step()
        return grad_norm, True
    if scaler is not None:
        # fp16: an overflow is expected now and then; the scaler skips that step and lowers its scale.
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm, False


def rng_state() -> dict:
    s = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        s["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    if "numpy" in s:
        import numpy as np

        np.random.set_state(s["numpy"])
