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

from lora_engine.models.generate import decode

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


_BATCH_TOKENS = 1024  # padded tokens per forward of choice_logprobs_many


def choice_logprobs(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Summed log-probability of each choice's tokens after `context`."""
    return choice_logprobs_many(model, tokenizer, [(context, choices)])[0]


@torch.no_grad()
def choice_logprobs_many(model, tokenizer, queries: list[tuple[str, list[str]]]) -> list[list[float]]:
    """choice_logprobs of many (context, choices) queries, in a few forwards.

    Each context is read once: the contexts of several queries (right-padded, plain causal attention,
    since a real token never sees the padding after it) fill a KV cache, whose rows are then copied
    once per choice (KVCache.select_rows), and every choice's tokens but its last go through one
    more forward on top, at its own positions and masked off its context's padding. Queries are
    grouped so that one group's padded tokens stay near _BATCH_TOKENS. Only the hidden states
    that predict a choice token go through the head (not (rows, T, V) logits); the log-softmax is
    fp32. Measured on a 2-core AVX2 EPYC, the embedded 100-item suite on SmolLM2-135M in fp32 (7,840
    tokens as whole sequences, 3,015 unpadded this way): one item a forward with full logits 24.5 s,
    whole sequences batched 18.2 s, this 9.6-12.3 s; the same 74 points. A model without
    hidden_states, new_cache and logits (a test's fake) gets its logits from forward, whole sequences, one
    query a call.
    """
    if not queries:
        return []
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = []
    for context, choices in queries:
        ctx = tokenizer.encode(context)
        if not ctx:
            raise ValueError(f"a multiple-choice context encodes to no tokens: {context!r}")
        conts = [tokenizer.encode(" " + c) for c in choices]
        if not conts or not all(conts):
            raise ValueError(f"a multiple-choice item needs choices that encode to tokens, got {choices!r} "
                             f"after {context!r}")
        encoded.append((ctx, conts))
    shared = all(hasattr(model, a) for a in ("hidden_states", "new_cache", "logits"))
    out: list[list[float]] = []
    start = 0
    while start < len(encoded):
        stop = start + 1
        while shared and stop < len(encoded) and _padded_tokens(encoded[start:stop + 1]) <= _BATCH_TOKENS:
            stop += 1
        score = _score_shared if shared else _score_whole
        out.extend(score(model, encoded[start:stop], pad, device))
        start = stop
    return out


def _padded_tokens(group) -> int:
    """Tokens of _score_shared's two forwards over `group`: the contexts, then the choices."""
    rows = sum(len(conts) for _, conts in group)
    return (len(group) * max(len(ctx) for ctx, _ in group)
            + rows * max(len(c) for _, conts in group for c in conts))


def _padded(seqs: list[list[int]], pad: int, device) -> torch.Tensor:
    width = max(map(len, seqs))
    return torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)


def _sums(logits: torch.Tensor, targets: list[int], rows: list[int], n: int, device) -> list[float]:
    """Per row, the sum of log_softmax(logits)[i, targets[i]] over the i with rows[i] == row."""
    tgt = torch.tensor(targets, device=device, dtype=torch.long)
    picked = torch.log_softmax(logits.float(), dim=-1).gather(1, tgt[:, None]).squeeze(1)
    row = torch.tensor(rows, device=device, dtype=torch.long)
    return torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, row, picked.double()).tolist()


def _per_query(sums: list[float], group) -> list[list[float]]:
    out, r = [], 0
    for _, conts in group:
        out.append(sums[r:r + len(conts)])
        r += len(conts)
    return out


