"""Reward functions for --objective grpo: TRL's signature, the user's own by module:function, and built-ins.

    def f(prompts: list, completions: list, **fields) -> list[float | None]

prompts and completions are one entry per completion (a prompt repeated G times): plain strings, or,
for a chat prompt, its messages and [{"role": "assistant", "content": text}], as TRL passes them;
fields are the record's other keys, one value per completion (an "answer" column as answer=[...]),
plus completion_ids (token ids). None means "does not apply to this completion": the sum over
functions skips it (NaN-aware, as TRL), and a completion no function scored gets no advantage.

--reward takes a comma-separated list of names: a built-in below, or `module:function` imported
(the module from the current folder or the path). --reward-weights weighs them (default 1 each).
A function that raises, or returns a list of the wrong length or a value that is not a number or
None, stops the step with one error naming the function and the prompt.

Built-ins (each reads the record's "answer" field where it needs one):
  exact_match      1.0 when the completion's answer equals `answer` (stripped), else 0.0
  numeric_match    1.0 when the last number in the answer equals `answer` as a number, else 0.0
  think_format     1.0 when the completion is "<think>...</think>" followed by an answer, else 0.0
  regex_match      1.0 when the answer as a whole matches the record's "pattern" field (a Python regular
                   expression, e.g. "-?\\d+" for a number alone), else 0.0; None for a record without one
  length_penalty   -(completion characters) / 1000: shorter is better, as a tie-breaker
  repetition_penalty  -(the fraction of the completion's word 3-grams that repeat an earlier one), in (-1, 0]:
                   0 for text that never repeats itself, near -1 for a loop ("the the the ...")
The answer of a completion is the text after its last </think> when it has one, else the whole text.
"""

from __future__ import annotations

import importlib
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_engine.cli import CliError

THINK = re.compile(r"^\s*<think>.+?</think>\s*\S.*$", re.DOTALL)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
REPEAT_NGRAM = 3  # repetition_penalty's n: 3-grams, so one repeated common word pair ("of the") is no loop


class RewardError(CliError):
    """A reward function failed or returned what cannot be a reward; the message names it and the prompt. The
    user's input (their function, or --reward), so the command says it in one line and exits 2."""


def _text(completion) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def answer_of(completion) -> str:
    """The completion's answer: the text after its last </think>, else all of it, stripped."""
    text = _text(completion)
    return text.rpartition("</think>")[2].strip() if "</think>" in text else text.strip()


def exact_match(prompts, completions, answer, **_) -> list[float]:
    return [float(answer_of(c) == str(a).strip()) for c, a in zip(completions, answer)]


def numeric_match(prompts, completions, answer, **_) -> list[float]:
    out = []
    for c, a in zip(completions, answer):
        found = NUMBER.findall(answer_of(c).replace(",", ""))
        out.append(float(bool(found) and math.isclose(float(found[-1]), float(a), rel_tol=1e-9, abs_tol=1e-9)))
    return out


def think_format(prompts, completions, **_) -> list[float]:
    return [float(bool(THINK.match(_text(c)))) for c in completions]


def regex_match(prompts, completions, pattern=None, **_) -> list[float | None]:
    """1.0 where answer_of(completion) re.fullmatch-es the record's `pattern`; None where the record has none."""
    if pattern is None:
        raise ValueError('needs a "pattern" field in the records (a regular expression the answer must match)')
    out = []
    for c, p in zip(completions, pattern):
        if p is None:
            out.append(None)
            continue
        try:
            out.append(float(re.fullmatch(p, answer_of(c)) is not None))
        except re.error as e:  # the record's data, not the function: say which pattern
            raise ValueError(f"the record's pattern {p!r} is not a regular expression ({e})") from e
    return out


def length_penalty(prompts, completions, **_) -> list[float]:
    return [-len(_text(c)) / 1000 for c in completions]


