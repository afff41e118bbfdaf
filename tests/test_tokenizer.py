"""The tokenizer: parity with transformers' tokenizer built from the same GGUF file, the documented
digit-split difference, chat templates (sandboxed), special-token ids and every error path."""

import json
import unicodedata

import pytest

from lora_engine.models.tokenizer import Tokenizer, load_tokenizer
from tests import embedded_fixture

embedded_home = embedded_fixture.embedded_home
embedded_gguf = embedded_fixture.embedded_gguf
embedded_dir = embedded_fixture.embedded_dir

# Inputs on which llama.cpp's smollm pre-tokenizer and transformers' GGUF converter agree.
SAMPLE = [
    "Hello, world!",
    "Grüße aus Köln — naïve café, déjà vu",
    "你好，世界。日本語のテキスト。한국어 텍스트. مرحبا بالعالم. नमस्ते दुनिया",
    "I ❤️ 🦙 and 👩‍👩‍👧‍👦! 🎉🎉",
    "def f(x):\n\treturn x ** 2  # square\n\nclass A:\n    pass\n",
    "a  b   c\n\n\n  d\t\t e   ",
    "   leading spaces",
    "trailing spaces   ",
    "\r\nwindows\r\nlines\r\n",
    "I'm sure you'll see we've done it, they'd say it's fine.",
    "!!!??? ... --- ((())) {}[]<>",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<repo_name>name<file_sep>",
    "version 3 of the API",
    "",
    " ",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Grüße! What's 2+2? 🤔"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And  in   code?\n```py\nprint(2 + 2)\n```"},
]


@pytest.fixture(scope="module")
def ours(embedded_dir):
    return load_tokenizer(embedded_dir)


@pytest.fixture(scope="module")
def theirs(embedded_gguf):
    """transformers' tokenizer, built by its own GGUF converter from the same file."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(embedded_gguf.parent), gguf_file=embedded_gguf.name)


def test_encode_decode_match_transformers(ours, theirs):
    for text in SAMPLE:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == theirs.encode(text, add_special_tokens=True), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), text
        if "<|" not in text and "<repo" not in text:
            assert ours.decode(ids) == text  # byte-level BPE is lossless


def test_chat_template_matches_transformers(ours, theirs):
    for gen in (False, True):
        for chat in (CHAT, CHAT[1:2]):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")


def _llama_cpp_smollm_split(text: str) -> list[str]:
    """llama.cpp's smollm pre-tokenizer, first stage: every \\p{N} character is a piece of its own."""
    pieces, cur = [], ""
    for ch in text:
        if unicodedata.category(ch).startswith("N"):
            pieces += [cur, ch] if cur else [ch]
            cur = ""
        else:
            cur += ch
    return pieces + ([cur] if cur else [])


@pytest.mark.parametrize("text", [" 12 34  56", "٣٤٥ and ١٢", "year  2024, pi 3.14159", "x²+y³ ½ Ⅻ"])
def test_digits_follow_llama_cpp_smollm_pretokenizer(ours, theirs, text):
    """Documented difference: transformers' GGUF converter drops llama.cpp's digit split (docs/embedded_model.md).

    We follow tokenizer.ggml.pre = smollm, i.e. the model's training: the text is cut before and after
    every number character, then each piece gets the GPT-2 byte-level split and BPE (which is what
    transformers' tokenizer does to a piece without digits runs)."""
    expected = [i for piece in _llama_cpp_smollm_split(text) for i in theirs.encode(piece, add_special_tokens=False)]
    got = ours.encode(text)
    assert got == expected
    for i in got:  # no token glues a number character to anything else
        piece = ours.decode([i])
        if any(unicodedata.category(c).startswith("N") for c in piece):
            assert len(piece) == 1 or "\ufffd" in piece, (text, piece)
    assert ours.decode(got) == text


def test_digit_split_differs_from_transformers_where_whitespace_precedes_digits(ours, theirs):
    # If this starts failing, transformers adopted llama.cpp's split: move the input to SAMPLE.
    assert ours.encode(" 12 34  56") != theirs.encode(" 12 34  56", add_special_tokens=False)


def test_special_tokens_and_attributes(ours):
    assert ours.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert ours.decode([1, 9906, 2], skip_special_tokens=True) == ours.decode([9906])
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.eos_token_ids) == (1, 2, 2, [2])
    assert ours.vocab_size == len(ours) == 49152
    assert "<|im_start|>" in ours.chat_template
    assert ours.name_or_path == str(ours.folder)


