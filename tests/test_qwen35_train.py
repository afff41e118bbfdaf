"""Qwen3.5 (models/hybrid.py) beyond the model: PEFT-named adapters of the multimodal checkpoint, the refusals
of what the family does not support, the memory plan, DPO and full fine-tuning. Tiny random fp32 models."""

import json
import math

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_adapter, load_model, save_adapter
from lora_engine.train.command import main
from lora_engine.train.options import Choices, refuse
from lora_engine.train.planning import has_linear_attention
from tests.conftest import require_oracle, tol
from tests.test_dpo_train import pref_records
from tests.test_qwen35 import _TINY, _VISION, make_hf
from tests.test_train_support import VOCAB, chat_records, save_tokenizer_files, tiny_model_folder, write_jsonl

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


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """A tiny Qwen3_5ForCausalLM with the character-level tokenizer of the train tests (vocab 128)."""
    folder = tmp_path_factory.mktemp("qwen35_text")
    make_hf(folder, vocab_size=VOCAB)
    save_tokenizer_files(folder)
    return folder


def test_packing_is_refused_by_name(text_folder, tmp_path):
    assert has_linear_attention(str(text_folder)) and has_linear_attention("", load_model(text_folder))
    assert not has_linear_attention(str(tiny_model_folder(tmp_path / "llama")))
    with pytest.raises(ValueError, match="--pack .* linear-attention layers .* drop --pack"):
        refuse(Choices(pack=True, linear_attention=True))
    refuse(Choices(pack=True))  # a model without them packs


def test_train_refuses_pack_before_the_model_loads(text_folder, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(8))
    rc = main(["--model", str(text_folder), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1",
               "--max-length", "64", "--no-general-eval", "--no-plot", "--pack"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: --pack puts several documents in one row") and "drop --pack" in err[0]
    assert not (tmp_path / "run").exists()  # refused before the data was read or the folder made


_LINEAR_TARGETS = "in_proj_qkv,in_proj_z,out_proj,gate_proj,up_proj,down_proj"


def _plan(S: int, **over):
    from lora_engine import plan as P
    from lora_engine.models.config import ModelConfig

    config = ModelConfig.from_hf({"model_type": "qwen3_5_text", **_TINY, **over})
    return P.plan_step(P.PlanConfig(model="qwen3.5", seq_len=S, precision="fp32", device="cpu",
                                    target_modules=_LINEAR_TARGETS), config)


def test_plan_of_linear_layers_grows_linearly_in_the_sequence():
    """Four Gated DeltaNet layers, no checkpointing: each doubling of S adds the same activations again (the
    chunked kernel's chunk-boundary states, traced through its fake op), where a per-token state or a (T, T)
    score would not."""
    from lora_engine.models import hybrid

    real = hybrid._delta_rule
    act = [_plan(S, layer_types=["linear_attention"] * 4)["activations"] for S in (256, 512, 1024)]
    assert hybrid._delta_rule is real  # the plan runs the model's own delta rule
    assert (act[2] - act[1]) / (act[1] - act[0]) == pytest.approx(2.0, rel=0.02)
    # the saved chunk states: 4 layers x (B=1, H=4, 1024/64 chunks, dk=8, dv=12) fp32, within the activations
    assert act[2] > 4 * 4 * 16 * 8 * 12 * 4


def test_plan_of_a_qwen35_config_runs_with_its_full_attention_layers():
    r = _plan(512)
    assert r["peak_bytes"] == sum(r[k] for k in ("weights", "adapters_and_optimizer", "activations", "transient"))
    assert r["activations"] > 0 and r["seq_len"] == 512


def _train(folder, out, *flags):
    rc = main(["--model", str(folder), "--out", str(out), "--batch-size", "4", "--max-length", "64", "--no-general-eval",
               "--no-plot", "--warmup-steps", "0", *flags])
    assert rc == 0
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_short_dpo_run_moves_the_loss(text_folder, tmp_path):
    """DPO through the linear-attention layers: the policy starts as its reference (loss log 2) and learns."""
    data = write_jsonl(tmp_path / "pairs.jsonl", pref_records(16))
    rows = _train(text_folder, tmp_path / "run", "--objective", "dpo", "--data", str(data), "--max-steps", "3",
                  "--r", "4", "--lr", "1e-2", "--target-modules", _LINEAR_TARGETS)
    assert len(rows) == 3 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_full_finetuning_moves_the_loss_and_writes_a_loadable_model(text_folder, tmp_path):
    """Every weight trained, the DeltaNet's conv, decay (A_log, dt_bias) and gated norm included."""
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(16))
    rows = _train(text_folder, tmp_path / "run", "--finetune", "full", "--data", str(data), "--max-steps", "3",
                  "--lr", "1e-3")
    assert len(rows) == 3 and rows[-1]["loss"] < rows[0]["loss"]
    base, trained = load_model(text_folder), load_model(tmp_path / "run" / "model")
    before = dict(base.named_parameters())
    for name in ("model.layers.0.linear_attn.conv1d.weight", "model.layers.0.linear_attn.A_log",
                 "model.layers.0.linear_attn.norm.weight", "model.layers.3.self_attn.q_proj.weight"):
        assert not torch.equal(dict(trained.named_parameters())[name], before[name]), name


def test_gguf_export_is_refused_by_name(text_folder, tmp_path, capsys):
    """llama.cpp's 'qwen35' holds value heads as wide as the key heads only; this tiny model's are not
    (tests/test_export_gguf_families.py exports one that is, and runs it in llama.cpp)."""
    from lora_engine.cli import run_cli
    from lora_engine.export import main as export

    rc = run_cli(export, ["--model", str(text_folder), "--gguf", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "linear_value_head_dim 12 != linear_key_head_dim 8 is not supported" in err[0] and "'qwen35'" in err[0]
    assert not (tmp_path / "m.gguf").exists()
