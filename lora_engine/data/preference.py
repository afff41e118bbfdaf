"""Preference data for DPO: {"prompt", "chosen", "rejected"} records -> pairs of rows -> pair batches.

A record is plain text, {"prompt": str, "chosen": str, "rejected": str}, rendered like a
prompt_completion record (the completion gets EOS), or chat, {"prompt": [messages], "chosen": ...},
where chosen and rejected are an assistant message's content (a string) or a list of messages (TRL's
conversational form, e.g. [{"role": "assistant", "content": ...}]); the conversation prompt + response
goes through the tokenizer's chat template as an SFT chat record does (formats.segments).

Labels mark the response only: the final trained segment (the last assistant turn and its end
token, or the completion and EOS). Both sides of a pair share the prompt's tokens, so a truncation
at --max-length that leaves no response token on either side drops the pair (with a warning naming
its records), and so does an identical chosen/rejected (a pair with nothing to learn; counted as
"identical" in the stats, which run.json records); an empty response is an error naming the record,
as is anything formats.py would refuse.

    pairs = pairs_from_records(read_records("prefs.jsonl"), tok, stats)
    rows = prepare_pairs(pairs, max_length=256, stats=stats, warn=log)
    batcher = PairBatcher(rows, batch_size=4, seed=0, pad_id=tok.pad_token_id)
    batch = batcher.next()   # chosen_input_ids, chosen_labels, chosen_attention_mask, rejected_... (B, T); where
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from lora_engine.data.formats import DataError, EmptyField, Example, Record, check_messages, segments
from lora_engine.data.pipeline import Batcher, Row, collate

KEYS = ("prompt", "chosen", "rejected")


@dataclass
class Pair:
    chosen: Example
    rejected: Example
    where: str


class IdenticalPair(DataError):
    """A record whose chosen and rejected responses are the same: training drops it, the data check reports it."""


def is_preference(records: list[Record]) -> bool:
    """Whether the records are preference records (the first one has prompt, chosen and rejected)."""
    return bool(records) and all(k in records[0].data for k in KEYS)


def _response(record: Record, key: str) -> list[dict] | str:
    """chosen or rejected, checked: a non-empty string, or a list of {role: str, content: str} messages."""
    v = record.data.get(key)
    if isinstance(v, str):
        if not v.strip():
            raise DataError(f"{record.where}: {key!r} is empty; a preference pair needs two non-empty responses")
        return v
    if isinstance(v, list):
        return check_messages(record.where, v, key)
    raise DataError(f"{record.where}: {key!r} must be a non-empty string or a list of {{role, content}} messages, got "
                    f"{type(v).__name__ if v is not None else 'nothing'}")


def _prompt(record: Record) -> list[dict] | str:
    """The prompt, checked: a non-empty string, or a list of {role: str, content: str} messages."""
    prompt = record.data["prompt"]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{record.where}: 'prompt' is empty")
        return prompt
    if isinstance(prompt, list) and prompt:
        return check_messages(record.where, prompt, "prompt")
    raise DataError(f"{record.where}: 'prompt' must be a string or a non-empty list of {{role, content}} messages, "
                    f"got {type(prompt).__name__ if prompt is not None else 'nothing'}")


def _side(record: Record, prompt, response, tokenizer) -> Example:
    """prompt + response as token ids, labels on the response's tokens only."""
    if isinstance(prompt, str):
        if not isinstance(response, str):
            raise DataError(f"{record.where}: a plain-text prompt needs plain-text responses, got messages")
        rec = Record({"prompt": prompt, "completion": response}, record.where)
        segs, fmt = segments(rec, "prompt_completion", tokenizer), "text"
    else:
        msgs = list(prompt) + ([{"role": "assistant", "content": response}] if isinstance(response, str)
                               else list(response))
        if msgs[-1].get("role") != "assistant":
            raise DataError(f"{record.where}: the response must end with an assistant message, got role "
                            f"{msgs[-1].get('role')!r}")
        segs, fmt = segments(Record({"messages": msgs}, record.where), "chat", tokenizer), "chat"
    last = max(i for i, (_, trainable) in enumerate(segs) if trainable)  # the response; earlier turns are prompt
    ids: list[int] = list(tokenizer.prefix_ids) if fmt == "text" else []
    labels: list[int] = [-100] * len(ids)
    for i, (text, _) in enumerate(segs):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if i == last else [-100] * len(piece)
    if fmt == "text" and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Example(ids, labels, record.where)