# ---- small synthetic folders: config handling and errors ------------------------------------------


def _tiny(folder, config=None, generation=None, special_map=None, template_file=None):
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "<eot>": 4, "hello": 5, "world": 6}
    tok = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<s>", "</s>", "<pad>", "<eot>")])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    for name, data in (("tokenizer_config.json", config), ("generation_config.json", generation),
                       ("special_tokens_map.json", special_map)):
        if data is not None:
            (folder / name).write_text(json.dumps(data))
    if template_file is not None:
        (folder / "chat_template.jinja").write_text(template_file)
    return folder


def test_eos_ids_merge_generation_config_and_pad_falls_back_to_eos(tmp_path):
    tok = load_tokenizer(_tiny(tmp_path, {"eos_token": {"content": "</s>"}}, {"eos_token_id": [2, 4, 2]}))
    assert (tok.eos_token_id, tok.eos_token_ids, tok.pad_token_id, tok.bos_token_id) == (2, [2, 4], 2, None)
    tok = load_tokenizer(_tiny(tmp_path / "b", {}, {"bos_token_id": 1, "eos_token_id": 4}, {"pad_token": "<pad>"}))
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids, tok.pad_token_id) == (1, 4, [4], 3)
    assert tok.chat_template is None


def test_named_templates_and_template_file(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]
    assert load_tokenizer(_tiny(tmp_path / "a", {"chat_template": named})).apply_chat_template([{}]) == "D1"
    with pytest.raises(ValueError, match=r"lists templates \['x'\] but none is named 'default'"):
        load_tokenizer(_tiny(tmp_path / "b", {"chat_template": [{"name": "x", "template": "X"}]}))
    tok = load_tokenizer(_tiny(tmp_path / "c", {}, template_file="{{ bos_token }}F"))
    assert tok.apply_chat_template([]) == "F"


def test_template_sees_what_transformers_provides(tmp_path):
    template = ("{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n"
                "{% endfor %}\n{% if add_generation_prompt %}{{ {'a': '<b>&'}|tojson }}{% endif %}")
    tok = load_tokenizer(_tiny(tmp_path, {"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"}))
    msgs = [{"role": "user", "content": "hello"}]
    assert tok.apply_chat_template(msgs) == "<s>user: hello</s>\n"  # trim_blocks drops the newline after tags
    assert tok.apply_chat_template(msgs, add_generation_prompt=True).endswith('{"a": "<b>&"}')


