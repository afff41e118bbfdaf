"""Evaluation suites: multiple-choice items scored by log-likelihood, generation items by match.

A suite file is JSONL, one item a line, of two kinds:

  {"question": "...", "choices": ["...", ...], "answer": 2}       answer: the index, or the choice itself
  {"prompt": "...", "expected": "...", "match": "exact"}          match: exact (default) or contains;
                                                                  "chat": true wraps the prompt in the chat template

Multiple choice, as evaluation harnesses score it ("acc"): the model reads "Question: Q\\nAnswer:"
and each choice as the continuation " C"; the choice whose tokens have the highest summed
log-probability is the model's answer. Generation: greedy decoding until end of sequence (at most
len(expected tokens) + 16 tokens); exact compares the first line of the output, stripped, with the
expected text; contains looks for the expected text anywhere in the output.

The embedded general-ability suite (general_suite) is built from the King James Bible the engine
ships for its forgetting check: 100 cloze items, each a passage's opening words and four candidate
next-word spans (the true one and three from other passages). A fine-tune that erodes general
English loses points here; `promote` in the registry refuses a drop past --max-regression.
Scores are points: 100 x correct / items.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

MATCHES = ("exact", "contains")


def read_suite(path: str | Path) -> list[dict]:
    """The items of a suite file, checked; raises ValueError naming the file, line and field."""
    path = Path(path)
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        items.append(check_item(item, where))
    if not items:
        raise ValueError(f"{path}: the suite holds no items")
    return items


def check_item(item, where: str) -> dict:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    if "question" in item:
        choices, answer = item.get("choices"), item.get("answer")
        if not isinstance(item["question"], str) or not isinstance(choices, list) or len(choices) < 2 or \
                not all(isinstance(c, str) and c for c in choices):
            raise ValueError(f"{where}: a multiple-choice item needs a question string and a list of at least two "
                             "non-empty choice strings")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer {answer!r} is neither an index into the {len(choices)} choices nor one "
                             "of them")
        return {"kind": "multiple_choice", "question": item["question"], "choices": choices, "answer": answer}
    if "prompt" in item:
        if not isinstance(item["prompt"], str) or not item["prompt"] or not isinstance(item.get("expected"), str) \
                or not item["expected"].strip():
            raise ValueError(f"{where}: a generation item needs a non-empty prompt and expected string")
        match = item.get("match", "exact")
        if match not in MATCHES:
            raise ValueError(f"{where}: match {match!r}; use one of {', '.join(MATCHES)}")
        return {"kind": "generation", "prompt": item["prompt"], "expected": item["expected"], "match": match,
                "chat": bool(item.get("chat", False))}
    raise ValueError(f"{where}: an item has either question/choices/answer (multiple choice) or prompt/expected "
                     f"(generation); got keys {sorted(item)}")


def general_suite(items: int = 100, context_words: int = 12, answer_words: int = 4) -> list[dict]:
    """The embedded general-ability suite: KJV cloze items, the same every time (see the module docstring)."""
    from lora_engine.data.embedded import general_text

    passages = [p.split() for p in general_text(n_chars=items * 160, pieces=items)]
    passages = [p for p in passages if len(p) >= context_words + answer_words]
    spans = [" ".join(p[context_words:context_words + answer_words]) for p in passages]
    out = []
    for i, p in enumerate(passages):
        others = [spans[(i + k) % len(spans)] for k in (7, 19, 41)]  # fixed strides: distractors from far away
        answer = i % 4
        choices = others[:answer] + [spans[i]] + others[answer:]
        out.append({"kind": "multiple_choice", "question": None, "context": " ".join(p[:context_words]),
                    "choices": choices, "answer": answer})
    return out


@torch.no_grad()
def choice_logprobs(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Summed log-probability of each choice's tokens after `context` (one padded batch of len(choices))."""
    device = next(model.parameters()).device
    ctx = tokenizer.encode(context)
    conts = [tokenizer.encode(" " + c) for c in choices]
    seqs = [ctx + c for c in conts]
    T = max(map(len, seqs))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs], device=device)  # (C, T)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=device)
    logp = torch.log_softmax(model(ids, attention_mask=mask).float(), dim=-1)  # (C, T, V)
    out = []
    for i, c in enumerate(conts):
        pos = torch.arange(len(ctx) - 1, len(ctx) - 1 + len(c), device=device)  # logits at t predict token t+1
        out.append(float(logp[i, pos, torch.tensor(c, device=device)].sum()))
    return out


@torch.no_grad()
def greedy(model, prompt_ids: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy decoding with the KV cache (generate.py sits above the training layer, so not its generate)."""
    device = next(model.parameters()).device
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    x, out = torch.tensor([prompt_ids], device=device), []
    for _ in range(max_new_tokens):
        tok = int(model(x, cache=cache)[0, -1].argmax())
        if tok in stop:
            break
        out.append(tok)
        x = torch.tensor([[tok]], device=device)
    return out


def score_item(model, tokenizer, item: dict) -> bool:
    if item["kind"] == "multiple_choice":
        context = item.get("context") or f"Question: {item['question']}\nAnswer:"
        lp = choice_logprobs(model, tokenizer, context, item["choices"])
        return max(range(len(lp)), key=lp.__getitem__) == item["answer"]
    prompt = item["prompt"]
    if item["chat"]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    stop = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    n = len(tokenizer.encode(item["expected"])) + 16
    text = tokenizer.decode(greedy(model, tokenizer.encode(prompt), n, stop))
    if item["match"] == "exact":
        return (text.strip().splitlines() or [""])[0].strip() == item["expected"].strip()
    return item["expected"].strip() in text


def score_suite(model, tokenizer, items: list[dict]) -> dict:
    """{"score": points (100 x correct / items), "items", "correct", and per kind {"items", "correct"}}."""
    was = model.training
    model.eval()
    try:
        results = [(it["kind"], score_item(model, tokenizer, it)) for it in items]
    finally:
        model.train(was)
    out = {"score": 100.0 * sum(ok for _, ok in results) / len(results), "items": len(results),
           "correct": sum(ok for _, ok in results)}
    for kind in ("multiple_choice", "generation"):
        mine = [ok for k, ok in results if k == kind]
        if mine:
            out[kind] = {"items": len(mine), "correct": sum(mine)}
    return out