def pair_from_record(record: Record, tokenizer) -> Pair:
    """One preference record as a Pair. Raises DataError naming the record for a missing, empty or malformed field
    and for identical chosen and rejected responses (a pair that teaches nothing)."""
    missing = [k for k in KEYS if k not in record.data]
    if missing:
        raise DataError(f"{record.where}: missing {missing} for a preference record {{prompt, chosen, rejected}} "
                        f"(has {sorted(record.data)})")
    try:
        prompt, chosen, rejected = _prompt(record), _response(record, "chosen"), _response(record, "rejected")
    except EmptyField as e:  # an empty message: as fatal here as an empty response (SFT skips such records)
        raise DataError(f"{e}; a preference pair needs a prompt and two non-empty responses") from None
    if json.dumps(chosen, sort_keys=True) == json.dumps(rejected, sort_keys=True):
        raise IdenticalPair(f"{record.where}: 'chosen' and 'rejected' are identical; such a pair has no preference to "
                        "learn (its DPO gradient is zero): fix or remove it")
    return Pair(_side(record, prompt, chosen, tokenizer), _side(record, prompt, rejected, tokenizer), record.where)


def pairs_from_records(records: list[Record], tokenizer, stats: dict | None = None, source: str = "the data",
                       warn: Callable[[str], None] | None = None) -> list[Pair]:
    """Every record as a Pair (DataError at the first bad one); stats["records"], stats["formats"] counted.

    A pair whose chosen and rejected are identical is dropped, counted in stats["identical"] and named to
    `warn`: one such pair in a large file should not refuse the run. DataError when no pair is left."""
    if not records:
        raise DataError(f"{source}: the file holds no records")
    stats = stats if stats is not None else {}
    out, identical = [], []
    for r in records:
        try:
            out.append(pair_from_record(r, tokenizer))
        except IdenticalPair:
            identical.append(r.where)
    stats["identical"] = stats.get("identical", 0) + len(identical)
    if identical and warn is not None:
        warn(f"warning: {len(identical)} preference pairs dropped: 'chosen' and 'rejected' are identical, nothing "
             f"to learn ({', '.join(identical[:3])}{', ...' if len(identical) > 3 else ''}); fix or remove them")
    if not out:
        raise DataError(f"{source}: every one of its {len(records)} preference pairs has identical 'chosen' and "
                        f"'rejected' (first {identical[0]}): no preference to learn")
    kinds = ["text" if isinstance(r.data["prompt"], str) else "chat" for r in records]
    stats["records"] = stats.get("records", 0) + len(records)
    stats["formats"] = {f"preference ({k})": kinds.count(k) for k in sorted(set(kinds))}
    return out


def _cut(e: Example, max_length: int) -> Example:
    return Example(e.input_ids[:max_length], e.labels[:max_length], e.where)