def _score_shared(model, group, pad: int, device) -> list[list[float]]:
    ctxs = [ctx for ctx, _ in group]
    conts = [c for _, cs in group for c in cs]
    owner = [q for q, (_, cs) in enumerate(group) for _ in cs]
    owner_t = torch.tensor(owner, device=device)
    cache = model.new_cache(len(ctxs), max(map(len, ctxs)))
    h_ctx = model.hidden_states(_padded(ctxs, pad, device), cache=cache)  # (queries, Tc, D)
    # The first token of every choice is predicted by its context's last position ...
    ctx_len = torch.tensor([len(ctxs[o]) for o in owner], device=device)
    h = [h_ctx[owner_t, ctx_len - 1]]
    targets, rows = [c[0] for c in conts], list(range(len(conts)))
    longest = max(map(len, conts))
    if longest > 1:  # ... the others by the choice's own tokens before them, read on the context's cache
        ids = _padded([c[:-1] or [pad] for c in conts], pad, device)  # (rows, longest - 1)
        rc = cache.select_rows(owner_t, ids.shape[1])
        positions = ctx_len[:, None] + torch.arange(ids.shape[1], device=device)[None]
        mask = torch.cat([torch.arange(cache.pos, device=device)[None] < ctx_len[:, None],
                          torch.ones(len(conts), ids.shape[1], dtype=torch.bool, device=device)], 1)
        h_more = model.hidden_states(ids, attention_mask=mask.long(), position_ids=positions, cache=rc)
        r_idx = [r for r, c in enumerate(conts) for _ in c[1:]]
        j_idx = [j for c in conts for j in range(len(c) - 1)]
        h.append(h_more[torch.tensor(r_idx, device=device, dtype=torch.long),
                        torch.tensor(j_idx, device=device, dtype=torch.long)])
        targets += [t for c in conts for t in c[1:]]
        rows += r_idx
    return _per_query(_sums(model.logits(torch.cat(h)), targets, rows, len(conts), device), group)


def _score_whole(model, group, pad: int, device) -> list[list[float]]:
    seqs = [ctx + c for ctx, conts in group for c in conts]
    ids = _padded(seqs, pad, device)
    lengths = torch.tensor([len(s) for s in seqs], device=device)
    mask = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).long()
    logits = model(ids, attention_mask=mask)  # (rows, T, V); position t predicts token t + 1
    r_idx, t_idx, targets, r = [], [], [], 0
    for ctx, conts in group:
        for c in conts:
            r_idx += [r] * len(c)
            t_idx += range(len(ctx) - 1, len(ctx) - 1 + len(c))
            targets += c
            r += 1
    picked = logits[torch.tensor(r_idx, device=device), torch.tensor(t_idx, device=device)]
    return _per_query(_sums(picked, targets, r_idx, len(seqs), device), group)


def _choice_query(item: dict) -> tuple[str, list[str]]:
    return item.get("context") or f"Question: {item['question']}\nAnswer:", item["choices"]


def _picked(lp: list[float], item: dict) -> bool:
    return max(range(len(lp)), key=lp.__getitem__) == item["answer"]


def score_item(model, tokenizer, item: dict) -> bool:
    if item["kind"] == "multiple_choice":
        return _picked(choice_logprobs(model, tokenizer, *_choice_query(item)), item)
    prompt = item["prompt"]
    if item["chat"]:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    stop = getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id]
    n = len(tokenizer.encode(item["expected"])) + 16
    text = tokenizer.decode(decode(model, [tokenizer.encode(prompt)], n, stop_ids=stop).text_tokens(0))
    if item["match"] == "exact":
        return (text.strip().splitlines() or [""])[0].strip() == item["expected"].strip()
    return item["expected"].strip() in text


def score_suite(model, tokenizer, items: list[dict]) -> dict:
    """{"score": points (100 x correct / items), "items", "correct", and per kind {"items", "correct"}}."""
    was = model.training
    model.eval()
    try:
        choice = [i for i, it in enumerate(items) if it["kind"] == "multiple_choice"]  # scored in one batched call
        lps = choice_logprobs_many(model, tokenizer, [_choice_query(items[i]) for i in choice])
        picked = {i: _picked(lp, items[i]) for i, lp in zip(choice, lps)}
        results = [(it["kind"], picked[i] if i in picked else score_item(model, tokenizer, it))
                   for i, it in enumerate(items)]
    finally:
        model.train(was)
    out = {"score": 100.0 * sum(ok for _, ok in results) / len(results), "items": len(results),
           "correct": sum(ok for _, ok in results)}
    for kind in ("multiple_choice", "generation"):
        mine = [ok for k, ok in results if k == kind]
        if mine:
            out[kind] = {"items": len(mine), "correct": sum(mine)}
    return out
