"""Data sources beyond JSONL (data/sources.py): each gives the rows (token ids and labels, through prepare.py) of
the equivalent JSONL file; ShareGPT and tool-call records; --columns; and one error line for a broken source."""

import csv
import json
import sys

import pytest

from lora_engine.cli import run_cli
from lora_engine.data.check import main as check_main
from lora_engine.data.formats import DataError
from lora_engine.data.prepare import DataSpec, prepare_data, read_data
from lora_engine.data.sources import data_files, parse_columns, read_source
from tests.test_train_support import FakeTokenizer, save_tokenizer_files, write_jsonl

pa = pytest.importorskip("pyarrow")  # the test extra; the library imports it only for these sources
import pyarrow.feather as feather  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

TOK = FakeTokenizer()

PROMPTS = [{"prompt": f"Q{i}, with a comma and \"quotes\"\nand a newline: é?", "completion": f"A {i} ü."}
           for i in range(6)]
# Chat records where only some messages carry a key (tool_calls) and some records a field (input): arrow stores
# the union of keys, with None where a row has none, and the reader must give back what JSONL would.
MIXED = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "It is 18C."}]},
] * 3


def rows(source, tok=TOK, **spec) -> list:
    """Every row of a source, training and held-out, as (input_ids, labels), through the one data owner."""
    p = prepare_data(DataSpec(data=str(source), val_split=0.34, max_length=512, **spec), tok)
    return [(r.input_ids, r.labels) for r in p.train + p.val]


def write_csv(path, records):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(records[0]))
        w.writeheader()
        w.writerows(records)
    return path


class ToolTokenizer(FakeTokenizer):
    """FakeTokenizer whose ChatML template renders tools, assistant tool calls and tool results (Qwen2.5-like)."""

    TEMPLATE = (
        "{% if tools %}<|im_start|>system\n# Tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
        "{% endif %}{% for m in messages %}"
        "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
        "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}{% if m.tool_calls is defined %}"
        "{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% endif %}"
        "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

    def __init__(self):
        super().__init__(self.TEMPLATE)

    def apply_chat_template(self, messages, add_generation_prompt=False, tools=None):
        import jinja2

        return jinja2.Template(self.chat_template).render(messages=messages, tools=tools,
                                                          add_generation_prompt=add_generation_prompt)


# ---- each source == its JSONL ---------------------------------------------------------------------------


def test_csv_gives_the_rows_of_the_jsonl(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", PROMPTS)
    assert rows(write_csv(tmp_path / "d.csv", PROMPTS)) == rows(jsonl)
    (rec,) = read_source(write_csv(tmp_path / "n.csv", [{"prompt": "1", "completion": ""}]))
    assert rec.data == {"prompt": "1", "completion": ""} and rec.where.endswith("n.csv:2")  # strings, line numbers


@pytest.mark.parametrize("suffix", [".parquet", ".arrow", ".feather", ".stream.arrow"])
def test_columnar_files_give_the_rows_of_the_jsonl(tmp_path, suffix):
    tok = ToolTokenizer()
    for name, records in (("prompts", PROMPTS), ("mixed", MIXED)):
        table = pa.Table.from_pylist(records)
        path = tmp_path / f"{name}{suffix}"
        if suffix == ".parquet":
            pq.write_table(table, path)
        elif suffix == ".stream.arrow":  # the IPC stream format, as datasets writes its .arrow files
            with pa.OSFile(str(path), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
                w.write_table(table)
        else:
            feather.write_feather(table, path)
        assert [r.data for r in read_source(path)] == records  # nested messages: the JSON records, no None keys
        assert rows(path, tok) == rows(write_jsonl(tmp_path / f"{name}.jsonl", records), tok)


def test_saved_datasets_folder_gives_the_rows_of_the_jsonl_with_and_without_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    tok = ToolTokenizer()
    expected = rows(write_jsonl(tmp_path / "d.jsonl", MIXED), tok)
    datasets.Dataset.from_list(MIXED).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(MIXED),
                          "test": datasets.Dataset.from_list(MIXED[:2])}).save_to_disk(str(tmp_path / "dict"))
    assert rows(tmp_path / "saved", tok) == expected
    assert rows(tmp_path / "dict", tok) == expected  # a DatasetDict: its train split
    assert len(read_source(tmp_path / "dict" / "test")) == 2
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: the arrow files through pyarrow
    assert rows(tmp_path / "saved", tok) == expected
    # run.json hashes every file of the folder
    assert {p.name for p in data_files(str(tmp_path / "saved"))} >= {"state.json", "dataset_info.json"}
    assert data_files("hf://org/name", None) == []


def test_hub_source_goes_through_load_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, split):  # no network in tests: the hub stands in as a local Dataset
        calls.append((name, split))
        return datasets.Dataset.from_list(PROMPTS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    expected = rows(write_jsonl(tmp_path / "d.jsonl", PROMPTS))
    assert rows("hf://org/qa") == expected and rows("hf://org/qa:validation") == expected
    assert calls[0] == ("org/qa", "train") and calls[-1] == ("org/qa", "validation")
    assert read_source("hf://org/qa")[0].where == "hf://org/qa[0]"

    def missing(name, split):
        raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DataError, match=r"hf://org/nope: datasets.load_dataset\('org/nope', split='train'\) failed "
                                        r"\(Dataset 'org/nope' doesn't exist on the Hub\); check the name"):
        read_source("hf://org/nope")


