"""Data: each format and its loss mask, truncation, packing isolation, splits, bad input, `data check`."""

import io
import json

import pytest
import torch

from lora_engine.data.check import check
from lora_engine.data.formats import ALPACA_PROMPT
from lora_engine.data.pipeline import Batcher, DataError, collate, load_examples, prepare, split
from tests.test_train_support import FakeTokenizer, chat_records, tiny_lora_model, tiny_model_folder, write_jsonl

TOK = FakeTokenizer()


def load(tmp_path, records, fmt="auto", **kw):
    return load_examples(write_jsonl(tmp_path / "d.jsonl", records), TOK, fmt, **kw)


def trained_text(ex):
    return "".join(TOK.decode([t]) for t, lab in zip(ex.input_ids, ex.labels) if lab != -100)


def test_chat_mask_token_by_token(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ciao"}]
    (ex,) = load(tmp_path, [{"messages": msgs}])
    full = TOK.apply_chat_template(msgs)
    assert TOK.decode(ex.input_ids) == full
    # Expected label per token, built independently: trained exactly on the assistant contents
    # and the <|im_end|> that closes them (the model must learn to stop), nothing else.
    expected = []
    for m in msgs:
        head = TOK.encode(f"<|im_start|>{m['role']}\n")
        body = TOK.encode(m["content"] + "<|im_end|>")
        on = m["role"] == "assistant"
        expected += [-100] * len(head) + (body if on else [-100] * len(body))
        expected += TOK.encode("\n") if on else [-100]
    assert ex.labels == expected
    assert trained_text(ex) == "Hello!<|im_end|>\nCiao<|im_end|>\n"


def test_chat_mask_off_trains_everything(tmp_path):
    (ex,) = load(tmp_path, chat_records(1), completion_only=False)
    assert ex.labels == ex.input_ids


def test_text_format_trains_all_tokens_and_eos(tmp_path):
    (ex,) = load(tmp_path, [{"text": "abc"}])
    assert ex.input_ids == [97, 98, 99, TOK.eos_token_id] and ex.labels == ex.input_ids


def test_alpaca_loss_only_on_output(tmp_path):
    (ex,) = load(tmp_path, [{"instruction": "Add", "input": "1 1", "output": "2"}])
    prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context", instruction="Add",
                                  input_block="### Input:\n1 1\n\n")
    assert TOK.decode(ex.input_ids) == prompt + "2<|im_end|>"
    assert trained_text(ex) == "2<|im_end|>"
    (no_input,) = load(tmp_path, [{"instruction": "Say hi", "output": "hi"}])
    assert "### Input" not in TOK.decode(no_input.input_ids)


def test_prompt_completion_and_format_override(tmp_path):
    (ex,) = load(tmp_path, [{"prompt": "Q: 1+1? A:", "completion": " 2"}])
    assert trained_text(ex) == " 2<|im_end|>"
    # --format text on a record that also has "text": forced, not detected.
    (forced,) = load(tmp_path, [{"prompt": "p", "completion": "c", "text": "t"}], fmt="text")
    assert TOK.decode(forced.input_ids) == "t<|im_end|>"


def test_truncation_counts_and_drops(tmp_path):
    exs = load(tmp_path, [{"prompt": "x" * 30, "completion": "y"}, {"text": "short"}, {"text": "z" * 40}])
    stats = {}
    rows = prepare(exs, max_length=20, stats=stats)
    assert stats["truncated"] == 2 and stats["dropped_no_targets"] == 1  # the prompt ate all 20 tokens
    assert [len(r.input_ids) for r in rows] == [6, 20]


def test_packing_is_isolated_per_document(tmp_path):
    """A packed row gives each document the same per-token losses as the document alone."""
    model = tiny_lora_model(tiny_model_folder(tmp_path / "m"))
    exs = load(tmp_path, [{"text": "hello there"}, {"text": "a second, longer document"}, {"text": "third"}])
    rows = prepare(exs, max_length=64, pack=True)
    assert len(rows) == 1 and rows[0].position_ids.count(0) == 3
    b = collate(rows, 0)
    packed = model.loss(b["input_ids"], b["labels"], position_ids=b["position_ids"], segment_ids=b["segment_ids"],
                        reduction="sum")
    alone = sum(model.loss(torch.tensor([e.input_ids]), torch.tensor([e.labels]), reduction="sum") for e in exs)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    # Without the isolation the result differs, so the test can see a leak.
    leaky = model.loss(b["input_ids"], b["labels"], reduction="sum")
    assert not torch.allclose(leaky, alone, rtol=1e-5, atol=1e-5)


def test_split_and_batcher_resume_position(tmp_path):
    exs = load(tmp_path, chat_records(20))
    train, val = split(exs, 0.25, seed=1)
    assert len(val) == 5 and len(train) == 15 and not {e.where for e in val} & {e.where for e in train}
    rows = prepare(train, 128)
    a = Batcher(rows, 4, seed=3, pad_id=0)
    seq = [a.next()["input_ids"] for _ in range(9)]  # crosses two epoch boundaries
    b = Batcher(rows, 4, seed=3, pad_id=0)
    for _ in range(5):
        b.next()
    c = Batcher(rows, 4, seed=3, pad_id=0)
    c.load_state_dict(b.state_dict())
    for want in seq[5:]:
        assert torch.equal(c.next()["input_ids"], want)


