"""Reading --data from wherever users keep it, as the records formats.py renders.

  .jsonl, .json              formats.read_records (one JSON object a line, or a list of objects)
  .csv                       the standard library's csv; a header row names the fields, every value is a string
  .parquet, .arrow, .feather pyarrow (an optional dependency, imported here only: pip install pyarrow)
  a folder                   written by `datasets`' save_to_disk: datasets.load_from_disk when it is installed,
                             else the folder's arrow files through pyarrow
  hf://NAME[:SPLIT]          datasets.load_dataset(NAME, split=SPLIT or "train"): only where `datasets` is
                             installed; the download (network, authentication) is the user's

Columnar sources give the Python values JSON would: nested columns (a `messages` list of structs) become lists
of dicts. Arrow stores a struct column with every key any row has, so a message without `tool_calls` comes back
with `tool_calls: None`; keys holding None are dropped, so that a record is the one its JSONL line would be
(templates test `message.tool_calls is defined`). Values JSON cannot hold (timestamps, decimals, bytes) become
their text.

Every record then goes through the same two steps, whatever its source:
  --columns FIELD=COLUMN,...   the field a format reads (prompt, completion, text, messages...) taken from a
                               column named otherwise; a column missing is an error naming it and the file
  ShareGPT                     {"conversations": [{"from": "human"|"gpt"|..., "value": ...}]} becomes the chat
                               format's {"messages": [{"role", "content"}]} (function_call turns become assistant
                               tool calls, observation turns tool results)
"""

from __future__ import annotations

import csv
import datetime
import decimal
import json
from pathlib import Path

from lora_engine.data.formats import DataError, Record, _check_text, read_records

ARROW_SUFFIXES = (".arrow", ".feather")
# A CSV field may hold a whole document (--format text), more than csv's default limit of 128 KiB; this bound
# keeps a file with a runaway quote (everything after it one field) from being read into one string unbounded.
MAX_CSV_FIELD = 64 * 2**20
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant"}


def read_source(source: str | Path, columns: dict[str, str] | None = None) -> list[Record]:
    """The records of one --data source (see the module docstring), mapped by `columns` ({field: column}) and
    with ShareGPT records made chat records. Raises DataError naming the source and what to do."""
    s = str(source)
    if s.startswith("hf://"):
        records = _read_hub(s)
    else:
        path = Path(s)
        suffix = path.suffix.lower()
        if path.is_dir():
            records = _read_saved(path)
        elif suffix in (".csv", ".parquet", *ARROW_SUFFIXES) and not path.is_file():
            raise DataError(f"data file {path} does not exist")
        elif suffix == ".csv":
            records = _read_csv(path)
        elif suffix == ".parquet":
            records = _from_rows(_arrow_table(path, "parquet").to_pylist(), str(path))
        elif suffix in ARROW_SUFFIXES:
            records = _from_rows(_arrow_table(path, "arrow").to_pylist(), str(path))
        else:
            records = read_records(path)  # JSONL or JSON: checked there already
    out = [Record(_sharegpt(_mapped(r, columns or {}), r.where), r.where) for r in records]
    for r in out:
        _check_text(r)
    return out


def data_files(*sources: str | None) -> list[Path]:
    """The files behind the sources (whose hashes run.json records): a file itself, every file of a folder, nothing
    for hf:// (the hub's revision is not ours to hash)."""
    out: list[Path] = []
    for s in sources:
        if not s or str(s).startswith("hf://"):
            continue
        p = Path(s)
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return out


def parse_columns(spec: str | None) -> dict[str, str]:
    """--columns "prompt=question,completion=answer" -> {"prompt": "question", "completion": "answer"}."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        field, eq, column = (x.strip() for x in item.partition("="))
        if not eq or not field or not column:
            raise DataError(f"--columns: {item.strip()!r} is not FIELD=COLUMN; e.g. --columns "
                            "prompt=question,completion=answer")
        if field in out:
            raise DataError(f"--columns: field {field!r} is mapped twice ({field}={out[field]} and {field}={column})")
        out[field] = column
    return out


# ---- readers ----------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[Record]:
    old = csv.field_size_limit(MAX_CSV_FIELD)  # csv's limit is process-wide: restored below
    records: list[Record] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte order mark is no part of the header
            reader = csv.reader(f, strict=True)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path}: an empty CSV file; its first row must name the fields (e.g. "
                                "prompt,completion)")
            if len(set(header)) != len(header):
                raise DataError(f"{path}:1: the header names a column twice ({header}); rename one")
            while True:
                line = reader.line_num + 1  # where the row starts: a quoted value may span lines
                row = next(reader, None)
                if row is None:
                    break
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path}:{line}: {len(row)} fields where the header has "
                                    f"{len(header)}; quote values that hold commas or newlines")
                records.append(Record(dict(zip(header, row)), f"{path}:{line}"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at a byte 0x{e.object[e.start]:02x}); save the file "
                        "as UTF-8") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not a readable CSV file ({e}); check its quoting") from None
    finally:
        csv.field_size_limit(old)
    return records


def _pyarrow(path):
    try:
        import pyarrow  # an optional dependency: only these sources need it
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow") from None
    return pyarrow


def _arrow_table(path: Path, kind: str):
    pa = _pyarrow(path)
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        import pyarrow.ipc as ipc

        with pa.memory_map(str(path)) as source:
            try:  # the IPC file format (Feather v2, .arrow files written by pyarrow)...
                return ipc.open_file(source).read_all()
            except pa.ArrowInvalid:  # ... or the stream format (the .arrow files of datasets' save_to_disk)
                source.seek(0)
                return ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable {kind} file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        f"; write it again, or convert it to JSONL") from None


def _read_saved(path: Path) -> list[Record]:
    """A folder of datasets' save_to_disk: one Dataset (state.json), or a DatasetDict (dataset_dict.json), whose
    "train" split is read."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        if "train" not in splits:
            raise DataError(f"{path}: a saved DatasetDict without a 'train' split (splits: {splits}); pass the "
                            f"split's folder, e.g. --data {path / splits[0] if splits else path}")
        path = path / "train"
    if not (path / "state.json").is_file():
        raise DataError(f"{path} is a folder but not one written by datasets' save_to_disk (no state.json); pass a "
                        "data file (.jsonl, .json, .csv, .parquet, .arrow) or such a folder")
    try:
        import datasets
    except ImportError:  # read its arrow files ourselves, in the order state.json lists them
        return _read_saved_arrow(path)
    try:
        rows = datasets.load_from_disk(str(path)).to_list()
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: datasets.load_from_disk could not read it ({e}); save it again") from None
    return _from_rows(rows, str(path))


