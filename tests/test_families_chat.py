"""The new families' chat templates (Gemma, Gemma 3, Phi-3 as their checkpoints ship them; the copies in trl's
chat_templates/) render as transformers renders them, and the chat format's loss mask covers exactly the
assistant turns: their text and the end-of-turn marker the model must learn to write."""

import json
from pathlib import Path

import pytest

from lora_engine.data.formats import Record, segments, tokenize
from lora_engine.models.tokenizer import load_tokenizer
from tests.conftest import require_oracle

SPECIALS = {"gemma": ("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>")),
            "gemma3": ("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>")),
            "phi3": (None, "<|endoftext|>", ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>"))}
# What each template makes of an assistant turn: the text the loss is on (content + end marker).
TURN_END = {"gemma": "<end_of_turn>\n", "gemma3": "<end_of_turn>\n", "phi3": "<|end|>\n"}
CHATS = [
    [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "world hello"}],
    [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
     {"role": "user", "content": "hello hello"}, {"role": "assistant", "content": " world world "}],
]
SYSTEM = {"role": "system", "content": "hello system"}


def _folder(tmp_path: Path, family: str) -> Path:
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    trl = require_oracle("trl")
    template = (Path(trl.__file__).parent / "chat_templates" / f"{family}.jinja").read_text()
    bos, eos, markers = SPECIALS[family]
    specials = [t for t in (bos, eos, "<pad>", *markers) if t]
    vocab = {"[UNK]": 0, **{t: i + 1 for i, t in enumerate(specials)}}
    for w in ("hello", "world", "system", "model", "user", "\n"):
        vocab[w] = len(vocab)
    tok = Backend(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    folder = tmp_path / family
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"chat_template": template, "eos_token": eos, "pad_token": "<pad>",
              "tokenizer_class": "PreTrainedTokenizerFast"}
    if bos:
        config["bos_token"] = bos
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("family", ["gemma", "gemma3", "phi3"])
def test_templates_render_as_transformers_renders_them(tmp_path, family):
    tf = require_oracle("transformers")
    folder = _folder(tmp_path, family)
    ours, theirs = load_tokenizer(folder), tf.AutoTokenizer.from_pretrained(folder)
    chats = CHATS + ([[SYSTEM, *CHATS[1]]] if family != "gemma" else [])
    for chat in chats:
        for gen in (False, True):
            want = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == want
    assert "<start_of_turn>model\n" in want if family.startswith("gemma") else "<|user|>\nhello<|end|>" in want


@pytest.mark.parametrize("family", ["gemma", "gemma3", "phi3"])
def test_the_loss_is_on_the_assistant_turns(tmp_path, family):
    tok = load_tokenizer(_folder(tmp_path, family))
    chat = ([SYSTEM] if family != "gemma" else []) + CHATS[1]
    record = Record({"messages": chat}, "x.jsonl:1")
    trained = [text for text, on in segments(record, "chat", tok) if on]
    if family == "phi3":  # content as written; EOS closes the conversation only, so the last turn learns it
        second = " world world " + TURN_END[family] + "<|endoftext|>"
    else:  # Gemma's templates trim the content
        second = "world world" + TURN_END[family]
    assert trained == ["world" + TURN_END[family], second]
    ex = tokenize(record, "chat", tok)
    assert tok.decode([t for t in ex.labels if t != -100]).split() == \
        tok.decode(tok.encode("".join(trained), add_special_tokens=False)).split()