def repetition_penalty(prompts, completions, **_) -> list[float]:
    """Minus the share of the completion's word REPEAT_NGRAM-grams that occurred earlier in it (whitespace-split
    words); a completion shorter than that has none, and gets 0. (n is fixed, not a keyword: the record's fields
    arrive as keywords, and a field of that name must not change it.)"""
    ngram, out = REPEAT_NGRAM, []
    for c in completions:
        words = _text(c).split()
        grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
        out.append(-(len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
    return out


BUILTINS: dict[str, Callable] = {f.__name__: f for f in (exact_match, numeric_match, think_format, regex_match,
                                                         length_penalty, repetition_penalty)}


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float = 1.0


def load_reward(spec: str) -> Callable:
    """A built-in's name, or `module:function` imported (the current folder first on the path)."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise RewardError(f"--reward {spec!r}: not a built-in ({', '.join(BUILTINS)}) nor module:function")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise RewardError(f"--reward {spec!r}: cannot import module {module!r} ({e})") from e
    except AttributeError as e:
        raise RewardError(f"--reward {spec!r}: module {module!r} has no {attr!r}") from e
    if not callable(fn):
        raise RewardError(f"--reward {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def load_rewards(specs: str, weights: str | None = None) -> list[Reward]:
    """--reward and --reward-weights as Rewards, in order."""
    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise RewardError("--objective grpo needs --reward: a built-in (" + ", ".join(BUILTINS) + ") or "
                          "module:function")
    ws = [1.0] * len(names)
    if weights:
        try:
            ws = [float(w) for w in weights.split(",")]
        except ValueError as e:
            raise RewardError(f"--reward-weights {weights!r}: not comma-separated numbers") from e
        if len(ws) != len(names) or not all(math.isfinite(w) for w in ws):
            raise RewardError(f"--reward-weights {weights!r}: {len(ws)} finite weights for {len(names)} rewards "
                              f"({', '.join(names)}); give one for each")
    return [Reward(n.rpartition(":")[2], load_reward(n), w) for n, w in zip(names, ws)]


def score(rewards: Sequence[Reward], prompts: list, completions: list, fields: dict[str, list]) -> torch.Tensor:
    """(N, F) fp32 rewards of N completions under F functions, NaN where a function returned None."""
    n = len(completions)
    cols = []
    for r in rewards:
        def where(i: int | None, name: str = r.name) -> str:  # None: the call as a whole, over the step's prompts
            if i is None:
                return f"--reward {name} on the prompts from {_short(prompts[0])} ({n} completions)"
            return f"--reward {name} on the prompt {_short(prompts[i])}"

        try:
            got = r.fn(prompts=prompts, completions=completions, **fields)
        except Exception as e:  # any failure of user code stops the step, named
            raise RewardError(f"{where(None)}: raised {type(e).__name__}: {e}") from e
        if not isinstance(got, list | tuple) or len(got) != n:
            size = f"{len(got)} values" if isinstance(got, list | tuple) else f"a {type(got).__name__}"
            raise RewardError(f"{where(None)}: returned {size} for {n} completions; return one float or None each")
        col = []
        for i, v in enumerate(got):
            if v is None:
                col.append(math.nan)
            elif isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise RewardError(f"{where(i)}: returned {v!r} for completion {i}; return a finite number or None")
            else:
                col.append(float(v))
        cols.append(col)
    return torch.tensor(cols, dtype=torch.float32).t().reshape(n, len(rewards))


def weighted_sum(per_func: torch.Tensor, rewards: Sequence[Reward]) -> torch.Tensor:
    """(N,) the weighted NaN-aware sum over functions; NaN where every function returned None (TRL)."""
    w = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
    total = (per_func * w[None]).nansum(dim=1)
    total[torch.isnan(per_func).all(dim=1)] = math.nan
    return total


def _short(prompt) -> str:
    text = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
    return repr(text if len(text) <= 80 else text[:77] + "...")