def test_no_chat_template_raises(tmp_path):
    tok = load_tokenizer(_tiny(tmp_path, {}))
    with pytest.raises(ValueError, match="has no chat template; pass a text-format dataset or a tokenizer with one"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template, match", [
    ("{{ ''.__class__.__mro__ }}", "unsafe"),
    ("{% set x = messages.append(1) %}", "unsafe"),
    ("{{ raise_exception('only user and assistant roles') }}", "failed: only user and assistant roles"),
    ("{% for m in messages %}", r"not valid Jinja \(line 1\)"),
])
def test_template_errors_and_sandbox(tmp_path, template, match):
    tok = load_tokenizer(_tiny(tmp_path, {"chat_template": template}))
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bad_arguments(tmp_path):
    tok = load_tokenizer(_tiny(tmp_path, {"chat_template": "x"}))
    with pytest.raises(TypeError, match="list of dicts"):
        tok.apply_chat_template("hi")
    with pytest.raises(TypeError, match="only JSON data"):
        tok.apply_chat_template([{"role": "user", "content": object()}])
    with pytest.raises(TypeError, match="encode expects a str, got list"):
        tok.encode(["hello"])


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder .*nowhere.* does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no tokenizer\.json"):
        load_tokenizer(tmp_path / "empty")
    bad = _tiny(tmp_path / "bad")
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json is not a valid tokenizer\.json"):
        Tokenizer(bad)
    cfg = _tiny(tmp_path / "cfg")
    (cfg / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(cfg)


def test_save_copies_the_files(tmp_path):
    src = load_tokenizer(_tiny(tmp_path / "src", {"chat_template": "C", "eos_token": "</s>"}, {"eos_token_id": 4},
                               template_file="unused: tokenizer_config.json wins"))
    out = src.save(tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]
    copy = load_tokenizer(out)
    assert copy.encode("hello <eot> world") == src.encode("hello <eot> world") == [5, 4, 6]
    assert copy.apply_chat_template([]) == "C" and copy.eos_token_id == 2


# ---- byte_level_bpe: the builder the GGUF converter uses ------------------------------------------


def test_byte_level_bpe_token_types_and_post_processor():
    from lora_engine.sources.bpe import byte_alphabet, byte_level_bpe

    chars = [byte_alphabet()[b] for b in range(256)]
    tokens = chars + ["<eos>", "<think>", "<bad control>"]  # the last holds a raw space: not byte-spelled
    types = [1] * 256 + [3, 4, 3]
    tok = byte_level_bpe(tokens, [], types, "gpt-2", bos_id=256, eos_id=256, add_eos=True)
    assert tok.encode("a<think>b<eos>", add_special_tokens=False).ids == [ord("a"), 257, ord("b"), 256]
    assert tok.encode("a").ids == [ord("a"), 256]  # add_eos
    assert tok.decode([ord("a"), 256, 257], skip_special_tokens=True) == "a<think>"  # user-defined stays
    assert 258 not in tok.encode("<bad control>").ids  # mislabelled control token: not matched whole


@pytest.mark.parametrize("kw, match", [
    ({"merges": ["a b c"]}, "merge 0 'a b c' is not two tokens"),
    ({"token_types": [1]}, "2 tokens but 1 token types"),
    ({"bos_id": 5}, "bos token id 5 is outside the vocabulary of 2 tokens"),
    ({"pre_tokenizer": "llama3"}, "pre-tokenizer 'llama3' is not supported"),
])
def test_byte_level_bpe_errors(kw, match):
    from lora_engine.sources.bpe import byte_level_bpe

    args = {"tokens": ["a", "b"], "merges": [], **kw}
    with pytest.raises(ValueError, match=match):
        byte_level_bpe(**args)


@pytest.mark.parametrize("template, match", [
    ("{{ 'a' * 10**11 }}", r"the operator \* would make a value of up to 100000000000 characters"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     "the operator ~ makes a value of over"),
    ("{{ 'a'|center(10**11) }}", "the filter center is given 100000000000"),
    ("{{ '{:>99999999999}'.format(1) }}", "calling format is given a format with a width over the limit"),
    ("{{ (['a' * 100000] * 50)|join('x' * 1000) }}", "the filter join would make a value of up to"),
    ("{{ 7 ** 100000 }}", r"the operator \*\* would make an integer of over"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "maximum recursion depth"),
    ("{{ messages[0]['role'] + 1 }}", "can only concatenate str"),
])
def test_templates_render_under_limits(tmp_path, template, match):
    from lora_engine.io.safetensors import CheckpointError
    from lora_engine.models.chat_template import ChatTemplateError

    tok = load_tokenizer(_tiny(tmp_path, {"chat_template": template}))
    with pytest.raises(ChatTemplateError, match=match) as info:
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert isinstance(info.value, CheckpointError)  # the type the commands report as `error:` with exit 2


# A template written for this test with what real ones use (Llama 3's header loop, Qwen3's reversed scan for the
# last user query with a namespace, tool-call loops, tojson, macros with caller, loop controls, recursive loops):
# every loop now iterates through the sandbox's clock check, and must render exactly what transformers renders.
RICH_TEMPLATE = """{%- macro block(role) -%}<|start|>{{ role }}\n{{ caller() }}<|end|>\n{%- endmacro -%}
{%- set ns = namespace(last_query=messages|length - 1, seen=0) -%}
{%- for m in messages[::-1] -%}
  {%- set index = (messages|length - 1) - loop.index0 -%}
  {%- if m.role == 'user' and m.content is string and not m.content.startswith('<tool_response>') -%}
    {%- set ns.last_query = index -%}{%- break -%}
  {%- endif -%}
{%- endfor -%}
{%- for m in messages if m.role != 'ignored' -%}
  {%- if m.role == 'system' and not loop.first -%}{{ raise_exception('system must come first') }}{%- endif -%}
  {%- call block(m.role) -%}
    {%- if m.content is string -%}{{ m.content|trim }}{%- endif -%}
    {%- for call in m.tool_calls|default([]) -%}
      {%- if call.function is defined -%}{%- set call = call.function -%}{%- endif -%}
      <tool_call>{{ {'name': call.name, 'arguments': call.arguments}|tojson }}</tool_call>{{ '' if loop.last else ',' }}
    {%- else -%}
      {%- if m.role == 'assistant' and loop.index0 > ns.last_query -%}(after the query){%- endif -%}
    {%- endfor -%}
  {%- endcall -%}
  {%- set ns.seen = ns.seen + 1 -%}
  {%- if loop.index is divisibleby 2 -%}{%- continue -%}{%- endif -%}#{{ loop.index }}/{{ loop.length }}
{%- endfor -%}
{%- for item in [1, [2, [3, 4]], 5] recursive -%}
  {%- if item is iterable -%}[{{ loop(item) }}]{%- else -%}{{ item }}{%- endif -%}
{%- endfor -%}
{{ ns.seen }}{%- if add_generation_prompt %}<|start|>assistant
{% endif -%}"""
RICH_CHATS = [
    CHAT,
    [{"role": "user", "content": "What is the weather?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris", "unit": "°C"}}},
         {"name": "time", "arguments": {}}]},
     {"role": "user", "content": "<tool_response>18</tool_response>"},
     {"role": "assistant", "content": " It is 18 degrees. "}],
    [{"role": "user", "content": "hi"}, {"role": "ignored", "content": "x"}, {"role": "assistant", "content": "yo"}],
]


