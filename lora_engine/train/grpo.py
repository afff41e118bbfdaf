"""The GRPO family of policy-gradient losses, as TRL's GRPOTrainer computes them (trl 1.16, `_compute_loss`).

Advantages (Shao et al. 2024), from the rewards r (N,) of N = prompts x G completions, G per prompt:

    A_i = r_i - mean(r of i's group)               scale_rewards "none" (Dr. GRPO: no std division)
    A_i = (r_i - mean_group) / (std_group + 1e-4)   "group" (GRPO)
    A_i = (r_i - mean_group) / (std_batch + 1e-4)   "batch" (Hu et al. 2025, REINFORCE++'s global std)

with NaN-aware means and unbiased stds (a reward function's None is NaN; a completion no function
scored gets A = 0). The loss over completion tokens t of row i (mask m, log-probs lp under the
policy, old_lp when the rollout was drawn, ref_lp with the adapter off):

    ratio = exp(lp - old_lp)                        per token ("token"), or, GSPO (Zheng et al. 2025,
                                                    "sequence"), exp of the masked mean of lp - old_lp
    l_it  = -min(ratio * A_i, clip(ratio, 1 - eps_low, 1 + eps_high) * A_i) + beta * kl_it
    kl_it = exp(ref_lp - lp) - (ref_lp - lp) - 1    (Schulman's k3 estimator, >= 0)

reduced per loss type, over one micro-batch of the K (= --grad-accum) that make a step:

    grpo     mean over rows of (sum_t m l / sum_t m), / K
    bnpo     sum m l / sum m over the micro-batch, / K
    dr_grpo  sum m l / (rows x max_completion_length), / K     (Liu et al. 2025, no length bias)
    dapo     sum m l / (completion tokens of the whole step)   (Yu et al. 2025, token-level)

so the step's gradient is the sum of its micro-batches' (dapo: exactly the token mean of the step).
With num_iterations (mu) = 1 old_lp is lp.detach() (ratio 1, clipping inert, the plain policy
gradient); with mu > 1 the rollout's log-probs are kept and each of its mu steps is clipped against
them. DAPO's clip-higher is eps_high > eps_low.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class LossSettings:
    """The flags of the loss (TrainConfig's --loss-type, --beta, --epsilon, --epsilon-high, ...)."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    importance_sampling_level: str = "token"
    max_completion_length: int = 256  # dr_grpo's constant denominator

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"--importance-sampling-level must be token or sequence, got "
                             f"{self.importance_sampling_level!r}")


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """The unbiased standard deviation over the non-NaN values (TRL's nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * count / (count - 1)
    return var.sqrt() if dim is None else var.sqrt().squeeze(dim)


def advantages(rewards: torch.Tensor, group: int, scale_rewards: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (N,), whether each row's std is zero (N,) bool) from summed rewards (N,) fp32, NaN where no
    reward function applied; rows of one prompt's group are consecutive, `group` (G) of them."""
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"--scale-rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    if rewards.numel() % group:
        raise ValueError(f"advantages: {rewards.numel()} rewards do not make groups of {group}")
    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale_rewards == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = nanstd(grouped, dim=1).repeat_interleave(group) if group > 1 else torch.zeros_like(rewards)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), torch.isclose(std, torch.zeros_like(std))


@dataclass
class LossParts:
    loss: torch.Tensor      # scalar, this micro-batch's share of the step's loss (differentiable)
    kl_sum: float           # sum over completion tokens of kl (0 with beta 0)
    clipped: dict           # {"low", "high", "region"}: sums of clipped indicators (over tokens, or rows: GSPO)
    count: float            # what those sums are over: completion tokens, or rows with GSPO


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
                adv: torch.Tensor, mask: torch.Tensor, s: LossSettings, grad_accum: int = 1,
                step_tokens: float | None = None) -> LossParts:
    """One micro-batch's loss (module docstring). logps, old_logps, ref_logps, mask: (B, C); adv (B,).
    grad_accum: micro-batches in the step (K); step_tokens: completion tokens of the whole step (dapo's
    denominator; default this micro-batch's)."""
    mask = mask.to(logps.dtype)
    a = adv[:, None].to(logps.dtype)  # (B, 1)
    old = logps.detach() if old_logps is None else old_logps
    log_ratio = logps - old
    if s.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # (B, 1)
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.clamp(ratio, 1 - s.epsilon_low, 1 + s.epsilon_high)
    per_token = -torch.min(ratio * a, clipped_ratio * a)  # (B, C) or (B, 1)
    kl = None
    if s.beta != 0.0:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + s.beta * kl
    B = logps.shape[0]
    if s.loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / grad_accum
    elif s.loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0) / grad_accum
    elif s.loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (B * s.max_completion_length) / grad_accum
    else:  # dapo
        total = mask.sum() if step_tokens is None else mask.new_tensor(float(step_tokens))
        loss = (per_token * mask).sum() / total.clamp(min=1.0)
    with torch.no_grad():
        low = ((ratio < 1 - s.epsilon_low) & (a < 0)).float()
        high = ((ratio > 1 + s.epsilon_high) & (a > 0)).float()
        if ratio.shape[1] == 1:  # GSPO: one ratio a row
            sums, count = (low.sum(), high.sum(), torch.maximum(low, high).sum()), float(B)
        else:
            sums = ((low * mask).sum(), (high * mask).sum(), (torch.maximum(low, high) * mask).sum())
            count = float(mask.sum())
        clipped = dict(zip(("low", "high", "region"), (float(x) for x in sums)))
        kl_sum = float((kl * mask).sum()) if kl is not None else 0.0
    return LossParts(loss, kl_sum, clipped, count)
