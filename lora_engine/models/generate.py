"""The one decoder of the engine: a batch of prompts continued together with a KV cache.

    out = decode(model, [[1, 5, 9], [1, 7]], max_new_tokens=32)                  # greedy
    out = decode(model, [ids] * 8, 64, temperature=1.0, top_p=0.9, generator=g, logprobs=True)

Prompts of different lengths are left-padded to one width W: every row's last prompt token sits in
column W - 1, so one forward per step yields each row's next-token logits at the same place. The
padding is masked out of attention (attention_mask, (B, W + step)), and each row counts its own
positions from 0 at its first real token, so a row decodes as it would alone (greedy: the same
tokens, up to float rounding of the batched matmuls). Identical prompts (G samples of one prompt)
are read once: the prefill runs on the distinct prompts and the KV cache is copied to their rows
(KVCache.select_rows), then every step is one batched forward of B single tokens.

Greedy at temperature 0; else the logits are divided by the temperature, cut to the top_k likeliest
tokens and then to the smallest set whose probability reaches top_p, and a token is drawn with
`generator` (on the generator's device, so a seeded run repeats). A row stops at a stop id (kept as
its last token: a policy trained on its completions must learn to emit it) or once its text
contains a stop string (the tokenizer decodes it; the text is the caller's to cut), or after
max_new_tokens; the loop ends when every row has stopped.

The model is only called: CausalLM's hidden_states / logits / new_cache, with LoRA layers or NF4
weights swapped in or not.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# The most new tokens one call may ask for (and --max-new-tokens): Llama-3.1's 128k context. The KV
# cache is allocated for prompt + max_new_tokens up front, so a mistyped 10**9 fails here, not in malloc.
MAX_NEW_TOKENS = 131072


def check_settings(max_new_tokens: int, temperature: float, top_p: float, top_k: int,
                   name: Callable[[str], str] = str) -> None:
    """Raise ValueError for a setting decode cannot use; `name` spells a setting in the message
    (the command line passes its flag names, so `--top-p must be ...`)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
            not 0 < max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"{name('max_new_tokens')} must be a whole number in 1..{MAX_NEW_TOKENS}, "
                         f"got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{name('temperature')} must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"{name('top_p')} must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"{name('top_k')} must be a whole number >= 0 (0 = no limit), got {top_k!r}")


@dataclass
class Completions:
    """What decode returns, one entry per prompt row, in the prompts' order.

    tokens:   the new token ids; a stop id that ended the row is its last one.
    ended_by: the stop id or stop string that ended the row, or None if max_new_tokens did.
    logprobs: with logprobs=True, log p of each token in `tokens` under the distribution it was drawn
              from before the top-k/top-p cut: log_softmax(logits / temperature), or log_softmax(logits)
              when greedy; fp32 values as floats. Else None.
    """

    tokens: list[list[int]]
    ended_by: list[int | str | None]
    logprobs: list[list[float]] | None = None

    def text_tokens(self, row: int) -> list[int]:
        """The row's tokens without the stop id that ended it (what a reader is shown)."""
        end = self.ended_by[row]
        toks = self.tokens[row]
        return toks[:-1] if isinstance(end, int) and toks and toks[-1] == end else toks


@torch.no_grad()
def decode(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    generator: torch.Generator | None = None,
    logprobs: bool = False,
    pad_id: int = 0,
    on_token: Callable[[int, int], None] | None = None,
) -> Completions:
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens; see the module docstring.

    stop_strings need `tokenizer` (anything with decode(ids) -> str). on_token(row, token) is called for
    each token as it joins its row (streaming). pad_id fills the left padding; it is never attended to.
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        return Completions([], [], [] if logprobs else None)
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"decode: prompt {i} is empty; give at least one token")
    check_settings(max_new_tokens, temperature, top_p, top_k)
    if stop_strings and tokenizer is None:
        raise ValueError("decode: stop_strings need a tokenizer to read the text")
    stops = set(stop_ids)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return _decode(model, prompts, max_new_tokens, (temperature, top_p, top_k), stops, list(stop_strings),
                       tokenizer, generator, logprobs, pad_id, on_token, device)
    finally:
        model.train(was_training)


