"""Bad checkpoints and configs: each fails with a message that says what is wrong and where."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_engine import CheckpointError, ModelConfig, load_model
from tests.hf_models import hf_config, make_hf_model


@pytest.fixture(scope="module")
def good(base):
    """conftest's tiny llama checkpoint, read only (broken copies it)."""
    return base


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
        ({"model_type": "gemma3", "vision_config": {}}, "vision tower .*train the text model"),
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


# ---- load_model's arguments ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "int8"}, "dtype 'int8' is not a floating-point torch dtype"),
    ({"device": "gpu0"}, "load_model: device='gpu0' is not a torch device"),
    ({"device": 3.5}, "load_model: device=3.5 is not a torch device"),
    ({"quantize": "int8"}, "load_model: quantize='int8' is not supported; use quantize='nf4' or None"),
    ({"quantize": "nf4", "quantize_skip": 7}, "load_model: quantize_skip=7 must be a module name or a sequence"),
    ({"quantize": "nf4", "quantize_skip": ["lm_head", None]}, "quantize_skip=.* must be a module name"),
    ({"quantize": "nf4", "blocksize": 100}, r"load_model: blocksize=100 is not allowed; use one of \(32, 64"),
    ({"quantize": "nf4", "blocksize": True}, "load_model: blocksize=True is not allowed"),
    ({"quantize": "nf4", "double_quant": "yes"}, "load_model: double_quant='yes' must be True or False"),
    ({"blocksize": 128}, "load_model: blocksize=128 applies only with quantize='nf4'"),
    ({"double_quant": False, "quantize_skip": ()},
     r"load_model: quantize_skip=\(\), double_quant=False applies only with quantize='nf4'"),
])
def test_bad_arguments_name_themselves(good, kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_model(good, **kwargs)


def test_unknown_keyword_is_a_type_error(good):
    with pytest.raises(TypeError, match="quantise"):
        load_model(good, quantise="nf4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_without_cuda(good):
    with pytest.raises(ValueError, match="device='cuda' but this torch sees no CUDA device"):
        load_model(good, device="cuda")


# ---- NF4 through the strict loader's hook: the same strictness ---------------------------------------
def test_quantize_while_loading_is_as_strict(broken):
    def edit(t):
        del t["model.layers.0.self_attn.q_proj.weight"]  # a quantized layer's weight
        t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(112, 60)  # a quantized layer, wrong shape
        t["model.layers.1.mlp.up_proj.weight.absmax"] = torch.zeros(3)  # NF4 parts in a full-precision file
        del t["model.norm.weight"]  # a layer kept in full precision

    _edit_weights(broken, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(broken, quantize="nf4", verbose=False)
    msg = str(e.value)
    assert "wrong shape for model.layers.1.mlp.up_proj.weight in model.safetensors: expected (112, 64), got (112, 60)" in msg
    assert "unexpected tensor model.layers.1.mlp.up_proj.weight.absmax in model.safetensors" in msg
    assert "2 tensors missing from model.safetensors: model.layers.0.self_attn.q_proj.weight, model.norm.weight" in msg


def test_nf4_round_trip_through_save_quantized(good, tmp_path):
    """Quantize while loading, save in bitsandbytes' layout, load as stored: the same model, bit for bit."""
    from lora_engine.quant.checkpoint import save_quantized
    from lora_engine.quant.nf4 import Linear4bit

    ours = load_model(good, quantize="nf4", quantize_skip=(), blocksize=128, verbose=False)
    assert isinstance(ours.lm_head, Linear4bit)
    save_quantized(ours, tmp_path / "nf4")
    assert sorted(p.name for p in (tmp_path / "nf4").iterdir()) == ["config.json", "model.safetensors"]
    back = load_model(tmp_path / "nf4", verbose=False)
    for name, m in ours.named_modules():
        if isinstance(m, Linear4bit):
            w, v = m.weight, back.get_submodule(name).weight
            assert torch.equal(w.packed, v.packed) and torch.equal(w.absmax, v.absmax) and w.blocksize == 128, name
    ids = torch.tensor([[1, 5, 9, 33, 2, 70]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), ours(ids), rtol=0, atol=0)


def test_stored_nf4_problems_are_collected(good, tmp_path):
    from lora_engine.quant.checkpoint import save_quantized

    save_quantized(load_model(good, quantize="nf4", verbose=False), tmp_path)

    def edit(t):
        key = "model.layers.0.mlp.up_proj.weight.absmax"
        t[key] = t[key][:-1].clone()
        t["model.layers.1.extra.weight"] = torch.zeros(1)

    _edit_weights(tmp_path, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path, verbose=False)
    msg = str(e.value)
    assert "unexpected tensor model.layers.1.extra.weight" in msg
    assert "model.layers.0.mlp.up_proj" in msg and "absmax has 111 entries but shape (112, 64)" in msg
