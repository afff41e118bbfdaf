"""Where a chat template puts each assistant turn: the characters of the rendered conversation the loss is on.

The conversation is rendered whole once (`full`); what is trained is what `full` shows, whatever the template
did to a message (trimmed it, dropped the `<think>` block of an earlier turn). The spans come from the first
of these rules that holds:

1. `{% generation %}` markers. A template that marks what the model writes with them (TRL's *_training.jinja
   templates, some checkpoints') is rendered once with the blocks tracked, and the spans are the blocks:
   transformers' `return_assistant_tokens_mask` rule, so the mask is the one transformers makes.
2. Prefixes, per assistant message i: render(messages[:i], add_generation_prompt=True) and
   render(messages[:i + 1]) are prefixes of `full` (ChatML, Llama 3, Gemma, Phi-3, SmolLM3...), and the turn
   is what the second adds to the first: its text, the tool calls, the end-of-turn marker. This is the rule the
   engine has always used; it is tried first so that every template it handled keeps the same spans.
3. Sentinels, when rule 2 fails for a turn. Reasoning templates (Qwen3's) render a turn one way while it is
   the last one (with a `<think>...</think>` block, empty when there is no reasoning) and another once a user
   turn follows it (the block stripped), so render(messages[:i + 1]) is no prefix of `full`. The turn's end is
   found by rendering the conversation again with a unique sentinel appended to the last thing message i
   writes that the rendering shows (the name of a tool call, from the last, else its content): what follows the
   sentinel there is what follows that point in `full`, which places it whatever the template did before it.
   The turn's closing (the `<|im_end|>\\n` after it) is what follows the sentinel when the turn is rendered
   last, less an EOS the template writes only at the very end (gpt-oss's `<|return|>`, which becomes `<|end|>`
   once other turns follow: the model learns to write it from the last turn). The turn starts where the
   generation prompt (render(messages[:i], add_generation_prompt=True)) parts from `full`.
   A message the rendering does not show at all (the sentinel appears nowhere and `full` is unchanged) has no
   span; a template that shows no assistant message is an error.

A template whose rendering defeats all three is reported (SpanError), never guessed at.
"""

from __future__ import annotations

import os
import re

# The block Qwen3's template writes into the last assistant turn when it has no reasoning (and into the
# generation prompt when thinking is off), SmolLM3's into every turn in /no_think mode. Qwen3.5's generation
# prompt opens it (`<think>\n`), so its turns start inside it: then the rest of it opens the turn.
EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
OPEN_THINK = re.compile(r"<think>\s*\Z")
CLOSE_EMPTY_THINK = re.compile(r"\s*</think>\s*")
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Older names of a message's reasoning, filled into `reasoning_content` (what Qwen3's template reads) and
# `thinking` (gpt-oss's), as transformers does before rendering.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class SpanError(ValueError):
    """The assistant turns of a conversation cannot be located in its rendering; the message says which."""


def alias_reasoning(messages: list[dict]) -> list[dict]:
    """`messages` with a reasoning given under any of REASONING_FIELDS also under the names templates read."""
    out = []
    for m in messages:
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        out.append({"thinking": reasoning, **m, "reasoning_content": reasoning} if reasoning is not None else m)
    return out