def _read_saved_arrow(path: Path) -> list[Record]:
    try:
        names = [f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}/state.json: unreadable ({e}); save the dataset again") from None
    rows: list = []
    for name in names:
        rows += _arrow_table(path / name, "arrow").to_pylist()
    return _from_rows(rows, str(path))


def _read_hub(source: str) -> list[Record]:
    name, _, split = source.removeprefix("hf://").partition(":")
    if not name.strip() or (":" in source.removeprefix("hf://") and not split.strip()):
        raise DataError(f"{source}: expected hf://NAME or hf://NAME:SPLIT, e.g. hf://tatsu-lab/alpaca:train")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading a Hugging Face hub dataset needs the datasets library: pip install "
                        "datasets") from None
    try:
        rows = datasets.load_dataset(name, split=split or "train").to_list()
    except (OSError, ValueError, ConnectionError) as e:
        raise DataError(f"{source}: datasets.load_dataset({name!r}, split={split or 'train'!r}) failed "
                        f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); check the name, the split and "
                        "the network") from None
    return _from_rows(rows, source)


def _from_rows(rows: list, where: str) -> list[Record]:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where}[{i}]: expected a record of named columns, got {type(row).__name__}")
        out.append(Record(_plain(row), f"{where}[{i}]"))
    return out


def _plain(value):
    """`value` as JSON would give it: None-valued keys dropped (see the module docstring), other types as text.
    Iterative, so that a deeply nested value is no RecursionError."""
    root: list = [value]
    stack = [(root, 0)]
    while stack:
        holder, key = stack.pop()
        v = holder[key]
        if isinstance(v, dict):
            v = holder[key] = {k: x for k, x in v.items() if x is not None}
            stack += [(v, k) for k in v]
        elif isinstance(v, (list, tuple)):
            v = holder[key] = list(v)
            stack += [(v, i) for i in range(len(v))]
        elif isinstance(v, bytes):
            holder[key] = v.decode("utf-8", "replace")
        elif isinstance(v, (datetime.date, datetime.time, datetime.timedelta, decimal.Decimal)):
            holder[key] = str(v)
    return root[0]


# ---- record mapping ---------------------------------------------------------------------------------------


def _mapped(record: Record, columns: dict[str, str]) -> dict:
    if not columns:
        return record.data
    for f, c in columns.items():
        if c not in record.data:
            raise DataError(f"{record.where}: --columns {f}={c}: no column {c!r} (the columns are "
                            f"{sorted(record.data)}); fix --columns or the file")
    sources = set(columns.values())
    out = {k: v for k, v in record.data.items() if k not in sources}
    out.update({f: record.data[c] for f, c in columns.items()})
    return out


def _sharegpt(data: dict, where: str) -> dict:
    """A ShareGPT record as a chat record (others unchanged): {"conversations": [{"from", "value"}], "system"?,
    "tools"?} -> {"messages": [{"role", "content"}, ...], "tools"?} (LLaMA-Factory's and Axolotl's reading)."""
    if "messages" in data or "conversations" not in data:
        return data
    turns = data["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} objects")
    msgs = []
    if isinstance(data.get("system"), str) and data["system"].strip():
        msgs.append({"role": "system", "content": data["system"]})
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not isinstance(t.get("value"), str):
            raise DataError(f"{where}: conversations[{i}] must have the strings 'from' and 'value', got {t!r:.80}")
        role = SHAREGPT_ROLES.get(t["from"])
        if role is None:
            raise DataError(f"{where}: conversations[{i}].from is {t['from']!r}; ShareGPT turns come from one of "
                            f"{', '.join(SHAREGPT_ROLES)}")
        if t["from"] != "function_call":
            msgs.append({"role": role, "content": t["value"]})
            continue
        try:  # LLaMA-Factory's function_call turn: a JSON {"name", "arguments"} (or a list of them)
            calls = json.loads(t["value"])
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: conversations[{i}] (function_call) is not JSON ({e.msg}); write it as "
                            '{"name": ..., "arguments": {...}}') from None
        calls = calls if isinstance(calls, list) else [calls]
        msgs.append({"role": "assistant", "content": "",
                     "tool_calls": [{"type": "function", "function": c} for c in calls]})
    out = {k: v for k, v in data.items() if k not in ("conversations", "system")}
    out["messages"] = msgs
    if isinstance(out.get("tools"), str):  # LLaMA-Factory stores the tool list as a JSON string
        try:
            out["tools"] = json.loads(out["tools"])
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: 'tools' is a string but not JSON ({e.msg}); give the list of tools") from None
    return out
