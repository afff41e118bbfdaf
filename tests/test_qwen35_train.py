"""Qwen3.5 (models/hybrid.py) beyond the model: PEFT-named adapters of the multimodal checkpoint, the refusals
of what the family does not support, the memory plan, DPO and full fine-tuning. Tiny random fp32 models."""

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_adapter, load_model, save_adapter
from tests.conftest import require_oracle, tol
from tests.test_qwen35 import _TINY, _VISION

_TARGETS = ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "v_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """A tiny Qwen3_5ForConditionalGeneration saved to a folder: (folder, a function giving it afresh)."""
    tf = require_oracle("transformers")
    folder = tmp_path_factory.mktemp("qwen35_mm")
    torch.manual_seed(0)
    hf = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=_TINY, vision_config=_VISION))
    hf.save_pretrained(folder, safe_serialization=True)
    return folder, lambda: tf.Qwen3_5ForConditionalGeneration.from_pretrained(folder).eval()


def _ours(folder):
    with pytest.warns(UserWarning, match="vision tower"):
        return load_model(folder)


def test_multimodal_adapter_uses_peft_names_both_ways(multimodal, tmp_path):
    """PEFT names the text model's modules model.language_model.layers.* on the multimodal class: our adapter
    of that checkpoint is saved so, and loads into PEFT with the same logits; PEFT's loads into ours."""
    peft = require_oracle("peft")
    from safetensors import safe_open

    folder, fresh = multimodal
    ours = _ours(folder)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=tuple(_TARGETS),
                        rank_pattern={"model.layers.3.self_attn.q_proj": 2})
    apply_lora(ours, config, verbose=False)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.normal_(std=0.1)
    save_adapter(ours, tmp_path / "ours")
    with safe_open(tmp_path / "ours" / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.model.language_model.layers.") for k in keys)
    back = peft.PeftModel.from_pretrained(fresh(), tmp_path / "ours").eval()
    assert back.peft_config["default"].rank_pattern == {"model.language_model.layers.3.self_attn.q_proj": 2}
    ids = torch.randint(3, 96, (2, 30))
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), back(input_ids=ids).logits, **tol("logits_fp32"))

    theirs = peft.get_peft_model(fresh(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=_TARGETS, rank_pattern={"model.language_model.layers.0.linear_attn.out_proj": 3},
        init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    loaded = load_adapter(_ours(folder), tmp_path / "peft", verbose=False).eval()
    assert loaded.model.layers[0].linear_attn.out_proj.r == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), theirs.eval()(input_ids=ids).logits, **tol("logits_fp32"))
