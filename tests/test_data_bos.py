"""BOS and EOS of training examples, against transformers.

The rule: a text, alpaca or prompt/completion example starts exactly as transformers'
`AutoTokenizer.from_pretrained(folder)(text)["input_ids"]` starts (Llama's BOS, nothing for SmolLM2)
and ends with one EOS; a chat example is what transformers' apply_chat_template(tokenize=True)
makes, so a template that writes the BOS itself gets exactly one. Checked on small Llama-style
tokenizer folders built here (a WordLevel model with the post-processor of each family) and on
the embedded SmolLM2.
"""

import json
import warnings

import pytest
from tokenizers import AddedToken, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from lora_engine.data.formats import Record, detect_format, segments
from lora_engine.data.pipeline import examples_from_records
from lora_engine.models.tokenizer import load_tokenizer
from tests import embedded_fixture

embedded_home = embedded_fixture.embedded_home
embedded_gguf = embedded_fixture.embedded_gguf
embedded_dir = embedded_fixture.embedded_dir

WORDS = ["<unk>", "<s>", "</s>", "<|start|>", "<|end|>", "hello", "world", "hi", "there", "user", "assistant",
         "system", "Below", "is", "an", "instruction", "###", "Response", ":", "Add", "1", "2", "."]
SPECIAL = ["<unk>", "<s>", "</s>", "<|start|>", "<|end|>"]
BOS, EOS = 1, 2
BOS_FIRST = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", BOS)])
# (post-processor of tokenizer.json, extra tokenizer_config.json entries, ids added before, after)
FAMILIES = {
    # Llama-3: tokenizer.json alone adds <|begin_of_text|>, after a ByteLevel offsets step.
    "llama3": (processors.Sequence([processors.ByteLevel(trim_offsets=False), BOS_FIRST]), {}, [BOS], []),
    # Llama-2 and Mistral: the template and add_bos_token agree.
    "llama2": (BOS_FIRST, {"add_bos_token": True, "add_eos_token": False}, [BOS], []),
    "bos_and_eos": (processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1",
                                                  special_tokens=[("<s>", BOS), ("</s>", EOS)]),
                    {"add_bos_token": True, "add_eos_token": True}, [BOS], [EOS]),
    "roberta": (processors.RobertaProcessing(("</s>", EOS), ("<s>", BOS)), {}, [BOS], [EOS]),
    "none": (None, {}, [], []),  # SmolLM2, Qwen: nothing added
}
TEXTS = ["hello world", "hi there .", "hello", ""]
BOS_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }} {{ m['content'] }}<|end|>"
                "{% endfor %}{% if add_generation_prompt %}<|start|>assistant {% endif %}")
CHAT = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]


