"""Quantized models against transformers + bitsandbytes, both run on CPU (bnb 0.50.2 runs 4-bit on CPU).

  - a checkpoint quantized and saved by transformers + bnb loads into our engine: same logits;
  - load_model(quantize="nf4") on a full-precision checkpoint gives bnb's bytes and logits;
  - save_quantized writes what transformers + bnb load (same tensors as their own save);
  - skip lists, tied heads, dequantize_model, and the errors of bad quantized checkpoints.

The oracles (docs/nf4_format.md, "bitsandbytes on CPU, as a test oracle"): bytes and dequantized weights come from
bitsandbytes' quantize/dequantize, taken at load time before any bitsandbytes forward has run;
logits come from transformers' own model with each bnb Linear4bit swapped for an nn.Linear on
bnb's dequantize_4bit of it (through tests/bnb_oracle.py: on AVX512F CPUs bnb's native kernel
misplaces scales when blocks cross rows, as down_proj's 112 columns with blocksize 64 do). Never from bnb's 4-bit forward: on a CPU with AVX512-BF16 that forward
repacks the weight in place on first use (asserting out_features % 32 == 0, which up_proj's 112
fails) and computes in bf16 (0.29 absolute error on SmolLM2's layer-0 q_proj). Every test that
builds bnb modules runs with bnb's CPU fast path off and on (`bnb_fast_path`), so CI checks both
kinds of machine on whichever one it lands.
"""

import copy
import json
import logging
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from lora_engine import load_model
from lora_engine.io.safetensors import CheckpointError
from lora_engine.quant import nf4
from lora_engine.quant.checkpoint import save_quantized
from tests.bnb_oracle import dequantize_4bit as bnb_dequantize_4bit
from tests.conftest import require_oracle, tol
from tests.kernel_utils import assert_accurate

sys.path.insert(0, str(Path(__file__).parent))
from hf_models import make_hf_model  # noqa: E402

tf = require_oracle("transformers")
bnb = require_oracle("bitsandbytes")
bnbF = require_oracle("bitsandbytes.functional")
bnb_modules = require_oracle("bitsandbytes.nn.modules")


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


def _bnb_linears(model) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _dequantized_twin(model):
    """transformers' model with every bnb Linear4bit replaced by an nn.Linear on bnb's dequantize_4bit of it.

    Built on a deep copy, so the bnb model is left as it was. Its logits are the oracle: the same
    transformers code on bnb's own dequantized weights, computed in fp32 like ours.
    """
    twin = copy.deepcopy(model)
    for name, m in _bnb_linears(twin).items():
        state = m.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # a bnb fast-path forward already ran
            raise AssertionError(f"{name}: bnb repacked this weight for its CPU fast path; dequantize it before")
        dense = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        dense.weight = torch.nn.Parameter(bnb_dequantize_4bit(m.weight.data, state), requires_grad=False)
        if m.bias is not None:
            dense.bias = torch.nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, dense)
    return twin.eval()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_fp32")
    make_hf_model("qwen2", folder)  # q/k/v biases too, so a lost bias shows
    return folder


