"""Assistant spans for any chat template (data/spans.py), checked against transformers' rendering and its
`return_assistant_tokens_mask`: on the templates checkpoints ship (Qwen3's, Llama 3's, Gemma's, as TRL keeps
them in trl/chat_templates/), the mask of the unmarked template equals transformers' mask of the same template
with `{% generation %}` around the assistant output; on marked templates, ours equals transformers' on the same
one. The tokenizers are built here: one token per character plus the template's special tokens, so that the
token ids of both libraries are comparable one to one."""

import json
import string
from pathlib import Path

import pytest

from lora_engine.cli import parse
from lora_engine.data import spans
from lora_engine.data.formats import DataError, Record, segments, tokenize
from lora_engine.data.prepare import DataSpec, prepare_data
from lora_engine.data.sources import read_source
from lora_engine.models.tokenizer import load_tokenizer
from lora_engine.train.config import TrainConfig
from tests.conftest import require_oracle
from tests.test_train_support import write_jsonl

QWEN = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>")
FAMILIES = {  # template file -> (special tokens, bos, eos)
    "qwen3": (QWEN, None, "<|im_end|>"),
    "llama3": (("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "<|begin_of_text|>",
               "<|eot_id|>"),
    "gemma": (("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>"),
    "phi3": (("<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|endoftext|>"), None, "<|endoftext|>"),
    "gptoss": (("<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>", "<|call|>"), None, "<|return|>"),
}

TOOL = {"type": "function", "function": {"name": "weather", "description": "Weather of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def call(city: str) -> dict:
    return {"type": "function", "function": {"name": "weather", "arguments": {"city": city}}}


def user(text):
    return {"role": "user", "content": text}


def bot(text, **kw):
    return {"role": "assistant", "content": text, **kw}


CHATS = [  # (messages, tools)
    ([user("hi"), bot("hello")], None),
    ([user("hi"), bot("hello"), user("again"), bot("bye")], None),
    ([user("same"), bot("ok"), user("same"), bot("ok"), user("same"), bot("ok")], None),  # identical replies
    ([{"role": "system", "content": "Be brief."}, user("hi"), bot("  padded  "), user("go"), bot("done")], None),
]
REASONING_CHATS = [  # Qwen3: earlier thinking stripped, the last turn's kept, an empty block where there is none
    ([user("hi"), bot("<think>hmm</think>hello"), user("again"), bot("<think>\nok\n</think>\n\nbye")], None),
    ([user("hi"), bot("<think>a</think>same"), user("hi"), bot("<think>b</think>same")], None),
    ([user("hi"), bot("hello", reasoning_content="thought"), user("more"), bot("end", reasoning_content="last")],
     None),
    ([user("hi"), bot("hello", reasoning="older field name")], None),
    ([user("Weather in Paris?"), bot("", tool_calls=[call("Paris")]), {"role": "tool", "content": "18C"},
      bot("It is 18C.")], [TOOL]),
    ([user("Paris and Rome?"), bot("<think>two calls</think>", tool_calls=[call("Paris"), call("Rome")]),
      {"role": "tool", "content": "18C"}, {"role": "tool", "content": "21C"}, bot("<think>compare</think>Rome."),
      user("thanks"), bot("welcome")], [TOOL]),
]


def trl_template(name: str) -> str:
    trl = require_oracle("trl")
    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def qwen3_marked() -> str:
    """Qwen3's template with {% generation %} around each assistant turn's output (everything after
    `<|im_start|>assistant\\n` to its `<|im_end|>\\n`), rendering the same text: the mask oracle for the
    unmarked template."""
    t = trl_template("qwen3")
    swaps = [
        ("{%- if loop.index0 > ns.last_query_index %}",
         "{{- '<|im_start|>' + message.role + '\\n' }}{%- generation %}{%- if loop.index0 > ns.last_query_index %}"),
        ("{{- '<|im_start|>' + message.role + '\\n<think>\\n' +", "{{- '<think>\\n' +"),
        ("{{- '<|im_start|>' + message.role + '\\n' + content }}", "{{- content }}"),
        ("{{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}",
         "{{- '<|im_end|>\\n' }}{%- endgeneration %}\n    {%- elif message.role == \"tool\" %}"),
    ]
    for old, new in swaps:
        assert t.count(old) == (2 if "+ content }}" in old else 1), old
        t = t.replace(old, new)
    return t


def folder(path: Path, family: str, template: str) -> Path:
    """A tokenizer folder both libraries load: one token per printable character, the family's special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    specials, bos, eos = FAMILIES[family]
    vocab = {c: i for i, c in enumerate(sorted(set(string.printable)))}
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))  # no merges, no pre-tokenizer: one token per character
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.decoder = decoders.Fuse()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"chat_template": template, "eos_token": eos, "tokenizer_class": "PreTrainedTokenizerFast"}
    if bos:
        config["bos_token"] = bos
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def ours(tok, msgs, tools=None, **kw) -> tuple[list[int], list[int]]:
    record = {"messages": msgs, **({"tools": tools} if tools else {})}
    ex = tokenize(Record(record, "chat.jsonl:1"), "chat", tok, **kw)
    return ex.input_ids, [int(label != -100) for label in ex.labels]


def theirs(tf_tok, msgs, tools=None, template=None) -> tuple[list[int], list[int]]:
    out = tf_tok.apply_chat_template(msgs, tools=tools, chat_template=template, tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    return out["input_ids"], out["assistant_masks"]


def trained(tok, ids, mask) -> str:
    return tok.decode([i for i, m in zip(ids, mask) if m])


def pair(tmp_path, family, template):
    tf = require_oracle("transformers")
    path = folder(tmp_path / family, family, template)
    return load_tokenizer(path), tf.AutoTokenizer.from_pretrained(path)


# ---- unmarked templates against transformers' mask of the marked ones --------------------------------------


@pytest.mark.parametrize("family, plain, marked", [
    ("qwen3", lambda: trl_template("qwen3"), qwen3_marked),
    ("llama3", lambda: trl_template("llama3"), lambda: trl_template("llama3_training")),
    ("gemma", lambda: trl_template("gemma"), lambda: trl_template("gemma_training")),
])
def test_unmarked_template_masks_what_transformers_masks_with_generation_markers(tmp_path, family, plain, marked):
    tok, tf_tok = pair(tmp_path, family, plain())
    marked = marked()
    chats = CHATS + (REASONING_CHATS if family == "qwen3" else [])
    if family == "gemma":  # no system role
        chats = [c for c in chats if c[0][0]["role"] != "system"]
    for msgs, tools in chats:
        text = tf_tok.apply_chat_template(msgs, tools=tools, tokenize=False)
        assert tf_tok.apply_chat_template(msgs, tools=tools, chat_template=marked, tokenize=False) == text
        assert tok.apply_chat_template(spans.alias_reasoning(msgs), tools=tools) == text  # the same rendering
        ids, mask = ours(tok, msgs, tools)
        want_ids, want_mask = theirs(tf_tok, msgs, tools, marked)
        assert ids == want_ids
        assert mask == want_mask, (trained(tok, ids, mask), trained(tok, want_ids, want_mask))
        assert sum(mask) > 0


def test_qwen3_keeps_the_last_turns_thinking_and_trains_what_the_rendering_shows(tmp_path):
    tok, _ = pair(tmp_path, "qwen3", trl_template("qwen3"))
    msgs, _ = REASONING_CHATS[0]
    ids, mask = ours(tok, msgs)
    assert trained(tok, ids, mask) == "hello<|im_end|>\n<think>\nok\n</think>\n\nbye<|im_end|>\n"
    assert "hmm" not in tok.decode(ids)  # the template drops an earlier turn's thinking: neither input nor target
    # The old rule alone (prefix renderings) cannot place the first turn: the template renders it with a
    # think block while it is the last turn.
    full = tok.apply_chat_template(msgs)
    assert spans._prefix_span(lambda m, g: tok.apply_chat_template(m, add_generation_prompt=g), msgs, 1, full,
                              tok.eos_token, 0) is None
    # repeated identical replies each get their own span
    msgs, _ = REASONING_CHATS[1]
    ids, mask = ours(tok, msgs)
    assert trained(tok, ids, mask) == "same<|im_end|>\n<think>\nb\n</think>\n\nsame<|im_end|>\n"


def test_qwen3_tool_calls_are_trained_and_tool_results_are_not(tmp_path):
    tok, _ = pair(tmp_path, "qwen3", trl_template("qwen3"))
    msgs, tools = REASONING_CHATS[4]
    ids, mask = ours(tok, msgs, tools)
    assert trained(tok, ids, mask) == ('<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
                                       '</tool_call><|im_end|>\n<think>\n\n</think>\n\nIt is 18C.<|im_end|>\n')
    assert "18C\n</tool_response>" in tok.decode(ids) and "# Tools" in tok.decode(ids)


def test_sharegpt_function_calls_through_qwen3_are_trained_and_observations_are_not(tmp_path):
    tok, _ = pair(tmp_path, "qwen3", trl_template("qwen3"))
    share = {"tools": json.dumps([TOOL]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18C"}, {"from": "gpt", "value": "It is 18C."}]}
    (record,) = read_source(write_jsonl(tmp_path / "s.jsonl", [share]))
    ex = tokenize(record, "chat", tok)
    assert (ex.input_ids, [int(t != -100) for t in ex.labels]) == ours(tok, *REASONING_CHATS[4])


# ---- the empty think block ----------------------------------------------------------------------------------


def test_mask_empty_think_keeps_the_empty_block_out_of_the_loss_and_real_thinking_in(tmp_path):
    tok, _ = pair(tmp_path, "qwen3", trl_template("qwen3"))
    msgs = [user("hi"), bot("<think>hmm</think>hello"), user("again"), bot("bye")]
    ids, mask = ours(tok, msgs)
    assert trained(tok, ids, mask) == "hello<|im_end|>\n<think>\n\n</think>\n\nbye<|im_end|>\n"  # default: as TRL
    ids2, mask2 = ours(tok, msgs, mask_empty_think=True)
    assert ids2 == ids  # the same text: only the loss changes
    assert trained(tok, ids2, mask2) == "hello<|im_end|>\nbye<|im_end|>\n"
    ids3, mask3 = ours(tok, REASONING_CHATS[0][0], mask_empty_think=True)  # thinking present: trained
    assert trained(tok, ids3, mask3) == "hello<|im_end|>\n<think>\nok\n</think>\n\nbye<|im_end|>\n"
    # without completion_only, everything but the empty block
    ids4, mask4 = ours(tok, msgs, completion_only=False, mask_empty_think=True)
    assert tok.decode([i for i, m in zip(ids4, mask4) if not m]) == "<think>\n\n</think>\n\n"


def test_qwen3_5_whose_prompt_opens_the_think_block_trains_what_follows_it(tmp_path):
    # Qwen3.5's generation prompt ends in `<think>\n` (thinking on): the turn the model writes starts inside it.
    tok, tf_tok = pair(tmp_path, "qwen3", trl_template("qwen3_5_think"))
    msgs = [user("hi"), bot("<think>hmm</think>hello"), user("again"), bot("bye")]
    assert tok.apply_chat_template(msgs) == tf_tok.apply_chat_template(msgs, tokenize=False)
    assert tok.apply_chat_template(msgs[:3], add_generation_prompt=True).endswith("assistant\n<think>\n")
    ids, mask = ours(tok, msgs)
    assert trained(tok, ids, mask) == "hello<|im_end|>\n\n</think>\n\nbye<|im_end|>\n"
    ids, mask = ours(tok, msgs, mask_empty_think=True)
    assert trained(tok, ids, mask) == "hello<|im_end|>\nbye<|im_end|>\n"
    ids, mask = ours(tok, [*msgs[:3], bot("<think>ok</think>bye")], mask_empty_think=True)
    assert trained(tok, ids, mask) == "hello<|im_end|>\nok\n</think>\n\nbye<|im_end|>\n"


def test_nemotron_whose_prompt_and_history_render_the_think_block_differently(tmp_path):
    # Nemotron 3's prompt opens `<think>\n`, earlier turns show `<think></think>`, and a tool-call turn's thinking
    # is shown only until a user turn follows: the conversation before the fourth message is no prefix of the
    # whole, so the turn starts where the prompt's header, as far as the whole shows it, follows the tool result.
    tok, tf_tok = pair(tmp_path, "qwen3", trl_template("nemotron_3_nano"))
    msgs, tools = REASONING_CHATS[5]
    full = tok.apply_chat_template(msgs, tools=tools)
    assert full == tf_tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    assert not full.startswith(tok.apply_chat_template(msgs[:4], tools=tools))
    ids, mask = ours(tok, msgs, tools, mask_empty_think=True)
    assert trained(tok, ids, mask) == (
        "<tool_call>\n<function=weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=weather>\n<parameter=city>\nRome\n</parameter>\n</function>\n</tool_call>\n"
        "<|im_end|>\nRome.<|im_end|>\nwelcome<|im_end|>\n")


def test_gpt_oss_turns_tool_calls_and_final_return(tmp_path):
    # gpt-oss ends the last turn with <|return|> (its EOS) and earlier ones with <|end|>: the closing an earlier
    # turn has only there is not trained, the model learns to stop from the last turn. Only the first tool call
    # of a message is shown, and the tool's name is written again with its result.
    tok, tf_tok = pair(tmp_path, "gptoss", trl_template("gptoss"))
    msgs = [user("hi"), bot("hello"), user("Paris and Rome?"), bot("", tool_calls=[call("Paris"), call("Rome")]),
            {"role": "tool", "content": "18C"}, bot("Rome.", thinking="compare")]
    assert tok.apply_chat_template(msgs, tools=[TOOL]) == tf_tok.apply_chat_template(msgs, tools=[TOOL],
                                                                                      tokenize=False)
    ids, mask = ours(tok, msgs, [TOOL])
    assert trained(tok, ids, mask) == (
        "<|channel|>final<|message|>hello"
        ' to=functions.weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
        "<|channel|>analysis<|message|>compare<|end|><|start|>assistant<|channel|>final<|message|>Rome.<|return|>")


def test_mask_empty_think_is_a_train_flag_that_reaches_the_rows(tmp_path):
    assert parse(TrainConfig, ["--mask-empty-think"])[0].mask_empty_think
    assert not parse(TrainConfig, [])[0].mask_empty_think  # default: trained, as transformers' and TRL's masks
    tok, _ = pair(tmp_path, "qwen3", trl_template("qwen3"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user(f"q{i}"), bot(f"a{i}")]} for i in range(4)])
    cfg = TrainConfig(data=str(data), mask_empty_think=True, val_split=0.5)
    assert DataSpec.of(cfg).mask_empty_think and not DataSpec.of(TrainConfig()).mask_empty_think
    for flag, want in ((True, ""), (False, "<think>\n\n</think>\n\n")):
        rows = prepare_data(DataSpec(data=str(data), mask_empty_think=flag, val_split=0.5), tok).train
        text = tok.decode([t for t in rows[0].labels if t != -100])
        assert text.startswith(want + "a") and text.endswith("<|im_end|>\n")


# ---- templates with {% generation %}: transformers' rule on the same template --------------------------------


@pytest.mark.parametrize("family, name", [("qwen3", "qwen3_training"), ("llama3", "llama3_training"),
                                          ("gemma", "gemma_training"), ("phi3", "phi3_training")])
def test_marked_template_gives_transformers_mask(tmp_path, family, name):
    tok, tf_tok = pair(tmp_path, family, trl_template(name))
    chats = CHATS + (REASONING_CHATS if family == "qwen3" else [])
    if family == "gemma":
        chats = [c for c in chats if c[0][0]["role"] != "system"]
    for msgs, tools in chats:
        ids, mask = ours(tok, msgs, tools)
        assert (ids, mask) == theirs(tf_tok, msgs, tools)
        assert sum(mask) > 0


def test_nested_and_adjacent_generation_blocks_give_transformers_mask(tmp_path):
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}"
                "{% generation %}{{ m.content }}{% endgeneration %}<|im_end|>{% endgeneration %}{% generation %}"
                "{{ '\\n' }}{% endgeneration %}{% else %}{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}")
    tok, tf_tok = pair(tmp_path, "qwen3", template)
    msgs = CHATS[1][0]
    ids, mask = ours(tok, msgs)
    assert (ids, mask) == theirs(tf_tok, msgs)
    assert trained(tok, ids, mask) == "hello<|im_end|>\nbye<|im_end|>\n"


def test_marked_template_with_mask_empty_think(tmp_path):
    tok, tf_tok = pair(tmp_path, "qwen3", trl_template("qwen3_training"))  # writes a think block in every turn
    msgs = [user("hi"), bot("hello"), user("again"), bot("<think>ok</think>bye")]
    ids, mask = ours(tok, msgs, mask_empty_think=True)
    assert ids == theirs(tf_tok, msgs)[0]
    assert trained(tok, ids, mask) == "hello<|im_end|>\n<think>\nok\n</think>\n\nbye<|im_end|>\n"


def test_generation_markers_render_as_transformers_renders_them_and_are_tracked_only_when_asked(tmp_path):
    tok, tf_tok = pair(tmp_path, "llama3", trl_template("llama3_training"))
    msgs = CHATS[1][0]
    for gen in (False, True):
        assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == \
            tf_tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
    found: list = []
    text = tok.apply_chat_template(msgs, generation_spans=found)
    assert [text[s:e] for s, e in found] == ["hello<|eot_id|>", "bye<|eot_id|>"]


# ---- rule 3 agrees with rule 2 where both hold ----------------------------------------------------------------


@pytest.mark.parametrize("family, name", [("llama3", "llama3"), ("gemma", "gemma"), ("phi3", "phi3"),
                                          ("qwen3", "qwen2_5")])
def test_sentinels_find_the_spans_prefixes_find(tmp_path, family, name):
    tok, _ = pair(tmp_path, family, trl_template(name))
    chats = CHATS + ([REASONING_CHATS[4]] if name == "qwen2_5" else [])
    if family == "gemma":
        chats = [c for c in chats if c[0][0]["role"] != "system"]
    for msgs, tools in chats:
        def render(m, gen, tools=tools):
            return tok.apply_chat_template(m, add_generation_prompt=gen, tools=tools)

        full, done = render(msgs, False), 0
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                want = spans._prefix_span(render, msgs, i, full, tok.eos_token, done)
                assert want is not None and spans._sentinel_span(render, msgs, i, full, tok.eos_token, done) == want
                done = want[1]


# ---- errors a user can cause ---------------------------------------------------------------------------------


def _tok(tmp_path, template):
    return load_tokenizer(folder(tmp_path / "t", "qwen3", template))


@pytest.mark.parametrize("template, match", [
    ("{% for m in messages %}{% if m.role != 'assistant' %}<|im_start|>{{ m.content }}<|im_end|>{% endif %}"
     "{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}",
     r"chat.jsonl:1: the chat template renders none of the assistant messages"),
    ("{% for m in messages %}{% if m.role == 'tool' %}{% generation %}{{ m.content }}{% endgeneration %}"
     "{% else %}{{ m.content }}{% endif %}{% endfor %}",
     r"chat.jsonl:1: the chat template has \{% generation %\} markers but marks no assistant output"),
    ("{% macro turn(m) %}{% generation %}{{ m.content }}{% endgeneration %}{% endmacro %}"
     "{% for m in messages %}{{ '<' + m.role + '>' + turn(m) }}{% endfor %}",
     r"chat.jsonl:1: the chat template of .* has a \{% generation %\} block whose text is not written where it "
     r"is made \(inside a macro"),
    # a turn that renders differently with what comes after it: the length of the whole conversation at its end
    ("{% for m in messages %}<|im_start|>{{ m.content }}{% if m.role == 'assistant' %}"
     "[{{ messages | map(attribute='content') | join | length }}]{% endif %}<|im_end|>{% endfor %}"
     "{% if add_generation_prompt %}<|im_start|>{% endif %}",
     r"chat.jsonl:1: the chat template renders messages\[1\] \(an assistant turn\) so that its place .* cannot be "
     r"found .*--no-completion-only"),
])
def test_templates_that_hide_the_assistant_turns_are_one_data_error(tmp_path, template, match):
    tok = _tok(tmp_path, template)
    msgs = [user("hi"), bot("hello"), user("again"), bot("bye")]
    with pytest.raises(DataError, match=match) as info:
        ours(tok, msgs)
    assert "\n" not in str(info.value)


def test_no_completion_only_trains_a_template_whose_turns_cannot_be_found(tmp_path):
    tok = _tok(tmp_path, "{% for m in messages %}<|im_start|>{{ m.content }}{% if m.role == 'assistant' %}"
                         "[{{ messages | map(attribute='content') | join | length }}]{% endif %}<|im_end|>"
                         "{% endfor %}")
    ids, mask = ours(tok, [user("hi"), bot("hello"), user("again"), bot("bye")], completion_only=False)
    assert all(mask) and tok.decode(ids) == "<|im_start|>hi<|im_end|><|im_start|>hello[15]<|im_end|>" \
                                            "<|im_start|>again<|im_end|><|im_start|>bye[15]<|im_end|>"


def test_a_template_that_drops_an_assistant_turn_trains_the_others(tmp_path):
    # Only the last assistant turn is shown (as some templates do with history): nothing to train on the other.
    tok = _tok(tmp_path, "{% for m in messages %}{% if m.role != 'assistant' or loop.last %}<|im_start|>"
                         "{{ m.role }}\n{{ m.content }}<|im_end|>{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    msgs = [user("hi"), bot("hello"), user("again"), bot("bye")]
    ids, mask = ours(tok, msgs)
    assert trained(tok, ids, mask) == "bye<|im_end|>"
    assert [s for s, on in segments(Record({"messages": msgs}, "x"), "chat", tok) if on] == ["bye<|im_end|>"]


def test_data_check_counts_targets_as_training_would_with_mask_empty_think(tmp_path, capsys):
    from lora_engine.data.check import main as check_main

    folder(tmp_path / "qwen3", "qwen3", trl_template("qwen3"))
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [user("hi"), bot("hello"), user("again"), bot("bye")]}])
    counts = []
    for extra in ([], ["--mask-empty-think"]):
        assert check_main(["check", str(data), "--model", str(tmp_path / "qwen3"), *extra]) == 0
        counts.append(int(capsys.readouterr().out.split("target tokens ")[1].split()[0]))
    block = load_tokenizer(tmp_path / "qwen3").encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert counts[0] - counts[1] == len(block) > 0  # the last turn's empty block (Qwen3 drops earlier ones)
