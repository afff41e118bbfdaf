"""Bad checkpoints and configs: each fails with a message that says what is wrong and where."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_engine import CheckpointError, ModelConfig, load_model
from tests.hf_models import hf_config, make_hf_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    make_hf_model("llama", folder)
    return folder


@pytest.fixture
def broken(good, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(good, folder)
    return folder


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_file_instead_of_folder(good):
    with pytest.raises(NotADirectoryError, match="is a file"):
        load_model(good / "config.json")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_folder_without_weights(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(broken)


def test_unsupported_model_type(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        load_model(broken)


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope scaling type 'yarn'"),
        ({"model_type": "mistral", "sliding_window": 16}, "sliding-window attention"),
        ({"num_local_experts": 8}, "mixture-of-experts"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ],
)
def test_unsupported_features(patch, match):
    cfg = hf_config("llama").to_dict()
    cfg.update(patch)
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf(cfg)


def test_sliding_window_not_in_use_is_fine():
    cfg = hf_config("mistral").to_dict()
    cfg["sliding_window"] = cfg["max_position_embeddings"]  # a window as long as the context
    assert ModelConfig.from_hf(cfg).model_type == "mistral"
    cfg = hf_config("qwen2").to_dict()
    cfg["sliding_window"], cfg["use_sliding_window"] = 8, False
    assert ModelConfig.from_hf(cfg).qkv_bias


def test_missing_tensors_are_all_listed(broken):
    def drop(t):
        del t["model.layers.0.self_attn.q_proj.weight"]
        del t["model.norm.weight"]

    _edit_weights(broken, drop)
    with pytest.raises(CheckpointError) as e:
        load_model(broken)
    msg = str(e.value)
    assert "2 tensors missing from model.safetensors" in msg
    assert "model.layers.0.self_attn.q_proj.weight" in msg and "model.norm.weight" in msg


def test_unexpected_tensor(broken):
    _edit_weights(broken, lambda t: t.__setitem__("model.layers.9.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.9\.mlp\.extra\.weight in model\.safetensors"):
        load_model(broken)


def test_wrong_shape(broken):
    _edit_weights(broken, lambda t: t.__setitem__("model.layers.1.mlp.up_proj.weight", torch.zeros(112, 60)))
    with pytest.raises(
        CheckpointError,
        match=r"wrong shape for model\.layers\.1\.mlp\.up_proj\.weight in model\.safetensors: "
        r"expected \(112, 64\), got \(112, 60\)",
    ):
        load_model(broken)


def test_truncated_safetensors(broken):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_model(broken)


def test_corrupted_header(broken):
    path = broken / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted safetensors header"):
        load_model(broken)


def test_tiny_file(broken):
    (broken / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="no header"):
        load_model(broken)


def test_index_naming_missing_shard(tmp_path):
    folder = tmp_path / "sharded"
    make_hf_model("llama", folder, shard_size="100KB")
    victim = sorted(folder.glob("model-*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"names shards that do not exist: {victim.name}"):
        load_model(folder)


def test_dtype_argument(good):
    m = load_model(good, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="not a floating-point torch dtype"):
        load_model(good, dtype="int8")


def test_loaded_values_equal_checkpoint(good):
    m = load_model(good)
    ref = load_file(good / "model.safetensors")
    for name, t in m.state_dict().items():
        torch.testing.assert_close(t, ref[name], rtol=0, atol=0)
