"""Shared helpers of the data/train/checkpoint/eval tests: a char-level fake tokenizer with a ChatML
template, and a tiny random Llama model (vocab 128, so every ASCII character is a token).

Kept in one file so the four test files do not copy them; it holds two self-checks of its own.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
import torch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
VOCAB = 128


class FakeTokenizer:
    """Character-level: ASCII character c -> ord(c) (3..127), special tokens -> 0, 1, 2."""

    def __init__(self, chat_template: str | None = CHATML):
        self.chat_template = chat_template
        self.bos_token_id = None
        self.prefix_ids: list[int] = []  # what encode(add_special_tokens=True) puts first: no BOS, like SmolLM2
        self.eos_token_id = 2
        self.eos_token_ids = [2]
        self.pad_token_id = 0
        self.vocab_size = VOCAB
        self.name_or_path = "fake-char"
        self._split = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
        self._inv = {v: k for k, v in SPECIALS.items()}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = []
        for part in self._split.split(text):
            if part in SPECIALS:
                ids.append(SPECIALS[part])
            else:
                ids += [ord(c) if 3 <= ord(c) < VOCAB else ord("?") for c in part]
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(("" if skip_special_tokens else self._inv[i]) if i in self._inv else chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = False) -> str:
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        return jinja2.Template(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def tiny_model_folder(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 32, vocab 128) saved as a Hugging Face folder."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    return folder


def tiny_lora_model(folder: Path, r: int = 4, dropout: float = 0.0):
    from lora_engine import LoraConfig, apply_lora, load_model

    model = load_model(folder)
    apply_lora(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout), verbose=False)
    # B starts at zero; give it values so gradients reach A and losses move from the base.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    return model


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_records(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}." + " ok" * (i % 4)}]}
            for i in range(n)]


def test_fake_tokenizer_round_trips_text_and_specials():
    tok = FakeTokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(2) == 1
    assert tok.decode(ids) == text == "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"


def test_fake_tokenizer_without_template_raises():
    import pytest

    with pytest.raises(ValueError, match="no chat template"):
        FakeTokenizer(chat_template=None).apply_chat_template([{"role": "user", "content": "x"}])


def save_tokenizer_files(folder: Path) -> Path:
    """Write FakeTokenizer as a real Hugging Face tokenizer (tokenizer.json + config with the template)."""
    from tokenizers import AddedToken, Tokenizer, decoders
    from tokenizers.models import BPE

    vocab = {chr(i): i for i in range(3, VOCAB)}
    vocab.update(SPECIALS)
    tok = Tokenizer(BPE(vocab=vocab, merges=[]))  # no merges and no pre-tokenizer: one token per character
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.decoder = decoders.Fuse()  # join the characters back without spaces
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None}))
    return folder


def test_saved_tokenizer_matches_fake(tmp_path):
    from lora_engine import load_tokenizer

    tok = load_tokenizer(save_tokenizer_files(tmp_path))
    fake = FakeTokenizer()
    text = fake.apply_chat_template(chat_records(1)[0]["messages"], add_generation_prompt=True) + "x y\n"
    assert tok.encode(text) == fake.encode(text)
    assert (tok.eos_token_id, tok.pad_token_id) == (fake.eos_token_id, fake.pad_token_id)
    assert tok.decode(tok.encode(text)) == text
    assert tok.apply_chat_template(chat_records(1)[0]["messages"]) == fake.apply_chat_template(
        chat_records(1)[0]["messages"])