def _decode(model, prompts, max_new_tokens, sampling, stops, stop_strings, tokenizer, generator, want_logprobs,
            pad_id, on_token, device) -> Completions:
    B = len(prompts)
    distinct = list(dict.fromkeys(map(tuple, prompts)))
    owner = torch.tensor([distinct.index(tuple(p)) for p in prompts], device=device)  # (B,) row -> distinct prompt
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    W = max(map(len, distinct))
    padded = len(set(map(len, distinct))) > 1
    ids = torch.tensor([[pad_id] * (W - len(p)) + list(p) for p in distinct], device=device)  # (U, W)
    real = torch.arange(W, device=device)[None] >= W - torch.tensor([len(p) for p in distinct], device=device)[:, None]
    cache = model.new_cache(len(distinct), W + (max_new_tokens if len(distinct) == B else 0))
    if padded:  # positions from 0 at each row's first real token; the padding's are never seen
        logits = _next_logits(model, ids, real, (real.cumsum(1) - 1).clamp(min=0), cache)
    else:
        logits = _next_logits(model, ids, None, None, cache)
    if len(distinct) < B:  # G copies of a prompt: its cache row copied G times, not its prefill run G times
        cache = cache.select_rows(owner, max_new_tokens)
        logits = logits.index_select(0, owner)
    mask = real.index_select(0, owner) if padded else None  # (B, W), grows by a column a step

    tokens: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    ended: list[int | str | None] = [None] * B
    active = list(range(B))
    done = []  # the (B, 1) tokens fed so far, for a run from the start (cache_stale)
    for step in range(max_new_tokens):
        tok, lp = _choose(logits, *sampling, generator)  # (B,), (B,)
        tok_list, lp_list = tok.tolist(), lp.tolist() if want_logprobs else None
        for r in active:
            tokens[r].append(tok_list[r])
            if want_logprobs:
                lps[r].append(lp_list[r])
            if on_token is not None:
                on_token(r, tok_list[r])
            ended[r] = _stop(tokens[r], stops, stop_strings, tokenizer)
        active = [r for r in active if ended[r] is None]
        if not active or step == max_new_tokens - 1:
            break
        x = tok.to(device)[:, None]  # (B, 1): stopped rows run on too, their tokens unused
        done.append(x)
        if getattr(model, "cache_stale", None) is not None and model.cache_stale(cache, 1):
            # longrope passing its original length: the whole sequence again, as transformers' generate does
            cache = model.new_cache(B, W + max_new_tokens)
            full = torch.cat([ids.index_select(0, owner), *done], 1)  # (B, W + step + 1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
                logits = _next_logits(model, full, mask, (mask.cumsum(1) - 1).clamp(min=0), cache)
            else:
                logits = _next_logits(model, full, None, None, cache)
            continue
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], 1)
            logits = _next_logits(model, x, mask, (lengths + step)[:, None], cache)
        else:
            logits = _next_logits(model, x, None, None, cache)
    return Completions(tokens, ended, lps if want_logprobs else None)


def _next_logits(model, ids, attention_mask, position_ids, cache) -> torch.Tensor:
    """fp32 logits (B, V) of the token after each row of ids (B, T): the head on the last position only."""
    h = model.hidden_states(ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache)
    return model.logits(h[:, -1]).float()


def _choose(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator):
    """The next token of each row of logits (B, V) fp32, and its log-probability (Completions.logprobs)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
    logits = logits / temperature
    cut = logits
    if top_k and top_k < logits.shape[-1]:  # as transformers: top-k on the logits, then top-p on what is left
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        cut = logits.masked_fill(logits < kth, -math.inf)  # ties with the k-th token stay in
    probs = torch.softmax(cut, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    where = generator.device if generator is not None else probs.device
    tok = torch.multinomial(probs.to(where), 1, generator=generator)[:, 0].to(logits.device)
    return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]


def _stop(row: list[int], stops: set[int], stop_strings: list[str], tokenizer) -> int | str | None:
    """What ends a row whose last token was just added: a stop id, a stop string in its text, or None."""
    if row[-1] in stops:
        return row[-1]
    if stop_strings:
        # A stop string not found before ends in the newest token: a tail of 4 tokens per character (UTF-8's
        # longest) and a few spare decodes it whole, and keeps the check short however long the row grows.
        tail = tokenizer.decode(row[-(4 * max(map(len, stop_strings)) + 4):])
        return next((s for s in stop_strings if s in tail), None)
    return None
