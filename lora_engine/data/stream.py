"""Streamed text for domain-adaptive pretraining: `--format text` over files or folders of any size.

    files = corpus_files("corpus/")                          # .txt and .jsonl files, sorted by path
    prepared = prepare_stream(spec, tokenizer)               # held-out rows in memory, the training rows a stream
    batcher = StreamBatcher(prepared.train, batch_size=8, pad_id=0)
    batch = batcher.next()                                   # as pipeline.Batcher's; state_dict() resumes exactly

When. `--data` with `--format text` is streamed when it is a .txt or .jsonl file or a folder of them (`streams`);
`--no-stream` reads it in memory as before, `--stream` insists. Always, not above a size: a run on a sample of a
corpus then orders, holds out and packs as the run on the whole will, and no size threshold flips a run's
behaviour as its corpus grows. The default run (the embedded chat corpus) and every other format stay in memory,
where --dedup, --epochs and group-by-length batching need every record at once.

Documents. A .jsonl line's "text" (after --columns; an empty one is skipped and counted), or a .txt file's
blank-line-separated blocks: prose wraps a paragraph over several lines, so a line would cut sentences apart.
Each is tokenized as formats.tokenize does it (the tokenizer's prefix, the text, EOS) and truncated to
--max-length, an example with no target left dropped: pipeline.prepare's rules. With --split-documents a
longer document is cut into consecutive pieces of --max-length tokens instead, each then a document of its
own (run_clm's chunking, within one document: pieces never join another document's tokens).
Rows are then made as prepare
makes them, one per document or (--pack) packed greedily in stream order with positions restarting and a segment
per document, whose first label is -100; the packed row being filled is closed at each epoch's end, so that one
epoch's rows are exactly prepare's rows of its documents in stream order.

Order, from --seed alone. Epoch e visits the files in a permutation drawn from Random(seed + e), each front to
back, through a shuffle buffer of --shuffle-buffer documents: the buffer is filled, and each document taken from
it is one drawn at random, its place filled by the next document read (tf.data's and datasets' shuffle).

Held out. Of the first HELD_OUT_WINDOW non-empty documents in sorted order, pipeline.split takes the --val-split
fraction it would take of a corpus that size (so a corpus smaller than the window holds out exactly the documents
the in-memory path holds out); those never train. Or --val-data, read whole (a file or folder of the same kinds).

Memory: the held-out rows, the buffer's documents (token ids up to --max-length, as 4-byte arrays), the packed
row and the document being read, and while the run starts the text of the held-out window; none of it grows with
the corpus (a single document is read whole, so a corpus of few huge documents wants them split).

Resume. The position is the epoch, the file and byte offset of the next document, the random generator's state,
and the addresses (file, byte offset, line) of the documents in the buffer and in the packed row: plain data for
the checkpoint. A resume re-reads those documents (one seek each) and continues with the same next batch.
Under torchrun every rank reads the same stream and keeps its share of each step, as with pipeline.Batcher.
"""

from __future__ import annotations

import hashlib
import json
import random
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from lora_engine.data.formats import DataError, EmptyField, Example, Record, _check_text, _field, tokenize
from lora_engine.data.pipeline import Row, collate, pack_into, single_row, split
from lora_engine.data.sources import _mapped

SUFFIXES = (".txt", ".jsonl")
SHUFFLE_BUFFER = 4096  # documents; at --max-length 256 about 8 MiB of token arrays
# The held-out documents are chosen among the first this many: enough for a stable mean loss (~100 documents at
# the default --val-split 0.1), few enough that each evaluation costs a few training steps, whatever the corpus.
HELD_OUT_WINDOW = 1000


def streams(data: str | None, fmt: str, stream: bool | None = None, objective: str = "sft") -> bool:
    """Whether --data is streamed (see the module docstring): --format text over a .txt/.jsonl file or a folder
    that is not a `datasets` save_to_disk folder; `stream` True insists (DataError when it cannot), False refuses."""
    if stream is False or data is None:
        return False
    p = Path(data)
    fits = (objective == "sft" and fmt == "text" and not str(data).startswith("hf://")
            and (p.suffix.lower() in SUFFIXES
                 or (p.is_dir() and not (p / "state.json").is_file() and not (p / "dataset_dict.json").is_file())))
    if stream and not fits:
        raise DataError(f"--stream reads --format text (--objective sft) from .txt or .jsonl files or a folder of "
                        f"them; got --format {fmt} --data {data}: drop --stream, or convert the data")
    return fits


