"""LoRA adapters for Phi-3, whose checkpoint fuses qkv_proj and gate_up_proj (lora/fused.py), against PEFT on
the transformers model: its fused adapter loads into our split modules and ours saves as its fused one, with
equal logits both ways."""

import json

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_model
from lora_engine.io.safetensors import CheckpointError, read_safetensors_header, save_tensors
from lora_engine.lora.adapter import load_adapter, save_adapter
from tests.conftest import require_oracle, tol
from tests.test_families import make_hf


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3")
    make_hf("phi3", folder)
    return folder


def _hf(folder):
    tf = require_oracle("transformers")
    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def _randomize(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(std=0.1)


IDS = torch.randint(3, 96, (2, 13), generator=torch.Generator().manual_seed(0))


def test_a_peft_adapter_on_fused_modules_loads_exactly(phi3, tmp_path):
    peft = require_oracle("peft")
    theirs = peft.get_peft_model(_hf(phi3), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "qkv_proj", "gate_up_proj", "o_proj"], rank_pattern={"gate_up_proj": 2}, use_rslora=True))
    _randomize(theirs, 1)
    theirs.save_pretrained(tmp_path / "a")
    ours = load_adapter(load_model(phi3), tmp_path / "a", verbose=False)
    q = ours.model.layers[0].self_attn.q_proj
    assert q.r == 4 and q.lora_A.shape == (4, 64)  # a dense fused B: each part gets the whole A
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS).logits, **tol("logits_fp32"))
    # Saved again it is PEFT's adapter: the same keys and shapes, the same rank.
    save_adapter(ours, tmp_path / "b")
    mine, _ = read_safetensors_header(tmp_path / "b" / "adapter_model.safetensors")
    peft_h, _ = read_safetensors_header(tmp_path / "a" / "adapter_model.safetensors")
    assert {k: v["shape"] for k, v in mine.items()} == {k: v["shape"] for k, v in peft_h.items()}
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["gate_up_proj", "o_proj", "qkv_proj"] and cfg["r"] == 4


@pytest.mark.parametrize("dora", [False, True])
def test_our_adapter_saves_fused_and_peft_loads_it(phi3, tmp_path, dora):
    peft = require_oracle("peft")
    ours = load_model(phi3)
    targets = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj") if dora else ("q_proj", "v_proj", "up_proj")
    apply_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={"v_proj": 2},
                                alpha_pattern={"up_proj": 3}, use_dora=dora), verbose=False)
    _randomize(ours, 2)
    save_adapter(ours, tmp_path / "a")
    header, _ = read_safetensors_header(tmp_path / "a" / "adapter_model.safetensors")
    assert header["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"]["shape"] == \
        ([10, 64] if dora else [6, 64])  # rank r_q + r_k + r_v: the parts' A's stacked
    assert not any("q_proj" in k for k in header)
    theirs = peft.PeftModel.from_pretrained(_hf(phi3), tmp_path / "a").eval()
    with torch.no_grad():
        want = ours(IDS)
        torch.testing.assert_close(theirs(IDS).logits, want, **tol("logits_fp32"))
        # Loaded back, the block-diagonal B splits into the parts' own ranks again (k_proj had none).
        again = load_adapter(load_model(phi3), tmp_path / "a", verbose=False)
        attn = again.model.layers[1].self_attn
        assert attn.q_proj.r == 4 and attn.v_proj.r == 2
        assert hasattr(attn.k_proj, "lora_A") == dora
        torch.testing.assert_close(again(IDS), want, **tol("logits_fp32"))
    # and into the model it came from (resuming): the ranks fit
    load_adapter(ours, tmp_path / "a", verbose=False)


def test_dora_on_part_of_a_fused_module_is_refused(phi3, tmp_path):
    ours = load_model(phi3)
    apply_lora(ours, LoraConfig(r=2, target_modules=("q_proj",), use_dora=True), verbose=False)
    with pytest.raises(ValueError, match="DoRA on it needs LoRA on all its parts.*k_proj"):
        save_adapter(ours, tmp_path / "a")


def test_a_fused_adapter_of_the_wrong_size_is_refused(phi3, tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["qkv_proj"]}))
    key = "base_model.model.model.layers.{}.self_attn.qkv_proj.lora_{}.weight"
    save_tensors(folder / "adapter_model.safetensors",
                 {key.format(i, k): torch.zeros(s) for i in range(4) for k, s in (("A", (2, 64)), ("B", (96, 2)))})
    ours = load_model(phi3)
    with pytest.raises(CheckpointError, match=r"qkv_proj.lora_B is \(96, 2\).*needs lora_B \(128, r\)"):
        load_adapter(ours, folder, verbose=False)
    assert not hasattr(ours.model.layers[0].self_attn.q_proj, "lora_A")  # refused before any change


def test_an_untrained_adapter_loads_back_into_its_model(phi3, tmp_path):
    # B = 0 everywhere: the blocks cannot be read off B, so the LoRA on the model gives them.
    ours = load_model(phi3)
    apply_lora(ours, LoraConfig(r=3, target_modules=("q_proj", "v_proj", "gate_proj"),
                                rank_pattern={"v_proj": 2}), verbose=False)
    save_adapter(ours, tmp_path / "a")
    a_before = ours.model.layers[2].self_attn.v_proj.lora_A.clone()
    with torch.no_grad():
        ours.model.layers[2].self_attn.v_proj.lora_A.zero_()
    load_adapter(ours, tmp_path / "a", verbose=False)
    torch.testing.assert_close(ours.model.layers[2].self_attn.v_proj.lora_A, a_before, rtol=0, atol=0)


def test_a_fused_adapter_that_does_not_split_into_the_models_lora_is_refused(phi3, tmp_path):
    peft = require_oracle("peft")
    theirs = peft.get_peft_model(_hf(phi3), peft.LoraConfig(r=4, target_modules=["qkv_proj"]))
    _randomize(theirs, 4)  # a dense B: every part needs rank 4
    theirs.save_pretrained(tmp_path / "a")
    ours = load_model(phi3)
    apply_lora(ours, LoraConfig(r=2, target_modules=("q_proj", "k_proj", "v_proj")), verbose=False)
    with pytest.raises(ValueError, match="q_proj has rank 4 in the adapter but 2 on the model"):
        load_adapter(ours, tmp_path / "a", verbose=False)
