"""modules_to_save (trainable embedding / head) in PEFT's file layout, both ways, on tied and untied models."""

import json

import pytest
import torch
from safetensors import safe_open

from lora_engine import LoraConfig, apply_lora, load_adapter, load_model, save_adapter
from lora_engine.lora.layers import lora_layers
from tests.conftest import require_oracle, tol
from tests.hf_models import make_hf_model

peft = require_oracle("peft")
transformers = require_oracle("transformers")

SAVE = ("embed_tokens", "lm_head")


def _hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids():
    return torch.randint(0, 96, (2, 11))


@pytest.mark.parametrize("tie", [False, True])
def test_our_modules_to_save_load_in_peft(tmp_path, tie):
    make_hf_model("llama", tmp_path / "base", tie=tie)
    ours = load_model(tmp_path / "base")
    apply_lora(ours, LoraConfig(r=4, target_modules=("q_proj",), modules_to_save=SAVE), verbose=False)
    emb, head = ours.model.embed_tokens.weight, ours.lm_head.weight
    assert emb.requires_grad and head.requires_grad and emb is not head  # a tied pair comes apart, as in PEFT
    with torch.no_grad():
        for _, m in lora_layers(ours):
            m.lora_B.normal_(std=0.2)
        emb.add_(0.3 * torch.randn_like(emb))
        head.add_(0.3 * torch.randn_like(head))
    with pytest.warns(UserWarning, match="vLLM refuses adapters with modules_to_save"):
        save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a/adapter_config.json").read_text())
    assert cfg["modules_to_save"] == list(SAVE)
    with safe_open(tmp_path / "a/adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= keys
    theirs = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), tmp_path / "a").eval()
    ids = _ids()
    with torch.no_grad():
        got, ref, plain = ours(ids), theirs(ids).logits, _hf(tmp_path / "base")(ids).logits
    assert (got - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    again = load_adapter(load_model(tmp_path / "base"), tmp_path / "a", verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), got, rtol=0, atol=0)


@pytest.mark.parametrize("tie, save", [(False, ["lm_head"]), (True, ["embed_tokens"]), (True, list(SAVE))])
def test_peft_modules_to_save_load_in_ours(tmp_path, tie, save):
    make_hf_model("llama", tmp_path / "base", tie=tie)
    theirs = peft.get_peft_model(_hf(tmp_path / "base"), peft.LoraConfig(
        r=4, target_modules=["v_proj"], modules_to_save=save, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    theirs.train()
    for _ in range(3):
        ids = torch.randint(0, 96, (2, 16))
        theirs(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    theirs.eval().save_pretrained(tmp_path / "a")
    ours = load_adapter(load_model(tmp_path / "base"), tmp_path / "a", verbose=False)
    assert ours.lora_config.modules_to_save == tuple(save)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, **tol("logits_fp32"))


def test_modules_to_save_errors(tmp_path):
    make_hf_model("llama", tmp_path / "base")
    model = load_model(tmp_path / "base")
    with pytest.raises(ValueError, match="modules_to_save: 'wte' matches no module"):
        apply_lora(model, LoraConfig(target_modules=("q_proj",), modules_to_save=("wte",)), verbose=False)
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' is also a LoRA target"):
        apply_lora(model, LoraConfig(target_modules=("q_proj",), modules_to_save=("q_proj",)), verbose=False)
    with pytest.raises(ValueError, match="modules_to_save must be a list of module names"):
        LoraConfig(modules_to_save="lm_head")
    nf4 = load_model(tmp_path / "base", quantize="nf4")
    with pytest.raises(ValueError, match="holds an NF4 weight"):
        apply_lora(nf4, LoraConfig(target_modules=("q_proj",), modules_to_save=("down_proj",)), verbose=False)
