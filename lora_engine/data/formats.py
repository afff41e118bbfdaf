"""Reading training files and rendering each record into token ids with a loss mask.

Formats (one JSON object per record; JSONL, or a JSON file holding a list of objects):

  text               {"text": "..."}                                   loss on every token
  alpaca             {"instruction", "input" (optional), "output"}      loss on the response
  prompt_completion  {"prompt", "completion"}                          loss on the completion
  chat               {"messages": [{"role", "content"}, ...]}          loss on assistant turns
                     (and "tools": [...], "tool_calls" on assistant messages, role "tool" results: rendered by
                     the template, given tools=; the assistant's tool calls are trained, tool results not)

Other sources (CSV, parquet, arrow, datasets folders, the hub) and ShareGPT records: sources.py.

A record renders to segments, (text, trainable) pairs, each encoded separately and concatenated,
so a token's label is its id when trainable and -100 otherwise. Chat records are rendered with the
tokenizer's chat template, and the assistant turns found in the rendering by spans.py: through the
template's {% generation %} markers, else by rendering growing prefixes of the conversation, else (reasoning
templates such as Qwen3's, which render a turn differently once others follow it) with sentinels; what is
trained is what the whole rendering shows. Templates that defeat all three are reported, not guessed at.
"""

from __future__ import annotations

import json
import reprlib
from dataclasses import dataclass
from pathlib import Path

from lora_engine.data import spans
from lora_engine.models.chat_template import ChatTemplateError