def test_loops_macros_and_tool_calls_render_as_transformers_renders_them(tmp_path):
    from transformers.utils.chat_template_utils import render_jinja_template

    tok = load_tokenizer(_tiny(tmp_path, {"chat_template": RICH_TEMPLATE}))
    for chat in RICH_CHATS:
        for gen in (False, True):
            theirs = render_jinja_template([chat], chat_template=RICH_TEMPLATE, add_generation_prompt=gen,
                                           bos_token="", eos_token="", pad_token="", unk_token="")[0][0]
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == theirs
    rendered = tok.apply_chat_template(RICH_CHATS[1])
    assert '<tool_call>{"name": "weather", "arguments": {"city": "Paris", "unit": "°C"}}</tool_call>,' in rendered
    assert rendered.endswith("[2[34]]54")  # the recursive loop, then the namespace counter
    with pytest.raises(ValueError, match="system must come first"):
        tok.apply_chat_template([CHAT[1], CHAT[0]])


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",  # nothing but iterating
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    "{% set l = range(100000)|list %}{% for x in l %}{% for y in l %}{% endfor %}{% endfor %}",
    "{% for x in [range(100000)] * 100000 recursive %}{% if x is iterable %}{{ loop(x) }}{% endif %}{% endfor %}",
    "{% macro f() %}{% for i in range(100000) %}{% endfor %}{% endmacro %}{% for k in range(100000) %}{{ f() }}"
    "{% endfor %}",
    "{% for i in range(100000) %}{{ 'ab'|replace('a', 'b') }}{{ messages[0].role }}{% endfor %}" * 1000,
])
def test_a_render_that_runs_too_long_is_stopped(tmp_path, template):
    """Each step is within every size limit, but there are 10^10 of them: the render's clock stops it."""
    import time

    from lora_engine.models.chat_template import MAX_SECONDS, ChatTemplateError

    tok = load_tokenizer(_tiny(tmp_path, {"chat_template": template}))
    tok._template()  # compiled first (seconds for the 1000-fold template on a busy machine): only the render is timed
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=rf"the chat template of .* failed: rendering takes over "
                                                rf"{MAX_SECONDS:g} s \(a loop too long, or loops inside loops\)"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < MAX_SECONDS + 2  # the clock is checked at every step, not only between loops


def test_each_render_has_its_own_clock():
    from lora_engine.models.chat_template import ChatTemplateError, compile_template, render

    template = compile_template("{% for i in range(n) %}{% for j in range(n) %}{% endfor %}{% endfor %}ok", "t")
    with pytest.raises(ChatTemplateError, match="rendering takes over"):
        render(template, "t", n=100000)
    assert [render(template, "t", n=300) for _ in range(3)] == ["ok"] * 3  # no deadline left over from the first


def test_sandbox_refusals_are_engine_errors(tmp_path):
    from lora_engine.models.chat_template import ChatTemplateError

    for i, template in enumerate(["{{ ''.__class__.__mro__ }}", "{% for %}", "{{ x.y.z }}", "{{ 1 / 0 }}"]):
        tok = load_tokenizer(_tiny(tmp_path / str(i), {"chat_template": template}))
        with pytest.raises(ChatTemplateError, match="the chat template of"):
            tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="chat_template must be a string"):
        load_tokenizer(_tiny(tmp_path / "n", {"chat_template": 5}))