def assistant_spans(render, messages: list[dict], template: str | None, eos: str | None
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(the rendering of `messages`, the (start, end) characters of each assistant turn in it, in order).

    `render(messages, add_generation_prompt, generation_spans=None) -> str` renders with the tokenizer's
    template (`template`, its source, tells whether it has generation markers); `eos` is the tokenizer's EOS,
    which templates like Phi-3's write only where the conversation ends. Raises SpanError.
    """
    if template and GENERATION_TAG.search(template):
        marked: list[tuple[int, int]] = []
        full = render(messages, False, marked)
        spans = _merged([(s, e) for s, e in marked if e > s])
        if not spans:
            raise SpanError("the chat template has {% generation %} markers but marks no assistant output in this "
                            "conversation, so there is nothing to train on; mark the assistant turns with them")
        return full, spans
    full = render(messages, False)
    spans, done = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        span = _prefix_span(render, messages, i, full, eos, done)
        if span is None:
            span = _sentinel_span(render, messages, i, full, eos, done)
        if span is not None:
            spans.append(span)
            done = span[1]
    if not spans:
        raise SpanError("the chat template renders none of the assistant messages, so there is nothing to train on")
    return full, spans


def _merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans in order, those that overlap or touch joined: nested {% generation %} blocks are recorded inner first,
    and transformers' mask is their union."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _prefix_span(render, messages, i, full, eos, done) -> tuple[int, int] | None:
    """Rule 2: the turn is what render(messages[:i + 1]) adds to the generation prompt, when both are prefixes of
    `full`; None otherwise."""
    before = render(messages[:i], True)
    upto = _closed_turn(render(messages[: i + 1], False), full, eos)
    if full.startswith(before) and full.startswith(upto) and len(before) >= done and upto.startswith(before):
        return len(before), len(upto)
    return None


def _closed_turn(upto: str, full: str, eos: str | None) -> str:
    """`upto` without the EOS a template writes only where a conversation ends (Phi-3's, after the last
    <|end|>): that EOS is learnt on the last turn, where the whole conversation has it too."""
    if eos and not full.startswith(upto) and upto.endswith(eos) and full.startswith(upto[: -len(eos)]):
        return upto[: -len(eos)]
    return upto


def _sentinel_span(render, messages, i, full, eos, done) -> tuple[int, int] | None:
    """Rule 3 (module docstring): the turn's span in `full` located by a sentinel; None when message i is not in
    the rendering at all. Raises SpanError when the template defeats the rule."""
    sentinel = _unique_sentinel(messages, full)
    places = _places(messages[i])
    start = _start(render, messages, i, full, done, sentinel)
    hidden = 0
    for place in places:
        changed = _with_sentinel(messages, i, place, sentinel)
        end = _anchor(render, changed, full, sentinel)
        if end == "hidden":
            hidden += 1
            continue
        if start is None or end is None or end < start:
            continue
        closing = _after(render(changed[: i + 1], False), sentinel)  # the turn rendered last: what closes it
        if closing is None:
            continue
        if full.startswith(closing, end):
            return start, end + len(closing)
        if eos and closing.endswith(eos) and full.startswith(closing[: -len(eos)], end):
            return start, end + len(closing) - len(eos)
    if places and hidden == len(places):
        return None
    raise SpanError(f"the chat template renders messages[{i}] (an assistant turn) so that its place in the "
                    "conversation cannot be found (it changes with the turns around it); mark the assistant output "
                    "with {% generation %} in the template, or pass --no-completion-only to train on all tokens")


def _anchor(render, changed, full, sentinel) -> int | str | None:
    """Where in `full` the text after the sentinel of `changed` (messages with one sentinel in them) begins: the
    same text follows it in both renderings. "hidden" when the template does not show the sentinel's part of the
    message (the rendering is `full`); None when the rendering does not place it."""
    marked = render(changed, False)
    if sentinel not in marked and marked == full:
        return "hidden"
    tail = _after(marked, sentinel)
    return len(full) - len(tail) if tail is not None and full.endswith(tail) else None


def _after(text: str, sentinel: str) -> str | None:
    """The text after the first sentinel, where the message's own rendering writes it, with any later ones (a
    tool's name written again with its result, as gpt-oss's template does) taken out; None without one."""
    _, found, tail = text.partition(sentinel)
    return tail.replace(sentinel, "") if found else None


def _start(render, messages, i, full, done, sentinel) -> int | None:
    """Where turn i starts in `full`: the end of the generation prompt after messages[:i]. Where the prompt's
    conversation is the start of `full` (as in rule 2), where the prompt parts from `full`; else (Qwen3 renders an
    earlier turn's thinking while a tool result is the last message, and strips it once a user turn follows) the
    end of the prompt's own header (its text after the conversation, `<|im_start|>assistant\\n`) where it first
    follows message i - 1 in `full`."""
    base = render(messages[:i], False)
    prompt = render(messages[:i], True)
    common = len(os.path.commonprefix([base, prompt]))  # the conversation before the turn, as the prompt has it
    n = len(os.path.commonprefix([prompt, full]))
    if n >= common:
        return n if n >= done else None
    header = prompt[common:]
    after = None
    for place in _places(messages[i - 1]) if i else ():
        after = _anchor(render, _with_sentinel(messages, i - 1, place, sentinel), full, sentinel)
        if isinstance(after, int):
            break
    lo = max(done, after if isinstance(after, int) else 0)
    # As where the prompt parts from `full` above: the longest start of the header found there (Nemotron's prompt
    # opens `<think>\n` where the whole conversation shows `<think></think>`), at least half of it.
    for n in range(len(header), (len(header) + 1) // 2 - 1, -1):
        if n and (at := full.find(header[:n], lo)) >= 0:
            return at + n
    return None


def _unique_sentinel(messages, full) -> str:
    """A marker found nowhere in the conversation or its rendering: plain ASCII, no spaces, nothing JSON escapes,
    so that templates which trim text or write it with tojson keep it whole."""
    k = 0
    while (tag := f"@@span-sentinel-{k}@@") in full or any(tag in str(m) for m in messages):
        k += 1
    return tag


def _places(message: dict) -> list[tuple[str, int]]:
    """Where a sentinel goes on a message, last-written first: the names of its tool calls from the last one (the
    last thing a turn with tool calls writes; a template may show only some of them, gpt-oss's only the first),
    then its content. ("tool call", index) or ("content", 0)."""
    calls = message.get("tool_calls") or []
    named = [("tool call", k) for k in reversed(range(len(calls))) if _name_of(calls[k]) is not None]
    has_text = isinstance(message.get("content"), str) and message["content"]
    return named + ([("content", 0)] if has_text else [])


def _name_of(call: dict) -> str | None:
    """Which key holds a tool call's name: OpenAI's {"function": {"name"}} or a bare {"name"}."""
    fn = call.get("function")
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return "function"
    return "name" if isinstance(call.get("name"), str) else None


def _with_sentinel(messages, i, place, sentinel) -> list[dict]:
    """`messages` with `sentinel` appended at `place` (one of _places) of message i."""
    m = messages[i]
    kind, k = place
    if kind == "content":
        changed = {**m, "content": m["content"] + sentinel}
    else:
        call = dict(m["tool_calls"][k])
        if _name_of(call) == "function":
            call["function"] = {**call["function"], "name": call["function"]["name"] + sentinel}
        else:
            call["name"] += sentinel
        changed = {**m, "tool_calls": [*m["tool_calls"][:k], call, *m["tool_calls"][k + 1:]]}
    return [*messages[:i], changed, *messages[i + 1:]]


def _empty_think(full: str, start: int, end: int):
    """The match of an empty think block that opens the span [start, end) of `full`, or of its rest when the text
    before the span opens it; None when the span opens otherwise."""
    if OPEN_THINK.search(full, max(0, start - 32), start):
        return CLOSE_EMPTY_THINK.match(full, start, end)
    return EMPTY_THINK.match(full, start, end)


def segments(full: str, spans: list[tuple[int, int]], completion_only: bool, mask_empty_think: bool
             ) -> list[tuple[str, bool]]:
    """`full` cut into (text, trainable) pieces: the spans trained, the rest only without `completion_only`;
    with `mask_empty_think`, an empty think block opening a span is not trained (see README)."""
    out: list[tuple[str, bool]] = []
    done = 0
    for start, end in spans:
        out.append((full[done:start], not completion_only))
        think = _empty_think(full, start, end) if mask_empty_think else None
        if think:
            out.append((full[start:think.end()], False))
            start = think.end()
        out.append((full[start:end], True))
        done = end
    out.append((full[done:], not completion_only))
    return [s for s in out if s[0]]
