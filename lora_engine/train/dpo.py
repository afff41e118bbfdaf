"""DPO (Rafailov et al. 2023, "Direct Preference Optimization") for a LoRA model, and its variants IPO, SimPO, ORPO.

    r_c = beta * (log pi(chosen | prompt) - log pi_ref(chosen | prompt))         (the same for r_r)
    sigmoid (--dpo-loss sigmoid, the default):  loss = -log sigmoid(r_c - r_r), averaged over pairs
    ipo (Azar et al. 2023, Eq. 17, as TRL's DPOTrainer computes loss_type="ipo"):
        h = (log pi/pi_ref)(chosen) / n_c - (log pi/pi_ref)(rejected) / n_r       (n: response tokens)
        loss = (h - 1 / (2 beta))**2, averaged over pairs
    IPO's log-ratios are divided by the response lengths (TRL's choice, confirmed with IPO's authors: a
    sum over tokens would make the squared loss grow with length); beta is the paper's tau.
    simpo (Meng et al. 2024, as TRL's CPOTrainer loss_type="simpo" with cpo_alpha=0): no reference at all,
        loss = -log sigmoid(beta * (log pi(chosen) / n_c - log pi(rejected) / n_r) - gamma)   (--simpo-gamma)
        its reward margin and accuracy are beta times those length-averaged log-probs.
    orpo (Hong et al. 2024, as TRL's ORPOTrainer): no reference either; with a_c, a_r those length-averaged
        log-probs and odds(a) = a - log(1 - exp(a)) (the log of p / (1 - p) for p = exp(a)),
        loss = NLL(chosen) - beta * mean(log sigmoid(odds(a_c) - odds(a_r)))   (beta is ORPO's lambda)
        where NLL(chosen) is the mean over the chosen responses' tokens (the SFT loss on them).

log pi(y | x) is the sum of the token log-probabilities of the response tokens only (labels != -100,
labels[t + 1] predicted by position t, as in CausalLM.loss). The reference pi_ref is the same model
with its adapters switched off (lora.layers.adapters_disabled), so no second copy of the weights
exists; at initialisation (B = 0) policy and reference agree and the first loss is exactly ln 2
(sigmoid; IPO's is 1 / (4 beta**2)).

Sequence log-probabilities come from dispatch.linear_cross_entropy with reduction="sum", one row at
a time, so the (tokens x vocab) logits are never materialised, for the policy or the reference.

A preference batch is a dict of (B, T) long tensors: chosen_input_ids, chosen_labels,
chosen_attention_mask and the same three for rejected (each row: prompt + response, prompt labels -100),
as data.preference.PairBatcher makes them. train_step is step.train_step's counterpart for DPO (the
loop picks it with --objective dpo); evaluate gives the held-out loss and reward accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_engine import dispatch
from lora_engine.lora.layers import adapters_disabled
from lora_engine.train.step import StepResult, _autocast, apply_gradients

SIDES = ("chosen", "rejected")
LOSS_TYPES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


@dataclass
class DPOResult:
    loss: torch.Tensor        # scalar fp32, differentiable in the policy
    reward_margin: float      # mean of r_c - r_r
    reward_accuracy: float    # fraction of pairs with r_c > r_r


def sequence_logps(model, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) fp32: the sum over each row's target tokens of log p(label[t+1] | tokens <= t)."""
    targets = labels[:, 1:]
    empty = (targets != -100).sum(dim=1) == 0
    if empty.any():
        raise ValueError(f"sequence_logps: row {int(empty.nonzero()[0])} has no response token (all labels -100 "
                         "after the first position); a truncated prompt leaves nothing to score")
    h = model.hidden_states(input_ids, attention_mask)[:, :-1]  # (B, T-1, D)
    w = model.head_weight(h.device)  # a device copy when the head is kept in CPU memory
    return torch.stack([-dispatch.linear_cross_entropy(h[i], w, targets[i], reduction="sum", backend=model.backend)
                        for i in range(h.shape[0])])


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1, loss_type: str = "sigmoid",
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None,
             simpo_gamma: float = 0.5) -> DPOResult:
    """The DPO loss (sigmoid, ipo or simpo) from (B,) sequence log-probabilities; see the module docstring. ipo and
    simpo need the (B,) response token counts of each side (orpo too); simpo and orpo take no reference (ref_*
    may be None). The reward margin and accuracy are beta * log-ratios (simpo, orpo: beta * length-averaged
    log-probs)."""
    if not beta > 0:
        raise ValueError(f"--dpo-beta must be > 0, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"--dpo-loss must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    if loss_type != "sigmoid" and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError(f"dpo_loss: loss_type {loss_type!r} needs chosen_tokens and rejected_tokens (response "
                         "lengths)")
    if loss_type in REFERENCE_FREE:
        a_c, a_r = policy_chosen / chosen_tokens.clamp(min=1), policy_rejected / rejected_tokens.clamp(min=1)
        margin = beta * (a_c - a_r)
        if loss_type == "simpo":
            loss = -F.logsigmoid(margin - simpo_gamma).mean()
        else:
            log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
            loss = -policy_chosen.sum() / chosen_tokens.sum().clamp(min=1) - beta * F.logsigmoid(log_odds).mean()
        return DPOResult(loss, float(margin.detach().mean()), float((margin.detach() > 0).float().mean()))
    lr_c, lr_r = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    margin = beta * lr_c - beta * lr_r
    if loss_type == "ipo":
        h = lr_c / chosen_tokens.clamp(min=1) - lr_r / rejected_tokens.clamp(min=1)
        loss = ((h - 1 / (2 * beta)) ** 2).mean()
    else:
        loss = -F.logsigmoid(margin).mean()
    return DPOResult(loss, float(margin.detach().mean()), float((margin.detach() > 0).float().mean()))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, each branch where it loses no precision (split at -ln 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def dpo_batch_loss(model, batch: dict, beta: float = 0.1, loss_type: str = "sigmoid",
                   simpo_gamma: float = 0.5) -> DPOResult:
    """DPO on one preference batch: policy with the adapter, reference with it switched off (no grad; none for
    simpo and orpo)."""
    def logps(side):
        return sequence_logps(model, batch[f"{side}_input_ids"], batch[f"{side}_labels"],
                              batch.get(f"{side}_attention_mask"))

    ref_c = ref_r = None
    if loss_type not in REFERENCE_FREE:
        with torch.no_grad(), adapters_disabled(model):
            ref_c, ref_r = logps("chosen"), logps("rejected")
    n_c, n_r = ((batch[f"{s}_labels"][:, 1:] != -100).sum(dim=1) for s in SIDES)
    return dpo_loss(logps("chosen"), logps("rejected"), ref_c, ref_r, beta, loss_type, n_c, n_r, simpo_gamma)


def _on_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)}


