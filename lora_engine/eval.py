"""Evaluation: target-task loss/perplexity, and a general-English check for forgetting.

    python -m lora_engine.eval --model smollm2-135m-instruct --adapter runs/x/adapter --data val.jsonl

evaluates the base model and the model with the adapter on the same data and prints the table:
target-task loss and perplexity (on --data, or the embedded held-out chat split), and perplexity on
a fixed slice of general English prose, with the relative change and a warning when general
perplexity rises past --forgetting-threshold. The evaluation itself: lora_engine/train/evaluate.py.
"""

from __future__ import annotations

import argparse
import sys

from lora_engine.cli import add_debug_flag, run_cli, user_input
from lora_engine.data.formats import read_records
from lora_engine.train.evaluate import compare, format_table, general_rows, run_eval, target_rows
from lora_engine.train.suite import general_suite, read_suite, score_suite


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
    ap.add_argument("--suite", action="append", default=[], metavar="FILE.jsonl|general",
                    help="also score a suite of multiple-choice and generation items (lora_engine/train/suite.py); "
                         "'general' is the embedded general-ability suite; may be repeated")
    add_debug_flag(ap)
    a = ap.parse_args(argv)
    from lora_engine.loading import load_model
    from lora_engine.models.tokenizer import load_tokenizer

    # The data before the model, so that a bad file is reported in seconds.
    records = read_records(a.data) if a.data else None
    with user_input("--suite"):
        suites = {s: general_suite() if s == "general" else read_suite(s) for s in a.suite}
    if a.adapter:
        from lora_engine.lora.adapter import read_adapter_config

        with user_input("--adapter"):
            read_adapter_config(a.adapter)  # not only after the base model's evaluation
    with user_input("--model"):
        tok = load_tokenizer(a.model)
    target = target_rows(tok, a.data, a.format, a.max_length, records=records)
    with user_input("--model"):
        model = load_model(a.model, **({"quantize": a.quantize} if a.quantize != "none" else {}))
    general = general_rows(tok, tokens=a.general_tokens) if a.general else None
    before = run_eval(model, tok, target, general, a.batch_size)
    if suites:
        before["suite"] = {s: score_suite(model, tok, items) for s, items in suites.items()}
    if a.adapter is None:
        print(format_table({"before": before, "after": before, "change": {k: 0.0 for k in before},
                            "warning": None}))
        for s, r in before.get("suite", {}).items():
            print(f"suite {s}: {r['score']:.1f} points ({r['correct']}/{r['items']})")
        return before
    from lora_engine.lora.adapter import load_adapter

    with user_input("--adapter"):
        load_adapter(model, a.adapter)
    after = run_eval(model, tok, target, general, a.batch_size)
    if suites:
        after["suite"] = {s: score_suite(model, tok, items) for s, items in suites.items()}
    cmp = compare(before, after, a.forgetting_threshold)
    print(format_table(cmp))
    for s in suites:
        b, f = before["suite"][s]["score"], after["suite"][s]["score"]
        print(f"suite {s}: {b:.1f} -> {f:.1f} points ({f - b:+.1f})")
    return cmp


if __name__ == "__main__":
    sys.exit(run_cli(main))
