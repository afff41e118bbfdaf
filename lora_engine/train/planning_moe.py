"""The plan of a mixture-of-experts step (train/planning.py): routing that needs no data.

Which expert a token goes to depends on the router's values, which a FakeTensorMode does not have (torch's
bincount of fake expert ids has no size). The plan's MoE layers therefore route evenly: the N*k slots of
N tokens spread over the E experts as equally as whole numbers allow, as a load-balanced router does on
average. Everything else is the engine's own code: the router's logits, softmax and top-k (their
activations counted), the gather of each slot's token, the experts' matmuls through dispatch.moe_grouped_mm
(NF4 experts dequantized one at a time, expert LoRA on the k active experts' rows) and the weighted sum back.
The peak does not depend on how the slots are split: the expert activations are (N*k, .) either way, and
an NF4 expert's dense workspace is one (N, K) slice whichever expert it is.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from lora_engine.kernels import moe_reference
from lora_engine.models.moe import MoEBlock


class PlannedMoEBlock(MoEBlock):
    """MoEBlock with even routing (module docstring); the same parameters and the same ops otherwise."""

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        logits = self.gate(flat)  # (N, E)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, _ = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        self.router_logits = logits
        slots, E = flat.shape[0] * self.top_k, probs.shape[-1]
        with unset_fake_temporarily():  # real counts: the grouped op reads them to split its rows
            counts = torch.full((E,), slots // E, dtype=torch.int64)
            counts[: slots % E] += 1
        order = torch.arange(slots, device=x.device)
        y = self.experts(flat[order // self.top_k], counts)  # (N*k, D)
        return moe_reference.combine(y, order, weights.to(logits.dtype)).view(B, T, D)


def route_evenly(model: torch.nn.Module) -> int:
    """Every MoEBlock of `model` routes evenly from now on (for the plan only); returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    for m in blocks:
        m.__class__ = PlannedMoEBlock
    return len(blocks)