@pytest.mark.parametrize("records,fmt,match", [
    ([{"foo": 1}], "auto", r"d.jsonl:1: cannot tell the format .*pass --format"),
    ([{"instruction": "x"}], "alpaca", r"d.jsonl:1: missing field 'output' for format alpaca"),
    ([{"text": "x"}], "markdown", r"unknown data format 'markdown'"),
    ([{"text": "  "}, {"text": ""}], "auto", r"no usable example left after filtering"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "auto", r"d.jsonl:1: no assistant message"),
])
def test_bad_records(tmp_path, records, fmt, match):
    with pytest.raises(DataError, match=match):
        load(tmp_path, records, fmt)


def test_invalid_json_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "ok"}\n\n{"text": "broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON \(Unterminated string"):
        load_examples(p, TOK)


def test_chat_without_template(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl:1: the chat format needs a chat template but tokenizer 'fake-char'"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", chat_records(1)), FakeTokenizer(chat_template=None))


def test_every_example_too_long(tmp_path):
    exs = load(tmp_path, [{"text": "a" * 50}, {"text": "b" * 60}])
    with pytest.raises(DataError, match=r"every one of the 2 examples is longer than --max-length 8 \(the shortest "
                                        r"has 51 tokens\)"):
        prepare(exs, max_length=8)


def test_json_list_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert len(load_examples(p, TOK)) == 2


def test_check_report(tmp_path):
    recs = chat_records(6) + chat_records(1) + [{"messages": [{"role": "user", "content": "x"},
                                                              {"role": "assistant", "content": " "}]}]
    out = io.StringIO()
    r = check(write_jsonl(tmp_path / "d.jsonl", recs), TOK, max_length=40, file=out)
    text = out.getvalue()
    assert r["records"] == 8 and r["duplicates"] == 1 and r["empty"] == 1 and r["examples"] == 7
    assert r["truncated"] == 7  # ChatML around each record is ~50 characters
    assert "token-length histogram" in text and "[[It is 0.<|im_end|>\n]]" in text


def test_check_command_line(tmp_path, capsys):
    from lora_engine.data.check import main
    from tests.test_train_support import save_tokenizer_files

    folder = tmp_path / "tok"
    folder.mkdir()
    save_tokenizer_files(folder)
    main(["check", str(write_jsonl(tmp_path / "d.jsonl", chat_records(3))), "--model", str(folder), "--max-length", "64"])
    out = capsys.readouterr().out
    assert "records: 3" in out and "loss on [[...]]" in out
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: invalid JSON"):
        main(["check", str(tmp_path / "bad.jsonl"), "--model", str(folder)])


# ---- hostile records: DataError naming file and line, never another exception ---------------------
@pytest.mark.parametrize("line, match", [
    ('{"text": "ok \\ud800"}', r"d.jsonl:1: field 'text' holds a lone surrogate '\\ud800'"),
    ('{"messages": [{"role": 1, "content": "hi"}, {"role": "assistant", "content": "yo"}]}',
     r"d.jsonl:1: messages\[0\].role must be a string .*got int"),
    ('{"messages": [{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "yo"}]}',
     r"d.jsonl:1: messages\[0\].content must be a string, got list"),
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "d.jsonl:1: JSON nested too deeply"),
    ('{"text": ["a"]}', "d.jsonl:1: field 'text' must be a string, got list"),
])
def test_hostile_records(tmp_path, line, match):
    p = tmp_path / "d.jsonl"
    p.write_text(line + "\n", encoding="utf-8", errors="surrogatepass")
    with pytest.raises(DataError, match=match):
        load_examples(p, TOK)


def test_deep_json_list_file(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="d.json: JSON nested too deeply"):
        load_examples(p, TOK)


def test_utf8_bom_is_accepted(tmp_path):
    for name, body in (("b.jsonl", '{"text": "hello"}\n'), ("b.json", '[{"text": "hello"}]')):
        p = tmp_path / name
        p.write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert trained_text(load_examples(p, TOK)[0]).startswith("hello")


def test_non_utf8_bytes_name_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xe9"):
        load_examples(p, TOK)


def test_template_refusing_a_conversation_names_the_record(tmp_path):
    from lora_engine.models.tokenizer import load_tokenizer
    from tests.test_tokenizer import _tiny

    template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}" \
               "{% endif %}{{ m['content'] }}{% endfor %}"
    tok = load_tokenizer(_tiny(tmp_path / "tok", {"chat_template": template}))
    records = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hello"},
                             {"role": "assistant", "content": "world"}]}]
    with pytest.raises(DataError, match=r"d.jsonl:1: the chat template of .* failed: no system"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", records), tok)