def corpus_files(data: str | Path) -> list[Path]:
    """The files of a corpus: the file itself, or a folder's .txt and .jsonl files in sorted path order (hidden
    ones, an editor's or version control's, left out)."""
    p = Path(data)
    if p.is_dir():
        files = sorted((f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                        and not any(part.startswith(".") for part in f.relative_to(p).parts)),
                       key=lambda f: f.relative_to(p).as_posix())
        if not files:
            raise DataError(f"{p}: a folder holding no .txt or .jsonl file; --format text streams those")
        return files
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"{p}: --format text streams .txt and .jsonl files; pass --no-stream to read it in memory")
    return [p]


def fingerprint(files: list[Path]) -> str:
    """Names and sizes of the corpus files: a resume refuses a corpus that changed since its checkpoint."""
    return hashlib.sha256(json.dumps([[f.name, f.stat().st_size] for f in files]).encode()).hexdigest()[:16]


@dataclass
class Document:
    record: Record | None      # None: an empty text (skipped and counted)
    address: tuple[int, int, int]  # (file index, byte offset, line) where it starts
    end: tuple[int, int]       # (byte offset, line) just after it


def documents(path: Path, index: int, offset: int = 0, line: int = 1, columns: dict | None = None):
    """The documents of one file from byte `offset` (which is line `line`), read a line at a time."""
    with open(path, "rb") as f:
        f.seek(offset)
        pos, n, block, start = offset, line, [], None
        for raw in f:
            here, here_line = pos, n
            pos, n = pos + len(raw), n + 1
            text = _decode(raw, path, here_line, here == 0)
            if path.suffix.lower() == ".jsonl":
                if text.strip():
                    yield Document(_jsonl_record(text, f"{path}:{here_line}", columns), (index, here, here_line),
                                   (pos, n))
            elif text.strip():
                if not block:
                    start = (here, here_line)
                block.append(text.rstrip("\r\n"))
            elif block:
                yield Document(Record({"text": "\n".join(block)}, f"{path}:{start[1]}"), (index, *start), (pos, n))
                block = []
        if block:
            yield Document(Record({"text": "\n".join(block)}, f"{path}:{start[1]}"), (index, *start), (pos, n))


def _decode(raw: bytes, path: Path, line: int, first: bool) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    return text.removeprefix("\ufeff") if first else text  # a byte order mark is no part of the text


def _jsonl_record(text: str, where: str, columns: dict | None) -> Record | None:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno}); each line must be one JSON object") from e
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read; a record is an object of strings") from None
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    record = Record(_mapped(Record(data, where), columns) if columns else data, where)
    _check_text(record)
    try:
        _field(record, "text", "text")
    except EmptyField:
        return None
    return record


def truncated(e: Example, max_length: int) -> Example:
    return Example(e.input_ids[:max_length], e.labels[:max_length], e.where)


