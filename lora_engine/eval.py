"""Evaluation: target-task loss/perplexity, and a general-English check for forgetting.

    python -m lora_engine.eval --model smollm2-135m-instruct --adapter runs/x/adapter --data val.jsonl

evaluates the base model and the model with the adapter on the same data and prints the table:
target-task loss and perplexity (on --data, or the embedded held-out chat split), and perplexity on
a fixed slice of general English prose, with the relative change and a warning when general
perplexity rises past --forgetting-threshold. The evaluation itself: lora_engine/train/evaluate.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from lora_engine.cli import logs_to, option, option_like, parse, run_cli, user_input
from lora_engine.data.sources import read_source
from lora_engine.registry import refs
from lora_engine.train.config import TrainConfig, quantize_method
from lora_engine.train.evaluate import compare, format_table, general_rows, run_eval, target_rows
from lora_engine.train.suite import general_suite, read_suite, score_suite


@dataclass
class EvalConfig:
    """The command line of `python -m lora_engine.eval`: the settings it shares with training are
    TrainConfig's fields (defaults, help, choices), declared once there."""

    model: str = option_like(TrainConfig, "model")
    adapter: str | None = option(None, "LoRA adapter folder; without it only the base is evaluated")
    data: str | None = option(None, "evaluation file (default: the embedded held-out chat split)")
    format: str = option_like(TrainConfig, "format")
    max_length: int = option_like(TrainConfig, "max_length")
    batch_size: int = option_like(TrainConfig, "eval_batch_size")
    general: bool = option_like(TrainConfig, "general_eval")
    general_tokens: int = option_like(TrainConfig, "general_tokens")
    forgetting_threshold: float = option_like(TrainConfig, "forgetting_threshold")
    quantize: str = option_like(TrainConfig, "quantize")
    suite: str | None = option(None, "also score suites of multiple-choice and generation items "
                                     "(lora_engine/train/suite.py), comma-separated FILE.jsonl names; 'general' "
                                     "is the embedded general-ability suite")
    registry: str | None = option_like(TrainConfig, "registry")

    def __post_init__(self):
        for name in ("max_length", "batch_size", "general_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@logs_to("stdout")
def main(argv=None):
    a, _ = parse(EvalConfig, argv, "python -m lora_engine.eval", __doc__.splitlines()[0])
    with user_input(""):
        a = refs.resolve_fields(a, ("model", "adapter"), a.registry)
    from lora_engine.loading import load_model
    from lora_engine.models.tokenizer import load_tokenizer

    # The data before the model, so that a bad file is reported in seconds.
    records = read_source(a.data) if a.data else None
    with user_input("--suite"):
        names = [s.strip() for s in (a.suite or "").split(",") if s.strip()]
        suites = {s: general_suite() if s == "general" else read_suite(s) for s in names}
    if a.adapter:
        from lora_engine.lora.adapter import read_adapter_config

        with user_input("--adapter"):
            read_adapter_config(a.adapter)  # not only after the base model's evaluation
    with user_input("--model"):
        tok = load_tokenizer(a.model)
    target = target_rows(tok, a.data, a.format, a.max_length, records=records)
    with user_input("--model"):
        model = load_model(a.model, quantize=quantize_method(a.quantize))
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
