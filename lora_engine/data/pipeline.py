"""Training data: files -> token ids with loss masks -> (packed) rows -> batches.

    from lora_engine.data.pipeline import load_examples, prepare, Batcher
    stats = {}
    exs = load_examples("train.jsonl", tok, fmt="auto", stats=stats)       # list[Example]
    rows = prepare(exs, max_length=256, pack=False, stats=stats)           # truncated (or packed) rows
    batcher = Batcher(rows, batch_size=8, seed=0, pad_id=tok.pad_token_id)
    batch = batcher.next()   # {"input_ids","labels","attention_mask","position_ids","segment_ids"} (B, T)

`python -m lora_engine.data check FILE` prints what training would make of a file. The formats
and their loss masks are in data/formats.py; the embedded default dataset in data/embedded.py.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from lora_engine.data.formats import (
    DataError,
    EmptyField,
    Example,
    Record,
    check_format,
    detect_format,
    read_records,
    tokenize,
)

__all__ = ["DataError", "Example", "Row", "load_examples", "prepare", "split", "Batcher", "collate"]


@dataclass
class Row:
    """One training row: one example, or several packed with per-document positions and segment ids."""
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    segment_ids: list[int]
    where: list[str]


def load_examples(path, tokenizer, fmt: str = "auto", completion_only: bool = True,
                  stats: dict | None = None) -> list[Example]:
    """Read and tokenize a JSONL/JSON file. Records with empty fields are skipped and counted
    (stats["empty"]); any other problem raises DataError naming file:line."""
    return examples_from_records(read_records(path), tokenizer, fmt, completion_only, stats, str(path))


def examples_from_records(records: list[Record], tokenizer, fmt: str = "auto", completion_only: bool = True,
                          stats: dict | None = None, source: str = "the data",
                          mask_empty_think: bool = False) -> list[Example]:
    fmt = check_format(fmt)
    stats = stats if stats is not None else {}
    if not records:
        raise DataError(f"{source}: the file holds no records")
    out: list[Example] = []
    empty: list[str] = []
    for r in records:
        f = fmt if fmt != "auto" else detect_format(r)
        stats.setdefault("formats", {}).setdefault(f, 0)
        stats["formats"][f] += 1
        try:
            out.append(tokenize(r, f, tokenizer, completion_only, mask_empty_think))
        except EmptyField as e:
            empty.append(str(e))
    stats["records"] = stats.get("records", 0) + len(records)
    stats["empty"] = stats.get("empty", 0) + len(empty)
    if not out:
        raise DataError(f"{source}: no usable example left after filtering: all {len(records)} records have empty "
                        f"fields (first: {empty[0] if empty else '-'})")
    return out


def _truncate(exs: list[Example], max_length: int, stats: dict) -> list[Example]:
    if max_length < 2:
        raise DataError(f"--max-length must be at least 2 tokens, got {max_length}")
    kept, truncated, dropped = [], 0, 0
    for e in exs:
        if len(e.input_ids) > max_length:
            truncated += 1
            e = Example(e.input_ids[:max_length], e.labels[:max_length], e.where)
        if e.n_targets == 0:
            dropped += 1  # nothing left to learn from (the response was cut off entirely)
            continue
        kept.append(e)
    stats.update(truncated=truncated, dropped_no_targets=dropped)
    if truncated == len(exs) and len(exs) > 1:
        shortest = min(len(e.input_ids) for e in exs)
        raise DataError(f"every one of the {len(exs)} examples is longer than --max-length {max_length} (the "
                        f"shortest has {shortest} tokens): raise --max-length")
    if not kept:
        raise DataError(f"no example keeps a target token within --max-length {max_length} ({dropped} dropped): "
                        "raise --max-length")
    return kept


def prepare(exs: list[Example], max_length: int, pack: bool = False, stats: dict | None = None) -> list[Row]:
    """Truncate to max_length, then one row per example, or (pack=True) greedy packing in order.

    In a packed row, positions restart at 0 for each document, segment ids differ per document
    (the model then blocks attention across them), and the label of each document's first token
    is -100 so it is never predicted from the previous document's last token.
    """
    stats = stats if stats is not None else {}
    exs = _truncate(exs, max_length, stats)
    if not pack:
        rows = [single_row(e) for e in exs]
    else:
        rows, cur = [], None
        for e in exs:
            if cur is None or len(cur.input_ids) + len(e.input_ids) > max_length:
                cur = Row([], [], [], [], [])
                rows.append(cur)
            pack_into(cur, e)
    stats.update(rows=len(rows), examples=len(exs), target_tokens=sum(_n_targets(r) for r in rows),
                 tokens=sum(len(r.input_ids) for r in rows))
    return rows


def single_row(e: Example) -> Row:
    """The row of one example, unpacked."""
    return Row(e.input_ids, e.labels, list(range(len(e.input_ids))), [0] * len(e.input_ids), [e.where])


def pack_into(row: Row, e: Example) -> None:
    """Append example `e` to a packed row as a document of its own (the caller checks that it fits)."""
    seg = len(row.where)
    row.input_ids += e.input_ids
    row.labels += [-100] + e.labels[1:]
    row.position_ids += list(range(len(e.input_ids)))
    row.segment_ids += [seg] * len(e.input_ids)
    row.where.append(e.where)


def _n_targets(r: Row) -> int:
    return sum(1 for x in r.labels[1:] if x != -100)


def split(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random `fraction` held out (at least one item when fraction > 0)."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--val-split must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(items) * fraction))
    if n_val >= len(items):
        raise DataError(f"--val-split {fraction} leaves no training example out of {len(items)}")
    val_idx = set(order[:n_val])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]


def collate(rows: list[Row], pad_id: int, packed: bool | None = None) -> dict:
    """Rows -> right-padded tensors (B, T): input_ids, labels (-100 on padding), attention_mask,
    position_ids; segment_ids only when a row holds several documents (packing)."""
    T = max(len(r.input_ids) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
        pos[i, :n] = torch.tensor(r.position_ids)
        seg[i, :n] = torch.tensor(r.segment_ids)
    packed = any(len(r.where) > 1 for r in rows) if packed is None else packed
    out = {"input_ids": ids, "labels": labels, "position_ids": pos,
           "where": [w for r in rows for w in r.where]}
    if packed:
        out["segment_ids"] = seg  # padding is its own segment (-1) and masked out as well
    out["attention_mask"] = None if bool(mask.all()) else mask
    return out


def n_targets(batch: dict) -> int:
    """Target tokens of a batch: labels[:, 1:] that are not -100 (the model shifts by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())