@pytest.mark.parametrize("source", ["hf://", "hf://:train", "hf://org/x:"])
def test_hub_source_that_names_nothing_is_refused(source):
    with pytest.raises(DataError, match=r"expected hf://NAME or hf://NAME:SPLIT"):
        read_source(source)


def test_hub_source_without_datasets_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"hf://org/qa: reading a Hugging Face hub dataset needs the datasets "
                                        r"library: pip install datasets"):
        read_source("hf://org/qa")


# ---- ShareGPT, tool calls, --columns --------------------------------------------------------------------


def test_sharegpt_gives_the_rows_of_the_messages_jsonl(tmp_path):
    share = [{"system": "Be brief.", "conversations": [
        {"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"Hello {i}!"},
        {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao"}]} for i in range(4)]
    msgs = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                          {"role": "assistant", "content": f"Hello {i}!"}, {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "Ciao"}]} for i in range(4)]
    assert rows(write_jsonl(tmp_path / "s.jsonl", share)) == rows(write_jsonl(tmp_path / "m.jsonl", msgs))
    pq.write_table(pa.Table.from_pylist(share), tmp_path / "s.parquet")
    assert rows(tmp_path / "s.parquet") == rows(tmp_path / "m.jsonl")


def test_sharegpt_function_calls_are_assistant_tool_calls_trained_and_results_are_not(tmp_path):
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    call = {"name": "weather", "arguments": {"city": "Paris"}}
    share = [{"tools": json.dumps([tool]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"}, {"from": "function_call", "value": json.dumps(call)},
        {"from": "observation", "value": "18C"}, {"from": "gpt", "value": "It is 18C."}]}] * 3
    openai = [{"tools": [tool], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": call}]},
        {"role": "tool", "content": "18C"}, {"role": "assistant", "content": "It is 18C."}]}] * 3
    tok = ToolTokenizer()
    got = rows(write_jsonl(tmp_path / "s.jsonl", share), tok)
    assert got == rows(write_jsonl(tmp_path / "o.jsonl", openai), tok)
    ids, labels = got[0]
    assert '"name": "weather"' in tok.decode(ids) and "# Tools" in tok.decode(ids)  # tools= reached the template
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert trained == ('<tool_call>{"arguments": {"city": "Paris"}, "name": "weather"}</tool_call><|im_end|>\n'
                       "It is 18C.<|im_end|>\n")  # the call is learnt; the tool's result (18C) and the tools not


def test_columns_give_the_rows_of_the_renamed_jsonl(tmp_path):
    renamed = [{"question": r["prompt"], "answer": r["completion"], "id": i} for i, r in enumerate(PROMPTS)]
    expected = rows(write_jsonl(tmp_path / "d.jsonl", PROMPTS))
    cols = "prompt=question, completion=answer"
    assert rows(write_jsonl(tmp_path / "r.jsonl", renamed), columns=cols) == expected
    assert rows(write_csv(tmp_path / "r.csv", renamed), columns=cols) == expected
    assert read_source(tmp_path / "r.jsonl", parse_columns(cols))[0].data == {**PROMPTS[0], "id": 0}
    with pytest.raises(DataError, match=r"r.csv:2: --columns completion=reply: no column 'reply' \(the columns are "
                                        r"\['answer', 'id', 'question'\]\); fix --columns or the file"):
        rows(tmp_path / "r.csv", columns="prompt=question,completion=reply")


@pytest.mark.parametrize("spec, match", [
    ("prompt", r"--columns: 'prompt' is not FIELD=COLUMN"), ("=q", r"'=q' is not FIELD=COLUMN"),
    ("prompt=a,prompt=b", r"field 'prompt' is mapped twice \(prompt=a and prompt=b\)")])
def test_malformed_columns_are_refused(spec, match):
    with pytest.raises(DataError, match=match):
        parse_columns(spec)


def test_columns_without_data_are_refused():
    with pytest.raises(DataError, match=r"--columns maps the columns of --data, and no --data is given"):
        read_data(DataSpec(columns="prompt=q"))  # what training and `data check` read first


# ---- broken sources: one DataError naming the file ---------------------------------------------------------


def test_broken_sources_are_one_error_each(tmp_path, monkeypatch):
    pq.write_table(pa.Table.from_pylist(PROMPTS), tmp_path / "ok.parquet")
    good = (tmp_path / "ok.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(good[: len(good) // 2])
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all" * 8)
    (tmp_path / "ragged.csv").write_text("prompt,completion\na,b\nc,d,e\n")
    (tmp_path / "quote.csv").write_text('prompt,completion\na,"b\n')
    (tmp_path / "latin.csv").write_bytes("prompt,completion\nd\xe9j\xe0,b\n".encode("latin-1"))
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "twice.csv").write_text("prompt,prompt\na,b\n")
    (tmp_path / "folder").mkdir()
    cases = [
        ("cut.parquet", r"cut.parquet: not a readable parquet file \(.+\); write it again, or convert it to JSONL"),
        ("junk.arrow", r"junk.arrow: not a readable arrow file"),
        ("ragged.csv", r"ragged.csv:3: 3 fields where the header has 2; quote values that hold commas"),
        ("quote.csv", r"quote.csv:\d+: not a readable CSV file \(.+\); check its quoting"),
        ("latin.csv", r"latin.csv: not UTF-8 text .*save the file as UTF-8"),
        ("empty.csv", r"empty.csv: an empty CSV file; its first row must name the fields"),
        ("twice.csv", r"twice.csv:1: the header names a column twice"),
        ("missing.parquet", r"data file .*missing.parquet does not exist"),
        ("folder", r"folder is a folder but not one written by datasets' save_to_disk \(no state.json\)"),
    ]
    for name, match in cases:
        with pytest.raises(DataError, match=match):
            read_source(tmp_path / name)
    bad_share = write_jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": "bot", "value": "x"}]}])
    with pytest.raises(DataError, match=r"share.jsonl:1: conversations\[0\].from is 'bot'; ShareGPT turns come from "
                                        r"one of human, user, gpt"):
        read_source(bad_share)
    bad_call = write_jsonl(tmp_path / "call.jsonl", [{"conversations": [{"from": "function_call", "value": "{x"}]}])
    with pytest.raises(DataError, match=r"call.jsonl:1: conversations\[0\] \(function_call\) is not JSON"):
        read_source(bad_call)
    bad_tools = write_jsonl(tmp_path / "tools.jsonl", [{"tools": "weather", "messages": MIXED[0]["messages"]}])
    with pytest.raises(DataError, match=r"tools.jsonl:1: 'tools' must be a list of tool objects"):
        rows(bad_tools)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # pyarrow is an optional dependency
    with pytest.raises(DataError, match=r"reading .*ok.parquet needs pyarrow, which is not installed: "
                                        r"pip install pyarrow"):
        read_source(tmp_path / "ok.parquet")


def test_data_check_reads_every_source_and_reports_a_broken_one_in_one_line(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    tok = save_tokenizer_files(tmp_path / "tok")
    renamed = [{"q": r["prompt"], "a": r["completion"]} for r in PROMPTS]
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "d.parquet")
    assert check_main(["check", str(tmp_path / "d.parquet"), "--model", str(tok), "--columns", "prompt=q,completion=a"]) == 0
    out = capsys.readouterr().out
    assert "records: 6  formats: {'prompt_completion': 6}" in out and "d.parquet[0]" in out
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 garbage")
    assert run_cli(check_main, ["check", str(tmp_path / "bad.parquet"), "--model", str(tok)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "bad.parquet: not a readable parquet file" in err[0]


def test_the_tokenizer_passes_tools_to_the_template_and_leaves_them_undefined_without(tmp_path):
    from lora_engine.models.tokenizer import load_tokenizer

    tok = load_tokenizer(save_tokenizer_files(tmp_path))
    tok.chat_template, tok._compiled = "{{ (tools | tojson) if tools is defined else 'none' }}", None
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs) == "none"
    assert tok.apply_chat_template(msgs, tools=[{"type": "function", "function": {"name": "f"}}]) == \
        '[{"type": "function", "function": {"name": "f"}}]'
