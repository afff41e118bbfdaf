"""LoRA on mixture-of-experts weights (lora/experts.py) against PEFT's target_parameters: the adapter file
loads in PEFT onto the transformers model and back, and a few training steps (experts and attention) give
PEFT's losses and adapters. Tiny random fp32 Qwen3-MoE / Mixtral from tests/test_moe_families.py."""

import json
import logging

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_model
from lora_engine.io.safetensors import read_safetensors_header
from lora_engine.lora import load_adapter, save_adapter
from lora_engine.lora.experts import MOE_TARGETS
from tests.conftest import require_oracle
from tests.test_moe_families import make_hf

CFG = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], target_parameters=list(MOE_TARGETS))


def _ids(seed=1):
    torch.manual_seed(seed)
    return torch.randint(3, 96, (2, 9))


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, folder)
    hf.config.output_router_logits = False  # the loss without the auxiliary term, as ours
    return folder, hf


def _ours_with_adapter(folder, config=None):
    ours = load_model(folder)
    apply_lora(ours, config or LoraConfig(**CFG), verbose=False)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.2)  # a non-zero update, so the test sees the experts' LoRA
    return ours


def test_adapter_file_is_peft_format_and_loads_in_peft(pair, tmp_path):
    peft = require_oracle("peft")
    folder, hf = pair
    ours = _ours_with_adapter(folder)
    save_adapter(ours, tmp_path / "a")
    keys = set(read_safetensors_header(tmp_path / "a" / "adapter_model.safetensors")[0]) - {"__metadata__"}
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a")
    try:
        theirs = {k.replace('.default', '') for k in pm.state_dict() if "lora_" in k}
        assert keys == theirs
        ids = _ids()
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), pm(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
            # and back: PEFT's own save loads into a fresh model of ours, with the same logits
            pm.save_pretrained(tmp_path / "b")
            back = load_adapter(load_model(folder), tmp_path / "b", verbose=False)
            torch.testing.assert_close(back(ids), ours(ids), rtol=0, atol=0)
    finally:
        pm.unload()


def test_training_steps_equal_peft(pair, tmp_path):
    peft = require_oracle("peft")
    folder, hf = pair
    ours = _ours_with_adapter(folder)
    save_adapter(ours, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a", is_trainable=True)
    try:
        ours.train()
        pm.train()
        mine = [p for p in ours.parameters() if p.requires_grad]
        theirs = [p for p in pm.parameters() if p.requires_grad]
        assert sum(p.numel() for p in mine) == sum(p.numel() for p in theirs)
        opt_a, opt_b = torch.optim.SGD(mine, lr=0.5), torch.optim.SGD(theirs, lr=0.5)
        for step in range(3):
            ids = _ids(10 + step)
            la = ours.loss(ids, ids)
            lb = pm(input_ids=ids, labels=ids).loss
            torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
            for opt, loss in ((opt_a, la), (opt_b, lb)):
                opt.zero_grad()
                loss.backward()
                opt.step()
        pm.save_pretrained(tmp_path / "peft")
        save_adapter(ours, tmp_path / "ours")
        from safetensors.torch import load_file
        a, b = load_file(tmp_path / "ours" / "adapter_model.safetensors"), \
            load_file(tmp_path / "peft" / "adapter_model.safetensors")
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    finally:
        pm.unload()


def test_router_frozen_and_base_experts_untouched(pair):
    folder, _ = pair
    ours = _ours_with_adapter(folder)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert not any(n.endswith("mlp.gate.weight") or n.endswith("gate_up_proj") for n in trainable)
    assert any("experts.lora.gate_up_proj.lora_A" in n for n in trainable)


def test_mlp_names_in_an_moe_model(pair, caplog):
    """gate_proj names the experts' fused gate_up_proj (as in PEFT): alone it is refused, as PEFT refuses it.
    Attention alone leaves the experts frozen, and the warning says so."""
    folder, _ = pair
    with pytest.raises(ValueError, match="'gate_proj' without 'up_proj'.*fused in one gate_up_proj"):
        apply_lora(load_model(folder), LoraConfig(target_modules=["q_proj", "gate_proj"]), verbose=False)
    ours = load_model(folder)
    with caplog.at_level(logging.WARNING, logger="lora_engine.lora.layers"):
        apply_lora(ours, LoraConfig(target_modules=["q_proj"]), verbose=False)
    assert "stays frozen" in caplog.text


def test_adapter_missing_an_expert_tensor_is_refused(pair, tmp_path):
    from safetensors.torch import load_file, save_file

    from lora_engine.io.safetensors import CheckpointError

    folder, _ = pair
    save_adapter(_ours_with_adapter(folder), tmp_path / "a")
    f = tmp_path / "a" / "adapter_model.safetensors"
    t = load_file(f)
    t.pop("base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight")
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"does not fit this model's experts:\n  - missing tensor .*layers.0"):
        load_adapter(load_model(folder), tmp_path / "a", verbose=False)


def test_experts_left_frozen_warns(pair, caplog):
    folder, _ = pair
    with caplog.at_level(logging.WARNING, logger="lora_engine.lora.layers"):
        apply_lora(load_model(folder), LoraConfig(target_modules=["q_proj"]), verbose=False)
    assert "every expert of this mixture-of-experts model stays frozen" in caplog.text


@pytest.mark.parametrize(("over", "match"), [
    (dict(target_parameters=["mlp.experts.w1"]), r"'mlp.experts.w1' matches no parameter"),
    (dict(lora_dropout=0.1), "supports neither use_dora nor lora_dropout"),
    (dict(target_parameters="mlp.experts.down_proj"), "target_parameters must be a list"),
])
def test_expert_lora_errors(pair, over, match):
    folder, _ = pair
    with pytest.raises(ValueError, match=match):
        apply_lora(load_model(folder), LoraConfig(**{**CFG, **over}), verbose=False)


def test_train_command_on_a_tiny_qwen3_moe_folder(tmp_path):
    """`python -m lora_engine.train` end to end on an MoE checkpoint: LoRA on attention and the experts,
    two steps, an adapter PEFT's format names by target_parameters, loaded back onto the model."""
    from lora_engine.lora import read_adapter_config
    from lora_engine.train.command import main
    from tests.test_train_support import VOCAB, chat_records, save_tokenizer_files, write_jsonl

    tf = require_oracle("transformers")
    folder = tmp_path / "moe"
    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               num_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
    tf.Qwen3MoeForCausalLM(config).save_pretrained(folder)
    save_tokenizer_files(folder)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(12))
    out = tmp_path / "run"
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size",
               "4", "--max-length", "64", "--no-general-eval", "--no-plot", "--lr", "1e-2",
               "--target-modules", "q_proj,v_proj", "--target-parameters", ",".join(MOE_TARGETS),
               "--router-aux-loss"])
    assert rc == 0
    config, raw = read_adapter_config(out / "adapter")
    assert sorted(raw["target_parameters"]) == sorted(MOE_TARGETS)
    model = load_adapter(load_model(folder), out / "adapter", verbose=False)
    trained = [n for n, p in model.named_parameters() if "experts.lora" in n and n.endswith("lora_B")]
    assert trained and all(model.get_parameter(n).abs().sum() > 0 for n in trained)  # the experts' B moved off 0