@pytest.fixture(scope="module", params=[False, True], ids=["bnb_fast_path_off", "bnb_fast_path_on"])
def bnb_fast_path(request):
    """bnb's CPU fast path (repack + bf16 4-bit matmul) off, then on, for the bnb modules built meanwhile.

    bitsandbytes 0.50.2 gates it per module: Linear4bit.__init__ stores has_avx512bf16() (the
    native CPU check, imported into bitsandbytes.nn.modules) as `support_avx512bf16_for_cpu`, and
    forward takes the fast path when it is set, in eval mode, without grad. Patching that name
    switches it for modules built while this fixture lives. Off works everywhere. On needs the
    CPU feature: bnb registers its CPU gemv_4bit kernel (AVX512-BF16 code) for the repacked layout
    only when the check passed at import, so elsewhere the repacked weight would go to a kernel
    that reads the plain layout.
    """
    on = request.param
    if on and not bnbF.has_avx512bf16():
        pytest.skip("bnb's CPU fast path needs AVX512-BF16, which this CPU lacks (bnb registers its "
                    "repacked-weight CPU kernel only when the feature is present)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bnb_modules, "has_avx512bf16", lambda: on)
        yield on


class BnbReference(NamedTuple):
    folder: Path  # saved by transformers + bnb, before any forward
    model: torch.nn.Module  # the bnb model: its weights stay as loaded (no test runs its forward)
    packed: dict  # module name -> bnb's packed bytes, flat, cloned at load
    absmax: dict  # module name -> bnb's (8-bit, double-quantized) absmax, cloned at load
    twin: torch.nn.Module  # the oracle for logits: _dequantized_twin of the model, taken at load


@pytest.fixture(scope="module")
def bnb_ref(hf_folder, bnb_fast_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2_bnb")
    model = _bnb_model(hf_folder)
    linears = _bnb_linears(model)
    assert linears and all(m.support_avx512bf16_for_cpu is bnb_fast_path for m in linears.values())
    packed = {name: m.weight.data.view(-1).clone() for name, m in linears.items()}
    absmax = {name: m.weight.quant_state.absmax.clone() for name, m in linears.items()}
    twin = _dequantized_twin(model)
    model.save_pretrained(folder)
    return BnbReference(folder, model, packed, absmax, twin)


@pytest.fixture(scope="module")
def bnb_folder(hf_folder, tmp_path_factory):
    """A checkpoint quantized and saved by transformers + bnb (no forward runs: the fast path does not matter)."""
    folder = tmp_path_factory.mktemp("qwen2_bnb_saved")
    _bnb_model(hf_folder).save_pretrained(folder)
    return folder


IDS = torch.tensor([[1, 5, 9, 33, 2, 70, 11], [4, 4, 90, 17, 0, 3, 8]])


def test_bnb_checkpoint_loads_with_same_logits(bnb_ref, caplog):
    with caplog.at_level(logging.INFO, logger="lora_engine"):
        ours = load_model(bnb_ref.folder)
    assert isinstance(ours.model.layers[0].mlp.down_proj, nf4.Linear4bit)
    torch.testing.assert_close(_logits(ours, IDS), _logits(bnb_ref.twin, IDS), **tol("logits_fp32"))
    assert "bits/param" in caplog.text  # the loader reports the 4-bit size through logging


def test_quantize_while_loading_matches_bnb(hf_folder, bnb_ref):
    ours = load_model(hf_folder, quantize="nf4")
    n = 0
    for name, m in ours.named_modules():
        if isinstance(m, nf4.Linear4bit):
            assert torch.equal(m.weight.packed, bnb_ref.packed[name]), name
            assert torch.equal(m.weight.absmax, bnb_ref.absmax[name]), name
            n += 1
    assert n == 14  # 7 projections x 2 layers; lm_head stays in full precision
    torch.testing.assert_close(_logits(ours, IDS), _logits(bnb_ref.twin, IDS), **tol("logits_fp32"))


def test_save_quantized_loads_in_transformers(hf_folder, bnb_ref, tmp_path):
    ours = load_model(hf_folder, quantize="nf4")
    save_quantized(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    assert cfg["bnb_4bit_use_double_quant"] is True
    from safetensors.torch import load_file

    mine, ref = load_file(tmp_path / "model.safetensors"), load_file(bnb_ref.folder / "model.safetensors")
    assert sorted(mine) == sorted(ref)
    for k in ref:
        assert mine[k].dtype == ref[k].dtype and torch.equal(mine[k], ref[k]), k
    # transformers + bnb load it: judged by their dequantized weights (taken before any bnb forward).
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, device_map="cpu").eval()
    assert len(_bnb_linears(back)) == 14
    torch.testing.assert_close(_logits(_dequantized_twin(back), IDS), _logits(ours, IDS), **tol("logits_fp32"))


def test_bnb_forward_is_a_peer_not_the_oracle(bnb_ref, bnb_fast_path):
    """bnb's own 4-bit forward, on a copy of one layer: why the oracles above are taken at load.

    Fast path off: dequantize + F.linear in fp32, bytes untouched. On: bytes repacked in place and
    bf16 arithmetic, so only a bf16-sized error bound holds. q_proj has 64 rows (bnb's fast path
    asserts rows % 32 == 0; up_proj's 112 would fail).
    """
    name = "model.layers.0.self_attn.q_proj"
    m = copy.deepcopy(_bnb_linears(bnb_ref.model)[name])
    dense = bnb_ref.twin.get_submodule(name)
    x = torch.randn(5, m.in_features)
    want = x.double() @ dense.weight.double().T + dense.bias.double()
    with torch.no_grad():
        got = m(x).double()
    repacked = getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    assert repacked is bnb_fast_path
    assert torch.equal(m.weight.data.view(-1), bnb_ref.packed[name]) is not bnb_fast_path
    # The kernel rule (tests/kernel_utils.py) with the rounding scale of a product, |x| @ |W|^T: in
    # fp32, or in bf16 (inputs, absmax and output) on the fast path.
    scale = x.double().abs() @ dense.weight.double().abs().T + dense.bias.double().abs()
    assert_accurate(got, want, torch.bfloat16 if bnb_fast_path else torch.float32, scale=scale, name="bnb forward")


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


def test_fp4_and_unknown_quantization_rejected(bnb_folder, tmp_path):
    folder = _copy(bnb_folder, tmp_path)
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
        load_model(bnb_folder, quantize="int8")


def _rewrite(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


def test_corrupted_quant_state_in_checkpoint(bnb_folder, tmp_path):
    folder = _copy(bnb_folder, tmp_path)
    key = "model.layers.1.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    _rewrite(folder, lambda sd: sd.__setitem__(key, sd[key][:-9].clone()))
    with pytest.raises(CheckpointError, match=f"model.safetensors: {key} is not a valid bitsandbytes quant state"):
        load_model(folder)


def test_absmax_count_mismatch_in_checkpoint(bnb_folder, tmp_path):
    folder = _copy(bnb_folder, tmp_path)
    key = "model.layers.0.mlp.up_proj.weight.absmax"
    _rewrite(folder, lambda sd: sd.__setitem__(key, sd[key][:-1].clone()))
    with pytest.raises(CheckpointError, match="up_proj.*absmax has 111 entries but shape \\(112, 64\\)"):
        load_model(folder)