FORMATS = ("text", "alpaca", "prompt_completion", "chat")
REQUIRED = {
    "text": ("text",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "chat": ("messages",),
}
ALPACA_PROMPT = "Below is an instruction that describes a task{ctx}. Write a response that appropriately " \
    "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


class DataError(ValueError):
    """A training file or record is unusable; the message names the file and line."""


@dataclass
class Record:
    data: dict
    where: str  # "file:line" (JSONL) or "file[index]" (JSON list), for error messages


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken
    where: str

    @property
    def n_targets(self) -> int:
        return sum(1 for x in self.labels[1:] if x != -100)


def read_records(path: str | Path) -> list[Record]:
    """All records of a JSONL or JSON file. Raises DataError with file:line and the reason."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(f"data file {path} {what}; pass a JSONL or JSON file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset {e.start}); "
                        "save the file as UTF-8") from None
    text = text.removeprefix("\ufeff")  # a byte order mark, which some editors write: not part of the data
    stripped = text.lstrip()
    if path.suffix == ".json" or stripped.startswith("["):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to read; a record is an object of strings") from None
        if isinstance(obj, dict) and "data" in obj and isinstance(obj["data"], list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise DataError(f"{path}: a .json data file must hold a list of objects, got {type(obj).__name__}")
        records = [Record(r, f"{path}[{i}]") for i, r in enumerate(obj)]
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(Record(json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno}); each line must be one "
                                "JSON object") from e
            except RecursionError:
                raise DataError(f"{path}:{n}: JSON nested too deeply to read; a record is an object of "
                                "strings") from None
    for r in records:
        if not isinstance(r.data, dict):
            raise DataError(f"{r.where}: expected a JSON object, got {type(r.data).__name__}")
        _check_text(r)
    return records


def _check_text(record: Record) -> None:
    """Refuse a string holding a lone surrogate (JSON's "\\ud800" escape alone): it is no character, no
    tokenizer can encode it, and UTF-8 cannot store it. Walks the record without recursion."""
    stack = [(record.data, "")]
    while stack:
        value, field = stack.pop()
        if isinstance(value, dict):
            stack += [(v, f"{field}.{k}" if field else str(k)) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{field}[{i}]") for i, v in enumerate(value)]
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{record.where}: field {field!r} holds a lone surrogate "
                                f"{value[e.start]!r} (a \\u escape that is half of a character); fix the "
                                "escape or drop the record") from None


def detect_format(record: Record) -> str:
    keys = set(record.data)
    if "messages" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"{record.where}: cannot tell the format from the keys {sorted(keys)}; expected one of "
        "text {text}, alpaca {instruction, input, output}, prompt_completion {prompt, completion}, "
        "chat {messages}; or pass --format"
    )


def check_format(fmt: str) -> str:
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")
    return fmt


def _field(record: Record, key: str, fmt: str, allow_empty: bool = False) -> str:
    if key not in record.data:
        raise DataError(f"{record.where}: missing field {key!r} for format {fmt} (has {sorted(record.data)})")
    v = record.data[key]
    if v is None:
        v = ""
    if not isinstance(v, str):
        raise DataError(f"{record.where}: field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise EmptyField(f"{record.where}: field {key!r} is empty")
    return v


class EmptyField(DataError):
    """A record with an empty required field: skipped (and counted) rather than fatal."""


def segments(record: Record, fmt: str, tokenizer, completion_only: bool = True,
             mask_empty_think: bool = False) -> list[tuple[str, bool]]:
    """Render one record into (text, trainable) segments. The last segment does not include EOS.
    `mask_empty_think`: chat turns that open with an empty `<think></think>` block are not trained on it."""
    if fmt == "text":
        return [(_field(record, "text", fmt), True)]
    if fmt == "alpaca":
        ins = _field(record, "instruction", fmt)
        inp = _field(record, "input", fmt, allow_empty=True) if "input" in record.data else ""
        prompt = ALPACA_PROMPT.format(
            ctx=", paired with an input that provides further context" if inp.strip() else "",
            instruction=ins, input_block=f"### Input:\n{inp}\n\n" if inp.strip() else "",
        )
        return [(prompt, not completion_only), (_field(record, "output", fmt), True)]
    if fmt == "prompt_completion":
        return [(_field(record, "prompt", fmt), not completion_only), (_field(record, "completion", fmt), True)]
    if fmt == "chat":
        return _chat_segments(record, tokenizer, completion_only, mask_empty_think)
    raise DataError(f"unknown data format {fmt!r}; choose auto or one of {', '.join(FORMATS)}")


def check_messages(where: str, msgs, field: str = "messages") -> list[dict]:
    """`msgs` (the record's `field`) as a non-empty list of {role: str, content: str} messages; DataError naming
    `where` and the message otherwise, EmptyField for an empty content."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(msgs):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and not calls):
            raise DataError(f"{where}: {field}[{i}] must have 'role' and 'content', got {reprlib.repr(m)}")
        if not isinstance(m["role"], str):
            raise DataError(f"{where}: {field}[{i}].role must be a string such as 'user' or 'assistant', "
                            f"got {type(m['role']).__name__}")
        if calls is not None and (m["role"] != "assistant" or not isinstance(calls, list)
                                  or not all(isinstance(c, dict) for c in calls)):
            raise DataError(f"{where}: {field}[{i}].tool_calls must be a list of objects, on an assistant message")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}].content must be a string, got {type(content).__name__}")
        if not calls and (not content or not content.strip()):  # a tool call may come without text
            raise EmptyField(f"{where}: {field}[{i}].content is empty")
    return msgs


def _chat_segments(record: Record, tok, completion_only: bool, mask_empty_think: bool) -> list[tuple[str, bool]]:
    msgs = check_messages(record.where, record.data.get("messages"))
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{record.where}: no assistant message: nothing to learn from this conversation")
    if not getattr(tok, "chat_template", None):
        raise DataError(
            f"{record.where}: the chat format needs a chat template but tokenizer "
            f"{getattr(tok, 'name_or_path', '?')!r} has none; use a model with a chat template or convert the "
            "data to prompt_completion"
        )
    tools = record.data.get("tools")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise DataError(f"{record.where}: 'tools' must be a list of tool objects ({{type, function}}), got "
                        f"{reprlib.repr(tools)}")
    # tools= only when the record has some: templates test `tools is defined`, and tokenizers may not take it
    extra = {"tools": tools} if tools else {}

    def render(messages: list, add_generation_prompt: bool, generation_spans: list | None = None) -> str:
        kw = extra if generation_spans is None else {**extra, "generation_spans": generation_spans}
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw)
        except ChatTemplateError as e:  # often the template refusing this conversation (roles, order)
            raise DataError(f"{record.where}: {e}") from e

    msgs = spans.alias_reasoning(msgs)
    try:
        full, found = spans.assistant_spans(render, msgs, tok.chat_template, getattr(tok, "eos_token", None))
    except spans.SpanError as e:
        if not completion_only:  # every token is trained: where the turns are does not matter
            return [(render(msgs, False), True)]
        raise DataError(f"{record.where}: {e}") from None
    return spans.segments(full, found, completion_only, mask_empty_think)


def tokenize(record: Record, fmt: str, tokenizer, completion_only: bool = True,
             mask_empty_think: bool = False) -> Example:
    """Record -> Example (untruncated).

    Text-like formats start as the checkpoint's tokenizer starts a text (`tokenizer.prefix_ids`: the
    BOS of Llama and Mistral, nothing for SmolLM2; never a target) and get EOS appended as a target.
    Chat records are exactly what the template renders, which writes its own BOS where it wants one.
    """
    ids: list[int] = []
    labels: list[int] = []
    if fmt != "chat":
        ids += tokenizer.prefix_ids
        labels += [-100] * len(tokenizer.prefix_ids)
    for text, trainable in segments(record, fmt, tokenizer, completion_only, mask_empty_think):
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        labels += piece if trainable else [-100] * len(piece)
    if fmt != "chat" and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return Example(ids, labels, record.where)