@dataclass
class TextStream:
    """The training rows of a streamed corpus, one after another, epoch after epoch, with a resumable position."""

    files: list[Path]
    tokenizer: object
    max_length: int
    pack: bool
    seed: int
    held_out: frozenset = frozenset()  # addresses (file, offset, line) of the held-out documents
    columns: dict | None = None
    buffer_size: int = SHUFFLE_BUFFER
    # a document over max_length: cut into consecutive pieces of max_length tokens (the first keeps the tokenizer's
    # prefix, the last the EOS; each a document of its own for packing and shuffling), else truncated
    split: bool = False
    stats: Counter = field(default_factory=Counter)  # documents, empty, truncated, split, dropped_no_targets, rows

    def __post_init__(self):
        if self.buffer_size < 1:
            raise DataError(f"--shuffle-buffer must be at least 1 document, got {self.buffer_size}")
        if self.max_length < 2:
            raise DataError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        self.fingerprint = fingerprint(self.files)
        self._start_epoch(0)

    def _start_epoch(self, epoch: int) -> None:
        if getattr(self, "_reader", None) is not None:
            self._reader.close()  # its file, now rather than when collected
        self.epoch, self.rng = epoch, random.Random(self.seed + epoch)
        self.order = list(range(len(self.files)))
        self.rng.shuffle(self.order)
        self.pos = [0, 0, 1]  # (index into self.order, byte offset, line) of the next document to read
        self.buffer: list = []  # (address, input ids, labels, where), the ids and labels as int32 arrays
        self.row: list = []  # the same, of the documents in the packed row being filled
        self.pending: list = []  # the pieces of a split document read but not yet in the buffer
        self.ended = False  # the epoch's last row is out: the next one starts the next epoch
        self.rows_in_epoch = 0
        self._reader = None

    def _items(self, doc: Document, count: bool = True) -> list:
        """[(address, ids, labels, where)] of a document's example, truncated, or its pieces when split (their
        addresses the document's plus the piece's index); [] where it is empty or has no target left."""
        if doc.record is None:
            self.stats["empty"] += count
            return []
        e = tokenize(doc.record, "text", self.tokenizer)
        pieces = [e]
        if len(e.input_ids) > self.max_length and self.split:
            self.stats["split"] += count
            n = self.max_length
            pieces = [Example(e.input_ids[i:i + n], e.labels[i:i + n], e.where) for i in range(0, len(e.input_ids), n)]
        elif len(e.input_ids) > self.max_length:
            self.stats["truncated"] += count
            pieces = [truncated(e, self.max_length)]
        out = [(tuple(doc.address) + ((k,) if len(pieces) > 1 else ()), array("i", p.input_ids), array("i", p.labels),
                p.where) for k, p in enumerate(pieces) if p.n_targets]
        self.stats["documents" if out else "dropped_no_targets"] += count
        return out

    def _read(self):
        """The next training document (or piece of one) of the epoch's files, or None when they are read."""
        if self.pending:
            return self.pending.pop(0)
        while self.pos[0] < len(self.order):
            if self._reader is None:
                i = self.order[self.pos[0]]
                self._reader = documents(self.files[i], i, self.pos[1], self.pos[2], self.columns)
            doc = next(self._reader, None)
            if doc is None:
                self._reader, self.pos = None, [self.pos[0] + 1, 0, 1]
                continue
            self.pos[1:] = doc.end
            if doc.address not in self.held_out:
                items = self._items(doc)
                if items:
                    self.pending = items[1:]
                    return items[0]
        return None

    def _take(self):
        """A document drawn at random from the buffer, filled first; None at the epoch's end."""
        while len(self.buffer) < self.buffer_size:
            item = self._read()
            if item is None:
                break
            self.buffer.append(item)
        if not self.buffer:
            return None
        i = self.rng.randrange(len(self.buffer))
        self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
        return self.buffer.pop()

    def next_row(self) -> Row:
        while True:
            if self.ended:
                if self.rows_in_epoch == 0:
                    where = self.files[0].parent if len(self.files) > 1 else self.files[0]
                    raise DataError(f"no training document in {where}: every one is empty, held out, or left without "
                                    "a target token")
                self._start_epoch(self.epoch + 1)
            item = self._take()
            if item is None:  # the epoch's end: its last packed row goes out
                self.ended, row = True, self._close_row()
            elif not self.pack:
                row = single_row(_example(item))
            elif self.row and sum(len(x[1]) for x in self.row) + len(item[1]) > self.max_length:
                row, self.row = self._close_row(), [item]
            else:
                self.row.append(item)
                row = None
            if row is not None:
                self.rows_in_epoch += 1
                self.stats["rows"] += 1
                return row

    def _close_row(self) -> Row | None:
        if not self.row:
            return None
        row = Row([], [], [], [], [])
        for item in self.row:
            pack_into(row, _example(item))
        self.row = []
        return row

    def state_dict(self) -> dict:
        """The position, as plain data (the checkpoint loads it with weights_only=True)."""
        version, internal, gauss = self.rng.getstate()
        return {"stream": 1, "files": self.fingerprint, "seed": self.seed, "max_length": self.max_length,
                "pack": self.pack, "split": self.split, "pending": [list(x[0]) for x in self.pending],
                "epoch": self.epoch, "pos": list(self.pos), "rng": [version, list(internal), gauss],
                "buffer": [list(x[0]) for x in self.buffer], "row": [list(x[0]) for x in self.row],
                "ended": self.ended, "rows_in_epoch": self.rows_in_epoch}

    def load_state_dict(self, s: dict) -> None:
        if "stream" not in s:
            raise DataError("the checkpoint was made reading its data in memory, this run streams --data (--format "
                            "text): resume with the same --data, --format and --stream (--no-stream: in memory)")
        mine = {"files": self.fingerprint, "seed": self.seed, "max_length": self.max_length, "pack": self.pack,
                "split": self.split}
        changed = ", ".join(f"{k}: {s.get(k)} then, {v} now" for k, v in mine.items() if s.get(k) != v)
        if changed:
            raise DataError(f"the checkpoint streamed another corpus or cut it otherwise ({changed}): resume with the "
                            "same --data files, --seed, --max-length, --pack and --split-documents")
        self._start_epoch(s["epoch"])
        version, internal, gauss = s["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.pos = list(s["pos"])
        self.buffer = [self._reread(a) for a in s["buffer"]]
        self.row = [self._reread(a) for a in s["row"]]
        self.pending = [self._reread(a) for a in s["pending"]]
        self.ended, self.rows_in_epoch = s["ended"], s["rows_in_epoch"]

    def _reread(self, address: list[int]):
        i, offset, line = address[:3]
        doc = next(documents(self.files[i], i, offset, line, self.columns), None)
        items = self._items(doc, count=False) if doc is not None and tuple(doc.address) == tuple(address[:3]) else []
        item = next((x for x in items if x[0] == tuple(address)), None)
        if item is None:
            raise DataError(f"{self.files[i]}: no document at line {line} (byte {offset}) where the checkpoint has "
                            "one; the corpus changed since: resume with the files it was made with")
        return item


def _example(item) -> Example:
    return Example(list(item[1]), list(item[2]), item[3])


class StreamBatcher:
    """pipeline.Batcher's interface over a TextStream: next(), epoch, state_dict(), load_state_dict()."""

    def __init__(self, stream: TextStream, batch_size: int, pad_id: int):
        if batch_size < 1:
            raise DataError(f"--batch-size must be >= 1, got {batch_size}")
        self.stream, self.batch_size, self.pad_id = stream, batch_size, pad_id

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def batches_per_epoch(self) -> int:
        raise DataError("a streamed corpus is not counted before training: give --max-steps (not 0), or --no-stream "
                        "to read it in memory and train --epochs")

    def next(self) -> dict:
        return collate([self.stream.next_row() for _ in range(self.batch_size)], self.pad_id, self.stream.pack)

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.stream.load_state_dict(s)


# ---- the run's data and `data check` --------------------------------------------------------------------------


def prepare_stream(spec, tokenizer) -> tuple[TextStream, list[Row], list[Path], dict]:
    """(the training stream, the held-out rows, the files behind them, stats) of a prepare.DataSpec that streams.
    Reads the held-out window (or --val-data) only; the corpus itself is read as training goes."""
    from lora_engine.data import quality
    from lora_engine.data.sources import parse_columns

    if spec.dedup:
        raise DataError("--dedup compares every record with every other, in memory; a streamed corpus (--format text) "
                        "is not deduplicated: deduplicate it beforehand, or pass --no-stream to read it in memory")
    columns = parse_columns(spec.columns) or None
    files = corpus_files(spec.data)
    window = _window(files, columns)
    if spec.val_data:
        val_files = corpus_files(spec.val_data)
        val_docs = [d for i, f in enumerate(val_files) for d in documents(f, i, columns=columns) if d.record]
        if not val_docs:
            raise DataError(f"{spec.val_data}: no document with text to validate on")
        train_docs, held = window, frozenset()
    else:
        val_files = []
        train_docs, val_docs = split(window, spec.val_split, spec.seed)
        held = frozenset(d.address for d in val_docs)
    val_rows = [single_row(e) for e in (truncated(tokenize(d.record, "text", tokenizer), spec.max_length)
                                         for d in val_docs) if e.n_targets]
    stats = {"stream": {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "window": len(window),
                        "held_out": len(val_docs), "shuffle_buffer": spec.shuffle_buffer, "pack": spec.pack,
                        "split": spec.split_documents},
             "quality": quality.analyse([d.record for d in train_docs], "text",
                                        [d.record for d in val_docs]).summary()}
    stream = TextStream(files, tokenizer, spec.max_length, spec.pack, spec.seed, held, columns, spec.shuffle_buffer,
                        spec.split_documents)
    return stream, val_rows, files + val_files, stats


def _window(files: list[Path], columns: dict | None) -> list[Document]:
    """The first HELD_OUT_WINDOW non-empty documents in sorted order (not an epoch's): the held-out candidates."""
    out: list[Document] = []
    for i, f in enumerate(files):
        reader = documents(f, i, columns=columns)
        for doc in reader:
            if doc.record is not None:
                out.append(doc)
            if len(out) == HELD_OUT_WINDOW:
                reader.close()
                return out
    if not out:
        raise DataError(f"{files[0] if len(files) == 1 else files[0].parent}: no document with text (every "
                        "\"text\" is empty)")
    return out


def data_lines(stats: dict, n_val: int, max_length: int, val_data: str | None) -> list[str]:
    """What a streamed run logs about its data (its counts come as it reads)."""
    s = stats["stream"]
    where = "--val-data" if val_data else f"held out of the first {s['window']} documents"
    q = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in stats["quality"].items() if k != "records")
    return [f"data: streaming {s['files']} file(s), {s['bytes'] / 2**20:,.1f} MiB of --format text through a shuffle "
            f"buffer of {s['shuffle_buffer']} documents, "
            f"{'cut into pieces of' if s.get('split') else 'truncated at'} {max_length} tokens"
            f"{', packed' if s['pack'] else ''}; {n_val} validation rows ({where})",
            f"data quality of the first {s['window']} documents: {q}"]
