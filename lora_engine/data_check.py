"""`python -m lora_engine.data check FILE`: what training would make of a data file.

Prints record and format counts, a token-length histogram, exact duplicates, empty fields, what
truncation at --max-length would do, and one example rendered with its loss mask: text that is
trained on is shown between [[ and ]].
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

from lora_engine.data.formats import DataError, EmptyField, Example, detect_format, read_records, tokenize


def histogram(lengths: list[int], bins: int = 10, width: int = 40) -> list[str]:
    """Text histogram lines: 'lo-hi | ##### count'."""
    lo, hi = min(lengths), max(lengths)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((x - lo) // step for x in lengths)
    top = max(counts.values())
    lines = []
    for b in range((hi - lo) // step + 1):
        n = counts.get(b, 0)
        a = lo + b * step
        lines.append(f"{a:>6}-{a + step - 1:<6}| {'#' * max(1 if n else 0, round(width * n / top)):<{width}} {n}")
    return lines


def render_mask(ex: Example, tokenizer) -> str:
    """The example's text with trained spans in [[...]] (decoded span by span)."""
    out, span, cur = [], [], None
    for t, lab in zip(ex.input_ids, ex.labels):
        on = lab != -100
        if cur is not None and on != cur:
            out.append((tokenizer.decode(span), cur))
            span = []
        span.append(t)
        cur = on
    if span:
        out.append((tokenizer.decode(span), cur))
    return "".join(f"[[{s}]]" if on else s for s, on in out)


def check(path, tokenizer, fmt: str = "auto", max_length: int = 256, completion_only: bool = True,
          show: int = 0, file=None) -> dict:
    """Analyse a file; print the report to `file` and return the numbers as a dict."""
    records = read_records(path)
    file = file or sys.stdout
    p = lambda *a: print(*a, file=file)
    if not records:
        raise DataError(f"{path}: the file holds no records")
    formats, empty, examples, dup = Counter(), [], [], Counter()
    for r in records:
        dup[json.dumps(r.data, sort_keys=True, ensure_ascii=False)] += 1
        f = fmt if fmt != "auto" else detect_format(r)
        formats[f] += 1
        try:
            examples.append(tokenize(r, f, tokenizer, completion_only))
        except EmptyField as e:
            empty.append(str(e))
    dups = {k: n for k, n in dup.items() if n > 1}
    lengths = [len(e.input_ids) for e in examples]
    over = [e for e in examples if len(e.input_ids) > max_length]
    lost = [e for e in over if Example(e.input_ids[:max_length], e.labels[:max_length], e.where).n_targets == 0]
    targets_cut = sum(e.n_targets - Example(e.input_ids[:max_length], e.labels[:max_length], e.where).n_targets
                      for e in over)
    p(f"file: {path}")
    p(f"records: {len(records)}  formats: {dict(formats)}  usable examples: {len(examples)}")
    p(f"empty fields: {len(empty)} records (skipped by training)")
    for msg in empty[:5]:
        p(f"  {msg}")
    p(f"exact duplicates: {sum(n - 1 for n in dups.values())} extra copies of {len(dups)} records")
    if lengths:
        s = sorted(lengths)
        p(f"tokens per example: min {s[0]}, median {s[len(s) // 2]}, max {s[-1]}, total {sum(s)}; "
          f"target tokens {sum(e.n_targets for e in examples)}")
        p("token-length histogram:")
        for line in histogram(lengths):
            p("  " + line)
    p(f"truncation at --max-length {max_length}: {len(over)} examples truncated, {targets_cut} target tokens "
      f"cut, {len(lost)} examples would be dropped (no target left)")
    if examples:
        ex = examples[min(show, len(examples) - 1)]
        p(f"\nexample {ex.where} ({len(ex.input_ids)} tokens, {ex.n_targets} targets; loss on [[...]]):")
        p(render_mask(ex, tokenizer))
    return {"records": len(records), "formats": dict(formats), "examples": len(examples), "empty": len(empty),
            "duplicates": sum(n - 1 for n in dups.values()), "truncated": len(over), "dropped": len(lost),
            "target_tokens_cut": targets_cut}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lora_engine.data", description="Inspect a training data file.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help=__doc__.splitlines()[0])
    c.add_argument("file")
    c.add_argument("--model", default="smollm2-135m-instruct", help="whose tokenizer and chat template to use")
    c.add_argument("--format", default="auto", help="auto, text, alpaca, prompt_completion or chat")
    c.add_argument("--max-length", type=int, default=256)
    c.add_argument("--completion-only", action=argparse.BooleanOptionalAction, default=True,
                   help="loss only on responses / assistant turns (prompt and chat formats)")
    c.add_argument("--show", type=int, default=0, help="index of the example to render")
    a = ap.parse_args(argv)
    from lora_engine.models.tokenizer import load_tokenizer

    tok = load_tokenizer(a.model)
    try:
        check(a.file, tok, a.format, a.max_length, a.completion_only, a.show)
    except DataError as e:
        sys.exit(f"error: {e}")
