"""ModelConfig.to_hf(): the config.json transformers reads, for every supported family.

Round trips: from_hf(to_hf(c)) == c, and through transformers' own config loading (the file written,
AutoConfig.from_pretrained, to_dict). The model transformers builds from it has exactly our
parameter names and shapes, so a config we write describes the weights we write."""

import json
from dataclasses import replace

import pytest
import torch

from lora_engine.models.config import ModelConfig
from lora_engine.models.decoder import CausalLM
from tests.conftest import require_oracle
from tests.hf_models import FAMILIES, hf_config

tf = require_oracle("transformers")


def _ours(family, tie=False) -> ModelConfig:
    return ModelConfig.from_hf(hf_config(family, tie).to_dict())


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip(family, tie):
    c = _ours(family, tie)
    d = c.to_hf()
    assert ModelConfig.from_hf(d) == c
    assert ModelConfig.from_hf(json.loads(json.dumps(d))) == c  # it is plain JSON
    assert d["model_type"] == c.model_type and d["architectures"][0].endswith("ForCausalLM")


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_it(family, tmp_path):
    c = replace(_ours(family), torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf()))
    theirs = tf.AutoConfig.from_pretrained(tmp_path)
    assert type(theirs).__name__ == c.to_hf()["architectures"][0].replace("ForCausalLM", "Config")
    assert ModelConfig.from_hf(theirs.to_dict()) == c
    assert theirs.dtype == torch.bfloat16


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_builds_our_parameters(family, tmp_path):
    c = replace(_ours(family), head_dim=8)  # not hidden_size / heads (16): head_dim must be written
    if family == "llama":  # the switches a llama config.json carries
        c = replace(c, qkv_bias=True, o_bias=True, mlp_bias=True)
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf()))
    with torch.device("meta"):
        theirs = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(tmp_path))
        ours = CausalLM(c)
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(theirs) == shapes(ours)


@pytest.mark.parametrize("family, change, match", [
    ("llama", {"qkv_bias": True}, "llama model with o_bias=False .*attention_bias sets qkv_bias and o_bias together"),
    ("llama", {"qk_norm": True}, "llama model with qk_norm=True has no transformers config"),
    ("mistral", {"mlp_bias": True}, "mistral model with mlp_bias=True"),
    ("qwen2", {"qkv_bias": False}, "qwen2 model with qkv_bias=False .*qwen2 has qkv_bias=True"),
    ("qwen3", {"qk_norm": False}, "qwen3 model with qk_norm=False"),
])
def test_switches_a_family_cannot_express_raise(family, change, match):
    with pytest.raises(ValueError, match=match):
        replace(_ours(family), **change).to_hf()
