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

from lora_engine.models.moe import MoEBlock


def even_group(experts, num_experts: int):
    """MoEBlock.group for the plan: the N*k slots in order, spread over the experts as evenly as whole
    numbers allow (module docstring)."""
    slots = experts.numel()
    with unset_fake_temporarily():  # real counts: the grouped op reads them to split its rows
        counts = torch.full((num_experts,), slots // num_experts, dtype=torch.int64)
        counts[: slots % num_experts] += 1
    return torch.arange(slots, device=experts.device), counts


def route_evenly(model: torch.nn.Module) -> int:
    """Every MoE block of `model` (each family's router kept: MoEBlock.route) groups its slots evenly from now
    on (for the plan only); returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    for m in blocks:
        m.group = even_group
    return len(blocks)
