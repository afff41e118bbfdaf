"""Adapter files both ways against PEFT itself, and every bad adapter a user can hand us."""

import json
import os

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_adapter, load_model, merge_lora, save_adapter
from lora_engine.io.safetensors import CheckpointError
from lora_engine.lora.adapter import read_adapter_config
from lora_engine.lora.layers import DEFAULT_TARGETS, lora_layers
from lora_engine.models.config import ModelConfig
from lora_engine.models.decoder import CausalLM
from tests.conftest import require_oracle, tiny_config, tol
from tests.hf_models import load_hf, make_hf_model, peft_trained

peft = require_oracle("peft")
transformers = require_oracle("transformers")


def _randomize_b(model):
    # B starts at zero; a nonzero B makes the adapter visible in the logits.
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(std=0.2)


def _ids(n=2, t=13):
    return torch.randint(0, 96, (n, t))


@pytest.mark.parametrize("targets, rslora, rank_pattern", [
    (DEFAULT_TARGETS, False, {}),
    (("q_proj", "v_proj"), True, {}),
    (("q_proj", "down_proj"), False, {"model.layers.1.mlp.down_proj": 2}),
    (("k_proj", "model.layers.1.mlp.up_proj"), False, {}),  # a subset of up_proj: saved as full paths
])
def test_our_adapter_loads_in_peft(base, tmp_path, targets, rslora, rank_pattern):
    ours = load_model(base)
    apply_lora(ours, LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_rslora=rslora,
                                rank_pattern=rank_pattern, alpha_pattern={"q_proj": 3}), verbose=False)
    _randomize_b(ours)
    save_adapter(ours, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600
    paths = sorted(p for p, _ in lora_layers(ours))
    assert cfg["target_modules"] == (sorted(targets) if "." not in "".join(targets) else paths)
    theirs = peft.PeftModel.from_pretrained(load_hf(base), tmp_path).eval()
    ids = _ids()
    with torch.no_grad():
        got, ref = ours(ids), theirs(ids).logits
        plain = load_hf(base)(ids).logits
    assert (got - plain).abs().max() > 1e-3  # the adapter changes the output, so the match means something
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))


@pytest.mark.parametrize("family, kw", [
    ("llama", dict(target_modules=list(DEFAULT_TARGETS))),
    ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], use_rslora=True,
                   rank_pattern={"model.layers.0.self_attn.q_proj": 2, "up_proj": 6},
                   alpha_pattern={"v_proj": 3.0})),
    ("qwen2", dict(target_modules=["q_proj", "k_proj", "o_proj"])),  # q/k carry a bias in qwen2
])
def test_peft_adapter_loads_in_ours(tmp_path, family, kw):
    folder = tmp_path / "base"
    make_hf_model(family, folder, tie=family == "qwen2")
    theirs = peft_trained(load_hf(folder), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, task_type="CAUSAL_LM", **kw))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_model(folder)
    assert load_adapter(ours, tmp_path / "adapter", verbose=False) is ours  # PEFT's rule: the model
    config, _ = read_adapter_config(tmp_path / "adapter")
    assert config.rank_pattern == kw.get("rank_pattern", {}) and ours.lora_config == config
    ids = _ids()
    with torch.no_grad():
        ref = theirs(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    for p, m in lora_layers(ours):
        assert m.lora_B.abs().max() > 0, p
        assert m.lora_B.requires_grad and not m.weight.requires_grad


def test_round_trip_and_reload_into_existing_lora(base, tmp_path):
    ours = load_model(base)
    apply_lora(ours, LoraConfig(r=3, lora_alpha=5, target_modules=("k_proj", "gate_proj")), verbose=False)
    _randomize_b(ours)
    save_adapter(ours, tmp_path)
    fresh = load_model(base)
    load_adapter(fresh, tmp_path, verbose=False)
    again = load_model(base)  # a model that already carries LoRA of the same shape: weights replaced
    apply_lora(again, LoraConfig(r=3, lora_alpha=1, target_modules=("k_proj", "gate_proj")), verbose=False)
    load_adapter(again, tmp_path, verbose=False)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), ours(ids), rtol=0, atol=0)
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)


# ---- bad input ---------------------------------------------------------------------------------
def _saved(base, folder, **kw):
    model = load_model(base)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"), **kw), verbose=False)
    _randomize_b(model)
    save_adapter(model, folder)
    return folder


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_adapter_for_another_base_model(base, tmp_path):
    other = CausalLM(tiny_config(wide=True, hidden_size=32, head_dim=8))  # base's sizes, but 32 wide
    apply_lora(other, LoraConfig(r=4, target_modules=("q_proj",)), verbose=False)
    other.name_or_path = "tiny-32"
    save_adapter(other, tmp_path)
    model = load_model(base)
    with pytest.raises(CheckpointError, match=r"made for 'tiny-32'.*\n.*model\.layers\.0\.self_attn\.q_proj\.lora_A: "
                                              r"the adapter's tensor is \(4, 32\), this model's layer needs \(4, 64\)"):
        load_adapter(model, tmp_path)
    assert not list(lora_layers(model))  # nothing was changed by the failed load


def test_adapter_with_more_layers_than_the_model(base, tmp_path):
    deep = CausalLM(ModelConfig.from_hf(json.loads((base / "config.json").read_text()) | {"num_hidden_layers": 3}))
    apply_lora(deep, LoraConfig(r=4, target_modules=("q_proj",)), verbose=False)
    save_adapter(deep, tmp_path)
    with pytest.raises(CheckpointError, match=r"weights for model\.layers\.2\.self_attn\.q_proj, which this model"):
        load_adapter(load_model(base), tmp_path)


