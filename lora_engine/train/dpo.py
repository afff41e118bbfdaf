"""DPO (Rafailov et al. 2023, "Direct Preference Optimization"), the sigmoid loss, for a LoRA model.

    r_c = beta * (log pi(chosen | prompt) - log pi_ref(chosen | prompt))         (the same for r_r)
    loss = -log sigmoid(r_c - r_r), averaged over pairs

log pi(y | x) is the sum of the token log-probabilities of the response tokens only (labels != -100,
labels[t + 1] predicted by position t, as in CausalLM.loss). The reference pi_ref is the same model
with its adapters switched off (lora.layers.adapters_disabled), so no second copy of the weights
exists; at initialisation (B = 0) policy and reference agree and the first loss is exactly ln 2.

Sequence log-probabilities come from dispatch.linear_cross_entropy with reduction="sum", one row at
a time, so the (tokens x vocab) logits are never materialised, for the policy or the reference.

A preference batch is a dict of (B, T) long tensors: chosen_input_ids, chosen_labels,
chosen_attention_mask and the same three for rejected (each row: prompt + response, prompt labels -100).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lora_engine import dispatch
from lora_engine.lora.layers import adapters_disabled


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
    w = model.lm_head.weight
    return torch.stack([-dispatch.linear_cross_entropy(h[i], w, targets[i], reduction="sum", backend=model.backend)
                        for i in range(h.shape[0])])


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1) -> DPOResult:
    """The sigmoid DPO loss from (B,) sequence log-probabilities; see the module docstring."""
    if not beta > 0:
        raise ValueError(f"--dpo-beta must be > 0, got {beta}")
    r_c = beta * (policy_chosen - ref_chosen)
    r_r = beta * (policy_rejected - ref_rejected)
    margin = r_c - r_r
    return DPOResult(-F.logsigmoid(margin).mean(), float(margin.detach().mean()),
                     float((margin.detach() > 0).float().mean()))


def dpo_batch_loss(model, batch: dict, beta: float = 0.1) -> DPOResult:
    """DPO on one preference batch: policy with the adapter, reference with it switched off (no grad)."""
    def logps(side):
        return sequence_logps(model, batch[f"{side}_input_ids"], batch[f"{side}_labels"],
                              batch.get(f"{side}_attention_mask"))

    with torch.no_grad(), adapters_disabled(model):
        ref_c, ref_r = logps("chosen"), logps("rejected")
    return dpo_loss(logps("chosen"), logps("rejected"), ref_c, ref_r, beta)
