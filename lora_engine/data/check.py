"""`python -m lora_engine.data check FILE`: what training would make of a data file.

Prints record and format counts, a token-length histogram, empty fields, what truncation at
--max-length would do, the data-quality findings of quality.py (exact and near duplicates, overlap
with --val, short responses, conflicting responses, length outliers, chat role sequences), and one
example rendered with its loss mask: text that is trained on is shown between [[ and ]]. A file of
preference records ({prompt, chosen, rejected}, for train --objective dpo) gets preference.py's
checks instead: every empty, malformed or identical pair named, and the pairs truncation would drop.
A --format text corpus (.txt/.jsonl files or a folder of them) is read in one streamed pass instead
(check_stream, as training streams it), its quality findings those of its first documents.

Exit status: 1 when nothing in the file is usable (no example, or no pair, keeps a target token);
with --strict, 1 on any problem reported (empty fields, examples or pairs dropped, data-quality
findings); else 0. A file that cannot be read is an `error:` line and status 2.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass

from lora_engine.cli import option, parse_command, user_input
from lora_engine.data import preference, quality, stream
from lora_engine.data.formats import FORMATS, DataError, EmptyField, Example, detect_format, tokenize
from lora_engine.data.prepare import DataSpec, read_data
from lora_engine.data.sources import parse_columns, read_source
from lora_engine.sources.embedded import DEFAULT_MODEL


def histogram(lengths: list[int] | Counter, bins: int = 10, width: int = 40) -> list[str]:
    """Text histogram lines: 'lo-hi | ##### count'. `lengths` may come counted ({length: count}, a streamed pass)."""
    counted = lengths if isinstance(lengths, Counter) else Counter(lengths)
    lo, hi = min(counted), max(counted)
    step = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter()
    for x, n in counted.items():
        counts[(x - lo) // step] += n
    top = max(counts.values())
    lines = []
    for b in range((hi - lo) // step + 1):
        n = counts.get(b, 0)
        a = lo + b * step
        lines.append(f"{a:>6}-{a + step - 1:<6}| {'#' * max(1 if n else 0, round(width * n / top)):<{width}} {n}")
    return lines


def render_mask(ex: Example, tokenizer) -> str:
    """The example's text with trained spans in [[...]] (decoded span by span)."""
    out, span, cur = [], [], None
    for t, lab in zip(ex.input_ids, ex.labels):
        on = lab != -100
        if cur is not None and on != cur:
            out.append((tokenizer.decode(span), cur))
            span = []
        span.append(t)
        cur = on
    if span:
        out.append((tokenizer.decode(span), cur))
    return "".join(f"[[{s}]]" if on else s for s, on in out)