def test_missing_files(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(load_model(base), tmp_path / "nowhere")
    folder = _saved(base, tmp_path / "a")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json, so it is not a PEFT adapter folder"):
        load_adapter(load_model(base), folder)
    folder = _saved(base, tmp_path / "b")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors .*safe_serialization=True"):
        load_adapter(load_model(base), folder)


def test_truncated_weights(base, tmp_path):
    folder = _saved(base, tmp_path)
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors.*truncated"):
        load_adapter(load_model(base), folder)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        load_adapter(load_model(base), folder)


def test_bad_config_json(base, tmp_path):
    folder = _saved(base, tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        load_adapter(load_model(base), folder)


@pytest.mark.parametrize("changes, message", [
    (dict(r=0), r"adapter_config.json: LoraConfig.r \(the rank\) must be a positive integer, got 0"),
    (dict(lora_alpha=-1), "LoraConfig.lora_alpha must be a positive finite number, got -1"),
    (dict(lora_dropout=1.5), r"LoraConfig.lora_dropout must be a number in \[0, 1\), got 1.5"),
    (dict(target_modules=["c_attn"]), "'c_attn' matches no module of the model; its linear layers are named "
                                      "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    (dict(target_modules=None), "target_modules is missing"),
    (dict(peft_type="IA3"), "peft_type 'IA3' is not supported; only LoRA"),
    (dict(modules_to_save=["lm_headx"]), "modules_to_save: 'lm_headx' matches no module"),
    (dict(bias="all"), "bias='all' asks for trained biases"),
    (dict(layers_to_transform=[0]), "layers_to_transform"),
])
def test_invalid_or_unsupported_config(base, tmp_path, changes, message):
    folder = _saved(base, tmp_path)
    _edit_config(folder, **changes)
    model = load_model(base)
    with pytest.raises(ValueError, match=message):
        load_adapter(model, folder)
    assert not list(lora_layers(model))


def test_unsupported_tensor_in_file(base, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(base, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor .*lora_magnitude_vector.*DoRA"):
        load_adapter(load_model(base), folder)


def test_missing_tensor_in_file(base, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(base, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor base_model\.model\.model\.layers\.1\.self_attn\."
                                              r"v_proj\.lora_B\.weight"):
        load_adapter(load_model(base), folder)


def test_load_into_mismatched_or_merged_lora(base, tmp_path):
    folder = _saved(base, tmp_path)
    model = load_model(base)
    apply_lora(model, LoraConfig(r=2, target_modules=("q_proj", "v_proj")), verbose=False)
    with pytest.raises(ValueError, match="q_proj has rank 4 in the adapter but 2 on the model"):
        load_adapter(model, folder)
    model = load_model(base)
    apply_lora(model, LoraConfig(r=4, target_modules=("q_proj",)), verbose=False)
    with pytest.raises(ValueError, match="targets other layers than the LoRA already on the model"):
        load_adapter(model, folder)
    merge_lora(model)
    with pytest.raises(ValueError, match="merged into its weights; call unmerge_lora"):
        load_adapter(model, folder)


def test_save_without_lora(base, tmp_path):
    with pytest.raises(ValueError, match="save_adapter: the model has no LoRA layers; call apply_lora"):
        save_adapter(load_model(base), tmp_path)


# ---- hostile adapter files: each is refused with CheckpointError, quickly ------------------------
@pytest.mark.parametrize("changes, message", [
    (dict(r="8"), "r must be a positive integer, got str"),
    (dict(r=True), "r must be a positive integer, got bool"),
    (dict(use_dora="yes"), "use_dora must be true or false, got str"),
    (dict(target_modules={"q_proj": 1}), "target_modules must be a list of module names or one regular expression"),
    (dict(rank_pattern=["q_proj"]), r"rank_pattern must be an object \{module pattern: rank\}"),
    (dict(target_modules="(?<=x)q_proj"), "assert .*is not supported in module patterns"),
])
def test_config_fields_are_type_checked(base, tmp_path, changes, message):
    folder = _saved(base, tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_adapter(load_model(base), folder)


def test_catastrophic_target_regex_is_refused_quickly(base, tmp_path):
    import time

    folder = _saved(base, tmp_path)
    # re.fullmatch backtracks for hours on this pattern; the bounded matcher answers "matches nothing".
    _edit_config(folder, target_modules="(.*.*.*.*.*.*.*.*)*z", rank_pattern={"(.*.*.*.*.*.*.*.*)*z": 2})
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"'\(\.\*\.\*.*\)\*z' matches no module"):
        load_adapter(load_model(base), folder)
    assert time.perf_counter() - start < 10


def test_target_regex_follows_peft_fullmatch(base, tmp_path):
    folder = _saved(base, tmp_path)
    _edit_config(folder, target_modules=r".*\.(q|v)_proj", rank_pattern={"layers\\.1\\.self_attn\\.q_proj": 4})
    model = load_adapter(load_model(base), folder)
    assert sorted(p.rsplit(".", 1)[-1] for p, _ in lora_layers(model)) == ["q_proj", "q_proj", "v_proj", "v_proj"]


def test_integer_adapter_tensor_is_refused(base, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _saved(base, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.ones_like(tensors[key], dtype=torch.int32)  # was silently cast into fp32 weights
    save_file(tensors, folder / "adapter_model.safetensors")
    model = load_model(base)
    with pytest.raises(CheckpointError, match=r"q_proj.lora_A.weight is stored as I32, not a floating-point type"):
        load_adapter(model, folder)
    assert not list(lora_layers(model))