def _counts(micro_batches: list[dict]) -> tuple[int, int, int]:
    """(pairs, input tokens without padding, response tokens) of the micro-batches, both sides."""
    pairs = sum(b["chosen_input_ids"].shape[0] for b in micro_batches)
    tokens = sum(int(b[f"{s}_attention_mask"].sum()) if b.get(f"{s}_attention_mask") is not None
                 else b[f"{s}_input_ids"].numel() for b in micro_batches for s in SIDES)
    targets = sum(int((b[f"{s}_labels"][:, 1:] != -100).sum()) for b in micro_batches for s in SIDES)
    return pairs, tokens, targets


def train_step(model, optimizer, scheduler, micro_batches: list[dict], max_grad_norm: float | None = 1.0,
               amp: torch.dtype | None = None, scaler=None, on_nonfinite: str = "stop", where: str = "",
               beta: float = 0.1, loss_type: str = "sigmoid", simpo_gamma: float = 0.5) -> StepResult:
    """One DPO optimizer step over preference micro-batches; step.train_step's arguments and result.

    The loss is the mean over all pairs of the step (each micro-batch's pair sum / all pairs), so
    accumulation gives the loss and gradients of one large batch. result.extra holds reward_margin
    and reward_accuracy over the step's pairs; result.loss is the DPO loss.
    """
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {on_nonfinite!r}")
    model.train()
    device = next(model.parameters()).device
    n, tokens, targets = _counts(micro_batches)
    lr = optimizer.param_groups[0]["lr"]
    optimizer.zero_grad(set_to_none=True)
    loss_sum, margin_sum, correct, problem = 0.0, 0.0, 0.0, None
    for i, b in enumerate(micro_batches):
        with _autocast(device, amp):
            res = dpo_batch_loss(model, _on_device(b, device), beta, loss_type, simpo_gamma)
        rows = res.loss.new_tensor(b["chosen_input_ids"].shape[0])
        part = res.loss.float() * rows / n
        if not torch.isfinite(part):
            problem = (f"non-finite DPO loss ({float(part.detach())}) in micro-batch {i} (rows "
                       f"{', '.join(b.get('where', [])[:4]) or '?'})")
            break
        (scaler.scale(part) if scaler is not None else part).backward()
        loss_sum += float(part.detach())
        margin_sum += res.reward_margin * float(rows)
        correct += res.reward_accuracy * float(rows)
    grad_norm, skipped = apply_gradients(model, optimizer, scheduler, max_grad_norm, scaler, on_nonfinite, where,
                                         problem)
    extra = {"reward_margin": math.nan if skipped else margin_sum / n,
             "reward_accuracy": math.nan if skipped else correct / n}
    return StepResult(math.nan if skipped else loss_sum, grad_norm, lr, tokens, targets, skipped, extra)


@torch.no_grad()
def evaluate(model, batches: list[dict], beta: float = 0.1, amp: torch.dtype | None = None,
             loss_type: str = "sigmoid", simpo_gamma: float = 0.5) -> dict:
    """{"loss", "reward_margin", "reward_accuracy", "pairs"} over preference batches (means over pairs), in eval
    mode. Before training (B = 0) the loss is ln 2 (sigmoid) and the accuracy 0: no pair's margin is above zero yet."""
    if not batches:
        raise ValueError("dpo.evaluate: no preference batch to evaluate")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    loss, margin, correct, n = 0.0, 0.0, 0.0, 0
    try:
        for b in batches:
            k = b["chosen_input_ids"].shape[0]
            with _autocast(device, amp):
                res = dpo_batch_loss(model, _on_device(b, device), beta, loss_type, simpo_gamma)
            loss += float(res.loss) * k
            margin += res.reward_margin * k
            correct += res.reward_accuracy * k
            n += k
    finally:
        model.train(was)
    return {"loss": loss / n, "reward_margin": margin / n, "reward_accuracy": correct / n, "pairs": n}