def prepare_pairs(pairs: list[Pair], max_length: int, stats: dict | None = None,
                  warn: Callable[[str], None] | None = None) -> list[tuple[Row, Row]]:
    """(chosen row, rejected row) per pair, truncated to max_length. A pair whose prompt leaves no response token
    on a side is dropped; `warn` is told which (the first few by record) and how many."""
    if max_length < 2:
        raise DataError(f"--max-length must be at least 2 tokens, got {max_length}")
    stats = stats if stats is not None else {}
    rows, dropped, truncated = [], [], 0
    for p in pairs:
        c, r = _cut(p.chosen, max_length), _cut(p.rejected, max_length)
        truncated += len(p.chosen.input_ids) > max_length or len(p.rejected.input_ids) > max_length
        if c.n_targets == 0 or r.n_targets == 0:
            dropped.append(p.where)
            continue
        rows.append(tuple(Row(e.input_ids, e.labels, list(range(len(e.input_ids))), [0] * len(e.input_ids), [p.where])
                          for e in (c, r)))
    if dropped and warn is not None:
        warn(f"warning: {len(dropped)} preference pairs dropped: the prompt leaves no response token within "
             f"--max-length {max_length} ({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}); raise "
             "--max-length or shorten those prompts")
    if not rows:
        raise DataError(f"no preference pair keeps a response token within --max-length {max_length} (all "
                        f"{len(pairs)} dropped, first {dropped[0] if dropped else '-'}): raise --max-length")
    stats.update(rows=len(rows), truncated=truncated, dropped_no_targets=len(dropped),
                 target_tokens=sum(_targets(x) for row in rows for x in row),
                 tokens=sum(len(x.input_ids) for row in rows for x in row))
    return rows


def _targets(r: Row) -> int:
    return sum(1 for x in r.labels[1:] if x != -100)


def collate_pairs(rows: list[tuple[Row, Row]], pad_id: int) -> dict:
    """Pair rows -> {chosen_input_ids, chosen_labels, chosen_attention_mask, rejected_... (B, T) long; where}."""
    out: dict = {"where": [c.where[0] for c, _ in rows]}
    for side, k in (("chosen", 0), ("rejected", 1)):
        b = collate([row[k] for row in rows], pad_id, packed=False)
        for key in ("input_ids", "labels", "attention_mask"):
            out[f"{side}_{key}"] = b[key]
    return out


class PairBatcher(Batcher):
    """Batcher's seeded, resumable order over pairs (grouped by the chosen side's length); batches as collate_pairs."""

    def __init__(self, rows: list[tuple[Row, Row]], batch_size: int, seed: int, pad_id: int, shuffle: bool = True,
                 group_by_length: bool = True):
        self.pairs = rows
        super().__init__([c for c, _ in rows], batch_size, seed, pad_id, shuffle, group_by_length)

    def next(self) -> dict:
        return collate_pairs([self.pairs[i] for i in self.next_indices()], self.pad_id)


def pair_batches(rows: list[tuple[Row, Row]], batch_size: int, pad_id: int) -> list[dict]:
    """Fixed batches for evaluation, in order."""
    return [collate_pairs(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


def check_preferences(records: list[Record], tokenizer, max_length: int, p: Callable[[str], None]) -> dict:
    """The data check of a preference file: every record's problems (not only the first), what truncation drops."""
    pairs, problems = [], []
    for r in records:
        try:
            pairs.append(pair_from_record(r, tokenizer))
        except DataError as e:
            problems.append(str(e))
    p(f"preference records: {len(records)}, usable pairs: {len(pairs)}, problems: {len(problems)}")
    for msg in problems[:10]:
        p(f"  {msg}")
    if len(problems) > 10:
        p(f"  ... and {len(problems) - 10} more")
    lost = [x.where for x in pairs
            if _cut(x.chosen, max_length).n_targets == 0 or _cut(x.rejected, max_length).n_targets == 0]
    p(f"truncation at --max-length {max_length}: {len(lost)} pairs would be dropped (no response token left)"
      + (f": {', '.join(lost[:5])}" if lost else ""))
    if pairs:
        lengths = sorted(max(len(x.chosen.input_ids), len(x.rejected.input_ids)) for x in pairs)
        p(f"tokens per pair (longer side): min {lengths[0]}, median {lengths[len(lengths) // 2]}, max {lengths[-1]}")
    return {"records": len(records), "pairs": len(pairs), "problems": problems, "dropped": len(lost)}
