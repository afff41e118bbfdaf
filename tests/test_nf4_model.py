"""Quantized models against transformers + bitsandbytes, both run on CPU (bnb 0.50.2 runs 4-bit on CPU).

  - a checkpoint quantized and saved by transformers + bnb loads into our engine: same logits;
  - load_model(quantize="nf4") on a full-precision checkpoint gives bnb's bytes and logits;
  - save_quantized writes what transformers + bnb load (same tensors as their own save);
  - skip lists, tied heads, dequantize_model, and the errors of bad quantized checkpoints.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tol

from lora_engine import load_model
from lora_engine.io.safetensors import CheckpointError
from lora_engine.quant import nf4
from lora_engine.quant.checkpoint import save_quantized

sys.path.insert(0, str(Path(__file__).parent))
from hf_models import make_hf_model  # noqa: E402

tf = pytest.importorskip("transformers", reason="transformers is a test extra (the parity oracle)")
pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test extra (the parity oracle)")


def _bnb_config(double_quant=True, blocksize=None):
    return tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                 bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)


def _bnb_model(folder, **kw):
    return tf.AutoModelForCausalLM.from_pretrained(folder, quantization_config=_bnb_config(**kw),
                                                   dtype=torch.float32, device_map="cpu").eval()


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_fp32")
    make_hf_model("qwen2", folder)  # q/k/v biases too, so a lost bias shows
    return folder


@pytest.fixture(scope="module")
def bnb_saved(hf_folder, tmp_path_factory):
    """(folder saved by transformers + bnb, the bnb model)."""
    folder = tmp_path_factory.mktemp("qwen2_bnb")
    model = _bnb_model(hf_folder)
    model.save_pretrained(folder)
    return folder, model


IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 11], [4, 4, 90, 17, 0, 3, 8]])


def test_bnb_checkpoint_loads_with_same_logits(bnb_saved, capsys):
    folder, theirs = bnb_saved
    ours = load_model(folder)
    assert isinstance(ours.model.layers[0].mlp.down_proj, nf4.Linear4bit)
    torch.testing.assert_close(_logits(ours, IDS), _logits(theirs, IDS), **tol("logits_fp32"))
    assert "bits/param" in capsys.readouterr().out


def test_quantize_while_loading_matches_bnb(hf_folder, bnb_saved):
    _, theirs = bnb_saved
    ours = load_model(hf_folder, quantize="nf4")
    their_mods = dict(theirs.named_modules())
    n = 0
    for name, m in ours.named_modules():
        if isinstance(m, nf4.Linear4bit):
            t = their_mods[name]
            assert torch.equal(m.weight.packed, t.weight.data.view(-1)), name
            assert torch.equal(m.weight.absmax, t.weight.quant_state.absmax), name
            n += 1
    assert n == 14  # 7 projections x 2 layers; lm_head stays in full precision
    torch.testing.assert_close(_logits(ours, IDS), _logits(theirs, IDS), **tol("logits_fp32"))


def test_save_quantized_loads_in_transformers(hf_folder, bnb_saved, tmp_path):
    bnb_folder, theirs = bnb_saved
    ours = load_model(hf_folder, quantize="nf4")
    save_quantized(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    assert cfg["bnb_4bit_use_double_quant"] is True
    from safetensors.torch import load_file

    mine, ref = load_file(tmp_path / "model.safetensors"), load_file(bnb_folder / "model.safetensors")
    assert sorted(mine) == sorted(ref)
    for k in ref:
        assert mine[k].dtype == ref[k].dtype and torch.equal(mine[k], ref[k]), k
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map="cpu").eval()
    torch.testing.assert_close(_logits(back, IDS), _logits(ours, IDS), **tol("logits_fp32"))


def test_without_double_quant_and_skip_list(hf_folder):
    ours = load_model(hf_folder, quantize="nf4", double_quant=False, quantize_skip=("lm_head", "down_proj"))
    mods = dict(ours.named_modules())
    assert type(mods["model.layers.0.mlp.down_proj"]) is torch.nn.Linear
    q = mods["model.layers.0.mlp.up_proj"]
    assert isinstance(q, nf4.Linear4bit) and not q.weight.is_nested
    fp = load_model(hf_folder)
    w = dict(fp.named_modules())["model.layers.0.mlp.up_proj"].weight
    assert torch.equal(q.weight.packed, nf4.quantize(w, 64, double_quant=False).packed)


def test_tied_head_and_dequantize_model(tmp_path):
    make_hf_model("llama", tmp_path, tie=True)
    ours = load_model(tmp_path, quantize="nf4", verbose=False)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    before = _logits(ours, IDS)
    nf4.dequantize_model(ours)
    assert not any(isinstance(m, nf4.Linear4bit) for m in ours.modules())
    torch.testing.assert_close(_logits(ours, IDS), before, rtol=0, atol=0)


# ---- bad quantized checkpoints ---------------------------------------------------------------------------


def _copy(folder: Path, dst: Path) -> Path:
    for f in folder.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_fp4_and_unknown_quantization_rejected(bnb_saved, tmp_path):
    folder = _copy(bnb_saved[0], tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"]["bnb_4bit_quant_type"] = "fp4"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bnb_4bit_quant_type is 'fp4'; only 'nf4'"):
        load_model(folder)
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a bitsandbytes 4-bit config"):
        load_model(folder)
    with pytest.raises(ValueError, match="quantize='int8' is not supported"):
        load_model(bnb_saved[0], quantize="int8")


def _rewrite(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def test_corrupted_quant_state_in_checkpoint(bnb_saved, tmp_path):
    folder = _copy(bnb_saved[0], tmp_path)
    key = "model.layers.1.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    _rewrite(folder, lambda sd: sd.__setitem__(key, sd[key][:-9].clone()))
    with pytest.raises(CheckpointError, match=f"model.safetensors: {key} is not a valid bitsandbytes quant state"):
        load_model(folder)


def test_absmax_count_mismatch_in_checkpoint(bnb_saved, tmp_path):
    folder = _copy(bnb_saved[0], tmp_path)
    key = "model.layers.0.mlp.up_proj.weight.absmax"
    _rewrite(folder, lambda sd: sd.__setitem__(key, sd[key][:-1].clone()))
    with pytest.raises(CheckpointError, match="up_proj.*absmax has 111 entries but shape \\(112, 64\\)"):
        load_model(folder)