def check(path, tokenizer, fmt: str = "auto", max_length: int = 256, completion_only: bool = True,
          show: int = 0, file=None, records=None, val_records=None, near_threshold: float = quality.NEAR_THRESHOLD,
          min_response_words: int = quality.MIN_RESPONSE_WORDS, mask_empty_think: bool = False) -> dict:
    """Analyse a file (or its `records`, read already), and its overlap with `val_records` when given; write the
    report to `file` (a text stream) when one is given; return the numbers as a dict ("quality": the summary of
    quality.analyse)."""
    records = records if records is not None else read_source(path)
    p = (lambda line: file.write(line + "\n")) if file is not None else (lambda line: None)
    if not records:
        raise DataError(f"{path}: the file holds no records")
    if fmt == "auto" and preference.is_preference(records):  # DPO data: its own checks (data/preference.py)
        p(f"file: {path}")
        return preference.check_preferences(records, tokenizer, max_length, p)
    formats, empty, examples, dup = Counter(), [], [], Counter()
    for r in records:
        dup[json.dumps(r.data, sort_keys=True, ensure_ascii=False)] += 1
        f = fmt if fmt != "auto" else detect_format(r)
        formats[f] += 1
        try:
            examples.append(tokenize(r, f, tokenizer, completion_only, mask_empty_think))
        except EmptyField as e:
            empty.append(str(e))
    dups = {k: n for k, n in dup.items() if n > 1}
    lengths = [len(e.input_ids) for e in examples]
    over = [e for e in examples if len(e.input_ids) > max_length]
    lost = [e for e in over if Example(e.input_ids[:max_length], e.labels[:max_length], e.where).n_targets == 0]
    targets_cut = sum(e.n_targets - Example(e.input_ids[:max_length], e.labels[:max_length], e.where).n_targets
                      for e in over)
    p(f"file: {path}")
    p(f"records: {len(records)}  formats: {dict(formats)}  usable examples: {len(examples)}")
    p(f"empty fields: {len(empty)} records (skipped by training)")
    for msg in empty[:5]:
        p(f"  {msg}")
    if lengths:
        s = sorted(lengths)
        p(f"tokens per example: min {s[0]}, median {s[len(s) // 2]}, max {s[-1]}, total {sum(s)}; "
          f"target tokens {sum(e.n_targets for e in examples)}")
        p("token-length histogram:")
        for line in histogram(lengths):
            p("  " + line)
    p(f"truncation at --max-length {max_length}: {len(over)} examples truncated, {targets_cut} target tokens "
      f"cut, {len(lost)} examples would be dropped (no target left)")
    report = quality.analyse(records, fmt, val_records, near_threshold, min_response_words)
    p(f"\ndata quality ({len(records)} records{f' and {len(val_records)} validation records' if val_records else ''};"
      f" near-duplicates: Jaccard >= {near_threshold} of {quality.SHINGLE}-word shingles):")
    for line in report.lines():
        p("  " + line)
    if examples:
        ex = examples[min(show, len(examples) - 1)]
        p(f"\nexample {ex.where} ({len(ex.input_ids)} tokens, {ex.n_targets} targets; loss on [[...]]):")
        p(render_mask(ex, tokenizer))
    return {"records": len(records), "formats": dict(formats), "examples": len(examples), "empty": len(empty),
            "duplicates": sum(n - 1 for n in dups.values()), "truncated": len(over), "dropped": len(lost),
            "target_tokens_cut": targets_cut, "quality": report.summary()}


def check_stream(path: str, tokenizer, max_length: int = 256, columns: dict | None = None, file=None,
                 show: int = 0) -> dict:
    """`data check` of a streamed corpus (data/stream.py), in one pass of bounded memory: counts, token lengths (a
    Counter of them), truncation, and quality.analyse of the first HELD_OUT_WINDOW documents; check's keys."""
    p = (lambda line: file.write(line + "\n")) if file is not None else (lambda line: None)
    files = stream.corpus_files(path)
    lengths: Counter = Counter()
    records = empty = over = lost = cut = targets = 0
    sample, empties, shown = [], [], None
    for i, f in enumerate(files):
        for doc in stream.documents(f, i, columns=columns):
            records += 1
            if doc.record is None:
                empty += 1
                if len(empties) < 5:
                    empties.append(f"{f}:{doc.address[2]}: field 'text' is empty")
                continue
            if len(sample) < stream.HELD_OUT_WINDOW:
                sample.append(doc.record)
            e = tokenize(doc.record, "text", tokenizer)
            if shown is None and len(sample) > show:
                shown = e
            lengths[len(e.input_ids)] += 1
            targets += e.n_targets
            if len(e.input_ids) > max_length:
                left = stream.truncated(e, max_length).n_targets
                over, lost, cut = over + 1, lost + (left == 0), cut + e.n_targets - left
    examples = records - empty
    p(f"corpus: {path} ({len(files)} file(s), streamed)")
    p(f"documents: {records}  format: text  usable examples: {examples}")
    p(f"empty fields: {empty} documents (skipped by training)")
    for msg in empties:
        p(f"  {msg}")
    if lengths:
        s = sorted(lengths)
        median, seen = s[-1], 0
        for x in s:
            seen += lengths[x]
            if seen > examples // 2:
                median = x
                break
        p(f"tokens per example: min {s[0]}, median {median}, max {s[-1]}, total "
          f"{sum(x * n for x, n in lengths.items())}; target tokens {targets}")
        p("token-length histogram:")
        for line in histogram(lengths):
            p("  " + line)
    p(f"truncation at --max-length {max_length}: {over} examples truncated, {cut} target tokens cut, {lost} "
      "examples would be dropped (no target left)")
    report = quality.analyse(sample, "text")
    p(f"\ndata quality (a sample: the first {len(sample)} documents):")
    for line in report.lines():
        p("  " + line)
    if shown is not None:
        p(f"\nexample {shown.where} ({len(shown.input_ids)} tokens, {shown.n_targets} targets; loss on [[...]]):")
        p(render_mask(shown, tokenizer))
    return {"records": records, "formats": {"text": examples}, "examples": examples, "empty": empty,
            "truncated": over, "dropped": lost, "target_tokens_cut": cut, "quality": report.summary(),
            "files": len(files)}