def llama_style_folder(folder, post, config=None):
    """tokenizer.json (WordLevel over WORDS, whitespace pre-tokenizer, `post`) + tokenizer_config.json."""
    tok = Backend(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    if post is not None:
        tok.post_processor = post
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "chat_template": BOS_TEMPLATE, **(config or {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


def both(folder):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a consistent folder loads without our mismatch warning
        ours = load_tokenizer(folder)
    return ours, transformers.AutoTokenizer.from_pretrained(str(folder))


def records():
    return [Record({"text": "hello world"}, "r:1"),
            Record({"instruction": "Add 1", "output": "2"}, "r:2"),
            Record({"prompt": "hi there", "completion": "hello world ."}, "r:3")]


def check_examples_start_like_transformers(ours, theirs):
    """Each text-like example = transformers' ids of its first segment (without what it adds at the
    end) + the other segments' plain ids + one EOS; the added prefix is never a target."""
    suffix = len(ours.suffix_ids)
    exs = examples_from_records(records(), ours)
    for rec, ex in zip(records(), exs):
        (first, _), *rest = segments(rec, detect_format(rec), ours)
        head = theirs(first)["input_ids"]
        expected = head[: len(head) - suffix]
        for text, _ in rest:
            expected += theirs(text, add_special_tokens=False)["input_ids"]
        assert ex.input_ids == expected + [ours.eos_token_id], rec.where
        assert ex.input_ids[-2] != ours.eos_token_id  # EOS once, even where the tokenizer adds one itself
        assert ex.labels[: len(ours.prefix_ids)] == [-100] * len(ours.prefix_ids)
        assert ex.labels[-1] == ours.eos_token_id


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_added_tokens_match_transformers(tmp_path, family):
    post, config, before, after = FAMILIES[family]
    ours, theirs = both(llama_style_folder(tmp_path, post, config))
    assert (ours.prefix_ids, ours.suffix_ids) == (before, after)
    assert (ours.add_bos_token, ours.add_eos_token) == (before == [BOS], after == [EOS])
    for text in TEXTS:
        plain = theirs(text, add_special_tokens=False)["input_ids"]
        assert theirs(text)["input_ids"] == before + plain + after, text  # transformers agrees with the table
        assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"], text
        assert ours.encode(text) == plain, text


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_examples_start_as_transformers_tokenizes(tmp_path, family):
    post, config, before, _ = FAMILIES[family]
    ours, theirs = both(llama_style_folder(tmp_path, post, config))
    check_examples_start_like_transformers(ours, theirs)
    assert examples_from_records(records()[:1], ours)[0].input_ids[: len(before) + 1] == before + [5]


def test_chat_template_that_writes_bos_gets_exactly_one(tmp_path):
    ours, theirs = both(llama_style_folder(tmp_path, *FAMILIES["llama3"][:2]))
    assert ours.add_bos_token  # the tokenizer adds BOS to text, and the template writes one too
    (ex,) = examples_from_records([Record({"messages": CHAT}, "c:1")], ours)
    assert ex.input_ids == theirs.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert ex.input_ids[0] == BOS and ex.input_ids.count(BOS) == 1
    assert ex.input_ids[-1] == WORDS.index("<|end|>")  # the template's end of turn, no EOS appended
    assert [t for t, lab in zip(ex.input_ids, ex.labels) if lab != -100] == \
        ours.encode("hello world<|end|>hi<|end|>")  # assistant turns only


def test_chat_template_without_bos_gets_none(tmp_path):
    """transformers' apply_chat_template adds nothing to the rendered text, whatever the tokenizer adds."""
    no_bos = BOS_TEMPLATE.replace("{{ bos_token }}", "")
    ours, theirs = both(llama_style_folder(tmp_path, FAMILIES["llama2"][0], {"chat_template": no_bos}))
    (ex,) = examples_from_records([Record({"messages": CHAT}, "c:1")], ours)
    assert ex.input_ids == theirs.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert BOS not in ex.input_ids


@pytest.mark.parametrize("config, post, message", [
    ({"add_bos_token": False}, BOS_FIRST, "sets add_bos_token=False, but the post-processor of tokenizer.json adds"),
    ({"add_eos_token": True}, None, "sets add_eos_token=True, but the post-processor of tokenizer.json does not add"),
])
def test_config_flags_that_contradict_tokenizer_json_warn_and_lose(tmp_path, config, post, message):
    """transformers 5 drops tokenizer_config.json's add_bos_token / add_eos_token when tokenizer.json
    is there; so do we, and we say so."""
    import transformers

    folder = llama_style_folder(tmp_path, post, config)
    with pytest.warns(UserWarning, match=message):
        ours = load_tokenizer(folder)
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert ours.encode("hello world", add_special_tokens=True) == theirs("hello world")["input_ids"]
    check_examples_start_like_transformers(ours, theirs)


def test_embedded_smollm2_adds_no_bos(embedded_dir):
    import transformers

    ours, theirs = load_tokenizer(embedded_dir), transformers.AutoTokenizer.from_pretrained(str(embedded_dir))
    assert (ours.prefix_ids, ours.suffix_ids, ours.add_bos_token, ours.add_eos_token) == ([], [], False, False)
    assert ours.bos_token_id == 1  # <|im_start|> is named BOS, but no text starts with it
    recs = [Record({"text": "Hello, world!"}, "r:1"), Record({"prompt": "Say hi.", "completion": " Hi!"}, "r:2")]
    text, pc = examples_from_records(recs, ours)
    assert text.input_ids == theirs("Hello, world!")["input_ids"] + [ours.eos_token_id]
    assert pc.input_ids[:3] == theirs("Say hi.")["input_ids"][:3] and pc.input_ids[0] != 1
    (chat,) = examples_from_records([Record({"messages": [{"role": "user", "content": "Hi"},
                                                          {"role": "assistant", "content": "Hello!"}]}, "c:1")], ours)
    assert chat.input_ids == theirs.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], tokenize=True,
        return_dict=False)
