"""The one data owner: a run's data settings -> the prepared training and validation rows of its objective.

Training (train/setup.py), evaluation (train/evaluate.py target_rows, behind `python -m lora_engine.eval`)
and `python -m lora_engine.data check` assemble their data here, in one order:

    records (read and checked: UTF-8, JSON)      read_data; none when no file is given
    -> the embedded default when there is no file  the chatterbot conversations, pairs built from them, or
                                                  the comparison prompts (grpo)
    -> examples (sft) or pairs (dpo)              tokenized per the objective
    -> the held-out split                         --val-data, else a seeded --val-split of the training data
    -> rows                                       truncated to --max-length (sft: packed with --pack)

A --format text corpus is streamed instead (data/stream.py): the held-out rows are read here, the training rows
come from a TextStream as training goes (Prepared.train is the stream, not a list).

One function an objective (_OBJECTIVES). An objective whose rows are prompts only (GRPO: the model
writes the responses) adds its own: records -> prompt examples -> the same split -> prompt rows.
The settings come as a DataSpec (plain values, read by name from any config that has them), not as
the training config: data sits below train in the layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lora_engine.data import preference, quality
from lora_engine.data.formats import DataError, Record
from lora_engine.data.pipeline import Row, examples_from_records, prepare, split
from lora_engine.data.sources import data_files, parse_columns, read_source
from lora_engine.data.stream import SHUFFLE_BUFFER, corpus_files, prepare_stream, streams


@dataclass(frozen=True)
class DataSpec:
    """What the data of a run is and how it is cut; the fields are TrainConfig's flags of the same names."""

    data: str | None = None       # the training source (sources.py); None: the embedded default of the objective
    val_data: str | None = None   # the validation file (with `data` only); None: --val-split of `data`
    format: str = "auto"          # of `data` and `val_data` (sft); the embedded corpus is chat
    val_split: float = 0.1
    seed: int = 0                 # of the held-out split
    max_length: int = 256
    pack: bool = False
    completion_only: bool = True
    mask_empty_think: bool = False
    dedup: bool = False
    objective: str = "sft"
    columns: str | None = None    # "FIELD=COLUMN,...": fields of `data` and `val_data` read from other columns
    stream: bool | None = None    # stream a --format text corpus (data/stream.py); None: whenever it can be
    shuffle_buffer: int = SHUFFLE_BUFFER  # documents of a streamed corpus's shuffle buffer
    split_documents: bool = False  # a streamed document over max_length: cut into pieces, not truncated

    @classmethod
    def of(cls, config) -> DataSpec:
        """The spec of any config object with fields of these names (those it lacks keep their defaults)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)})


@dataclass
class Prepared:
    """The rows of one run: sft rows are pipeline.Row, dpo rows (chosen Row, rejected Row) pairs, grpo rows
    PromptRow."""

    train: list  # or, for a streamed corpus, a stream.TextStream
    val: list
    files: list[Path]  # the data files behind the rows, whose hashes run.json records
    stats: dict = field(default_factory=dict)  # counts: records, formats, truncated, rows, target_tokens, ...


def read_data(spec: DataSpec) -> dict[str, list[Record]]:
    """The records of spec.data and spec.val_data by path, read and checked without a tokenizer (a bad file is
    reported in seconds, before any model loads). {} for the embedded default (--val-data goes with --data only)."""
    columns = parse_columns(spec.columns)
    if spec.data is None:
        if columns:  # the embedded data has its own fields: a mapping for it is a mistake, not to be ignored
            raise DataError("--columns maps the columns of --data, and no --data is given")
        return {}
    if streams(spec.data, spec.format, spec.stream, spec.objective):  # read as training goes; the paths checked here
        for p in (spec.data, spec.val_data):
            if p:
                corpus_files(p)
        return {}
    return {p: read_source(p, columns) for p in (spec.data, spec.val_data) if p}


def prepare_data(spec: DataSpec, tokenizer, records: dict[str, list[Record]] | None = None,
                 warn: Callable[[str], None] | None = None) -> Prepared:
    """The training and validation rows of spec.objective; `records` as read_data returns them (read here when
    None). `warn` hears of what is dropped (pairs truncation empties, identical pairs). Raises DataError."""
    if spec.objective not in _OBJECTIVES:
        raise DataError(f"--objective {spec.objective!r} has no data preparation; one of {', '.join(_OBJECTIVES)}")
    if spec.data is not None and records is None:
        records = read_data(spec)
    return _OBJECTIVES[spec.objective](spec, tokenizer, records or {}, warn)


def _sources(spec: DataSpec, records: dict, embedded: Callable, names: tuple[str, str]):
    """(training records, validation records or None, their names for messages, files to hash)."""
    from lora_engine.data.embedded import chatterbot_files

    if spec.data is None:
        tr, va = embedded()
        return tr, va, names, chatterbot_files()
    return records[spec.data], records.get(spec.val_data), (spec.data, spec.val_data), data_files(spec.data,
                                                                                                 spec.val_data)


def _sft(spec: DataSpec, tokenizer, records: dict, warn) -> Prepared:
    """Next-token rows. stats also gets "quality" (quality.analyse's summary of the training records against
    the validation records, the file's or the held-out split's) and with --dedup "dedup" (records dropped)."""
    from lora_engine.data.embedded import chatterbot_split

    if streams(spec.data, spec.format, spec.stream, spec.objective):
        return Prepared(*prepare_stream(spec, tokenizer))
    stats: dict = {}
    tr, va, src, files = _sources(spec, records, chatterbot_split, ("the embedded corpus",
                                                                   "the embedded held-out split"))
    fmt = "chat" if spec.data is None else spec.format
    if spec.dedup:  # before the split, so that the held-out part shares no duplicate with the rest
        tr, stats["dedup"] = quality.dedup(tr, fmt, against=va)
    train_ex = examples_from_records(tr, tokenizer, fmt, spec.completion_only, stats, src[0], spec.mask_empty_think)
    if va is not None:
        val_ex = examples_from_records(va, tokenizer, fmt, spec.completion_only, {}, src[1], spec.mask_empty_think)
    else:
        train_ex, val_ex = split(train_ex, spec.val_split, spec.seed)
    by_where = {r.where: r for r in tr}
    val_used = va if va is not None else [by_where[e.where] for e in val_ex]
    stats["quality"] = quality.analyse([by_where[e.where] for e in train_ex], fmt, val_used).summary()
    train_rows = prepare(train_ex, spec.max_length, spec.pack, stats)
    val_rows = prepare(val_ex, spec.max_length, False, {}) if val_ex else []
    return Prepared(train_rows, val_rows, files, stats)


def _dpo(spec: DataSpec, tokenizer, records: dict, warn) -> Prepared:
    """(chosen, rejected) row pairs; the embedded default is chatterbot_preference_split."""
    from lora_engine.data.embedded import chatterbot_preference_split

    stats: dict = {}
    tr, va, src, files = _sources(spec, records, chatterbot_preference_split, ("the embedded pairs",
                                                                              "the embedded held-out pairs"))
    train_pairs = preference.pairs_from_records(tr, tokenizer, stats, src[0], warn)
    if va is not None:
        val_pairs = preference.pairs_from_records(va, tokenizer, {}, src[1], warn)
    else:
        train_pairs, val_pairs = split(train_pairs, spec.val_split, spec.seed)
    train_rows = preference.prepare_pairs(train_pairs, spec.max_length, stats, warn)
    val_rows = preference.prepare_pairs(val_pairs, spec.max_length, {}, warn) if val_pairs else []
    return Prepared(train_rows, val_rows, files, stats)


@dataclass
class PromptRow:
    """A GRPO prompt: its tokens (truncated from the left to --max-length, the end kept: the model continues it),
    the prompt as the record gives it (text, or chat messages) and the record's other fields, which reward
    functions receive."""

    input_ids: list[int]
    prompt: str | list
    fields: dict
    where: list[str]


def prompt_row(record: Record, tokenizer, max_length: int, stats: dict | None = None) -> PromptRow:
    """The record's "prompt" (plain text, or a list of {role, content} messages ending with a user turn) rendered
    as the model is asked: text after the tokenizer's prefix (BOS), chat through the template with the
    assistant's turn opened. Raises DataError naming the record."""
    p = record.data.get("prompt")
    if isinstance(p, str) and p.strip():
        ids = list(tokenizer.prefix_ids) + tokenizer.encode(p, add_special_tokens=False)
    elif isinstance(p, list) and p and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                           and isinstance(m.get("content"), str) for m in p):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{record.where}: a chat prompt needs a chat template, and tokenizer "
                            f"{getattr(tokenizer, 'name_or_path', '?')!r} has none; give the prompt as text")
        ids = tokenizer.encode(tokenizer.apply_chat_template(p, add_generation_prompt=True), add_special_tokens=False)
    else:
        raise DataError(f"{record.where}: 'prompt' must be non-empty text or a list of {{role, content}} messages, "
                        f"got {type(p).__name__ if p is not None else 'nothing'}")
    fields = {k: v for k, v in record.data.items() if k != "prompt"}
    if stats is not None:
        stats["truncated"] = stats.get("truncated", 0) + int(len(ids) > max_length)
    return PromptRow(ids[-max_length:], p, fields, [record.where])