@dataclass
class CheckArgs:
    """Report on a training data file: counts, lengths, truncation, data quality, a rendered loss mask."""

    file: str = option(help="the data: a .jsonl/.json/.csv/.parquet/.arrow file, a datasets save_to_disk folder, "
                            "or hf://NAME[:SPLIT]", positional=True)
    columns: str | None = option(None, "FIELD=COLUMN,...: read a format's fields from columns named otherwise, e.g. "
                                       "prompt=question,completion=answer")
    model: str = option(DEFAULT_MODEL, "whose tokenizer and chat template to use")
    format: str = option("auto", "data format", choices=["auto", *FORMATS])
    max_length: int = option(256, "tokens per example (training truncates longer ones)")
    completion_only: bool = option(True, "loss only on responses / assistant turns (prompt and chat formats)")
    mask_empty_think: bool = option(False, "as train's flag: an empty <think></think> block opening an assistant "
                                           "turn is not counted as trained")
    show: int = option(0, "index of the example to render")
    val: str | None = option(None, "a validation file: report its records that duplicate or nearly duplicate FILE's")
    near_threshold: float = option(quality.NEAR_THRESHOLD, "Jaccard similarity (of word 3-shingles) from which "
                                                           "two records are near-duplicates")
    min_response_words: int = option(quality.MIN_RESPONSE_WORDS, "responses with fewer words are reported as short")
    strict: bool = option(False, "exit with status 1 on any problem reported, not only when nothing is usable")
    stream: bool | None = option(None, "read a --format text corpus (.txt/.jsonl files or a folder of them) in one "
                                       "streamed pass, quality checked on its first documents (default: so for "
                                       "--format text; --no-stream reads it in memory)")

    def __post_init__(self):
        if not 0 < self.near_threshold <= 1:
            raise ValueError(f"--near-threshold must be in (0, 1], got {self.near_threshold}")
        if self.min_response_words < 0:
            raise ValueError(f"--min-response-words must be >= 0, got {self.min_response_words}")


def usable(report: dict) -> int:
    """How many examples (or preference pairs) of a check's report training would keep."""
    return report["pairs" if "pairs" in report else "examples"] - report["dropped"]


def problems(report: dict) -> int:
    """How many problems a check's report holds: records skipped or refused, examples dropped, quality findings."""
    if "pairs" in report:
        return len(report["problems"]) + report["dropped"]
    return report["empty"] + report["dropped"] + sum(n for k, n in report["quality"].items() if k != "records")


def main(argv=None) -> int:
    _, a, _ = parse_command({"check": CheckArgs}, argv, "python -m lora_engine.data", "Inspect a training data file.")
    from lora_engine.models.tokenizer import load_tokenizer

    if stream.streams(a.file, a.format, a.stream):  # a --format text corpus of any size: one pass, bounded memory
        if a.val:
            raise DataError("--val compares every record with every validation record, in memory; a streamed corpus "
                            "(--format text) is checked alone: drop --val, or pass --no-stream")
        stream.corpus_files(a.file)  # before the tokenizer: a bad path is reported at once
        with user_input("--model"):
            tok = load_tokenizer(a.model)
        report = check_stream(a.file, tok, a.max_length, parse_columns(a.columns) or None, sys.stdout, a.show)
    else:
        # before the tokenizer: a bad file is reported at once
        files = read_data(DataSpec(data=a.file, val_data=a.val, columns=a.columns))
        with user_input("--model"):
            tok = load_tokenizer(a.model)
        report = check(a.file, tok, a.format, a.max_length, a.completion_only, a.show, file=sys.stdout,
                       records=files[a.file], val_records=files.get(a.val), near_threshold=a.near_threshold,
                       min_response_words=a.min_response_words, mask_empty_think=a.mask_empty_think)
    if not usable(report):
        print(f"{a.file}: nothing usable: training would keep no example (each one empty, refused, or left without "
              "a target token at --max-length)", file=sys.stderr)
        return 1
    if a.strict and problems(report):
        print(f"{a.file}: {problems(report)} problems (--strict)", file=sys.stderr)
        return 1
    return 0