def test_router_aux_loss_flag_on_a_dense_model_is_refused(folder, tmp_path, capsys):
    from lora_engine.train.command import main
    from tests.test_train_support import chat_records, write_jsonl

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(8))
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "1",
               "--no-general-eval", "--no-plot", "--router-aux-loss"])
    assert rc == 2
    assert "--router-aux-loss: " in capsys.readouterr().err


PEFT_LIST = {"qwen3_moe": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
             "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "w1", "w3", "w2"]}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("listed", [True, False], ids=["list", "all-linear"])
def test_mlp_names_reach_the_experts_as_in_peft(family, listed, tmp_path):
    """PEFT under transformers v5 reads the MLP projection names (and all-linear) as the fused experts, with
    gate_up_proj at rank 2r / alpha 2*alpha: the same LoraConfig gives the same adapter here."""
    peft = require_oracle("peft")
    targets = PEFT_LIST[family] if listed else "all-linear"
    folder = tmp_path / "m"
    hf = make_hf(family, folder)
    hf.config.output_router_logits = False
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    expected = {k.replace(".default", "").removeprefix("base_model.model."): tuple(v.shape)
                for k, v in pm.state_dict().items() if "lora_" in k}
    converted = pm.peft_config["default"]
    pm.unload()
    ours = _ours_with_adapter(folder, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    save_adapter(ours, tmp_path / "a")
    header = read_safetensors_header(tmp_path / "a" / "adapter_model.safetensors")[0]
    assert {k.removeprefix("base_model.model."): tuple(v["shape"]) for k, v in header.items()
            if k != "__metadata__"} == expected
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    # PEFT writes one pattern (.*\\.gate_up_proj), we write every path it matches, with the same values
    for pattern in ("rank_pattern", "alpha_pattern"):
        assert saved[pattern] and set(saved[pattern].values()) == set(getattr(converted, pattern).values())
        assert all(k.endswith("mlp.experts.gate_up_proj") for k in saved[pattern])
    back = peft.PeftModel.from_pretrained(make_hf(family, tmp_path / "m2"), tmp_path / "a")
    back.base_model.model.config.output_router_logits = False
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), back(input_ids=ids).logits, rtol=1e-4, atol=1e-4)