class Batcher:
    """Endless seeded micro-batches over rows, epoch after epoch, with a resumable position.

    The order of epoch e is a permutation drawn from Random(seed + e), so the position (epoch,
    index) is all a checkpoint needs to reproduce the stream exactly.
    """

    def __init__(self, rows: list[Row], batch_size: int, seed: int, pad_id: int, shuffle: bool = True,
                 group_by_length: bool = True):
        if not rows:
            raise DataError("no training rows: the dataset is empty after filtering")
        if batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {batch_size}")
        self.rows, self.batch_size, self.seed, self.pad_id, self.shuffle = rows, batch_size, seed, pad_id, shuffle
        self.group_by_length = group_by_length
        self.packed = any(len(r.where) > 1 for r in rows)
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def _make_order(self) -> list[int]:
        order = list(range(len(self.rows)))
        if not self.shuffle:
            return order
        rng = random.Random(self.seed + self.epoch)
        rng.shuffle(order)
        if self.group_by_length:
            # Batches of similar lengths waste less compute on padding: sort within windows of 32
            # batches, then shuffle the batches, so the order stays random at the batch level.
            w = 32 * self.batch_size
            order = [i for k in range(0, len(order), w)
                     for i in sorted(order[k : k + w], key=lambda j: len(self.rows[j].input_ids))]
            batches = [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
            rng.shuffle(batches)
            order = [i for b in batches for i in b]
        return order

    def next_indices(self) -> list[int]:
        """The row indices of the next micro-batch (the position advances)."""
        if self.index >= len(self._order):
            self.epoch += 1
            self.index = 0
            self._order = self._make_order()
        take = self._order[self.index : self.index + self.batch_size]
        self.index += len(take)
        return take

    def next(self) -> dict:
        return collate([self.rows[i] for i in self.next_indices()], self.pad_id, self.packed)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n_rows": len(self.rows),
                "group_by_length": self.group_by_length}

    def load_state_dict(self, s: dict) -> None:
        if "n_rows" not in s:
            raise DataError("the checkpoint was made streaming its text corpus (--format text), this run reads its "
                            "data in memory: resume with the same --data, --format and --stream")
        if s["n_rows"] != len(self.rows) or s["seed"] != self.seed:
            raise DataError(
                f"the checkpoint was made with {s['n_rows']} rows and seed {s['seed']}, this run has "
                f"{len(self.rows)} rows and seed {self.seed}: resume with the same data, max-length and seed"
            )
        self.epoch, self.index = s["epoch"], s["index"]
        self.group_by_length = s.get("group_by_length", self.group_by_length)
        self._order = self._make_order()


def eval_batches(rows: list[Row], batch_size: int, pad_id: int) -> list[dict]:
    """Fixed batches for evaluation, rows sorted by length so that little compute goes to padding."""
    rows = sorted(rows, key=lambda r: len(r.input_ids))
    return [collate(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]