def _grpo(spec: DataSpec, tokenizer, records: dict, warn) -> Prepared:
    """Prompt rows (the model writes the completions); every record's fields other than "prompt" kept for the
    reward functions. Without --data: the embedded comparison task (data/embedded_grpo.py), built from the seed."""
    if spec.data is None:
        from lora_engine.data.embedded_grpo import comparison_records

        tr, va = comparison_records(spec.seed)
    else:
        tr, va = records[spec.data], records.get(spec.val_data)
    stats: dict = {"records": len(tr), "truncated": 0}
    train = [prompt_row(r, tokenizer, spec.max_length, stats) for r in tr]
    val = [prompt_row(r, tokenizer, spec.max_length) for r in va] if va is not None else None
    if val is None:
        train, val = split(train, spec.val_split, spec.seed)
    stats["rows"] = len(train)
    return Prepared(train, val, data_files(spec.data, spec.val_data), stats)


_OBJECTIVES = {"sft": _sft, "dpo": _dpo, "grpo": _grpo}


def eval_rows(tokenizer, data: str | None, fmt: str = "auto", max_length: int = 256, completion_only: bool = True,
              records: list[Record] | None = None) -> list[Row]:
    """The rows of a target-task evaluation: every record of a file (or its `records`, read already), none held
    out; or, without a file, the embedded held-out split (the validation rows of the default run)."""
    if data:
        exs = examples_from_records(records if records is not None else read_source(data), tokenizer, fmt,
                                    completion_only, source=str(data))
    else:
        from lora_engine.data.embedded import chatterbot_split

        exs = examples_from_records(chatterbot_split()[1], tokenizer, "chat", completion_only,
                                    source="the embedded held-out split")
    return prepare(exs, max_length)
