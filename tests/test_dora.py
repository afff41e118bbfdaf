"""DoRA against PEFT itself: one layer's outputs and gradients (with and without dropout), adapter
files both ways on a dense and on an NF4 base (QDoRA), and merge / unmerge."""

import pytest
import torch
import torch.nn as nn

from lora_engine import LoraConfig, apply_lora, load_adapter, load_model, merge_lora, save_adapter, unmerge_lora
from lora_engine.kernels import nf4_reference
from lora_engine.kernels.nf4_format import NF4Tensor
from lora_engine.lora.layers import DEFAULT_TARGETS, LoraLinear, lora_layers
from tests.conftest import require_oracle, tol
from tests.hf_models import load_hf, peft_trained

peft = require_oracle("peft")
transformers = require_oracle("transformers")


def _ids(n=2, t=13):
    return torch.randint(0, 96, (n, t))


def _randomize(model):
    # B = 0 and m = ||W|| at the start make DoRA the identity; random values make every term visible.
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(std=0.2)
            m.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand_like(m.lora_magnitude_vector))


class _One(nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("dropout, bias", [(0.0, False), (0.0, True), (0.4, True)])
def test_layer_forward_and_gradients_equal_peft(dropout, bias):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24, bias=bias)
    theirs = peft.get_peft_model(_One(nn.Linear(40, 24, bias=bias)), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["proj"], use_dora=True))
    theirs.base_model.model.proj.base_layer.load_state_dict(lin.state_dict())
    pl = theirs.base_model.model.proj
    ours = _One(lin)
    apply_lora(ours, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=("proj",), use_dora=True),
               verbose=False)
    ol = ours.proj
    # PEFT's magnitude was initialised from its (random) weight before we copied ours in: recompute
    torch.testing.assert_close(ol.lora_magnitude_vector, lin.weight.detach().norm(dim=1))
    with torch.no_grad():
        ol.lora_B.normal_()
        ol.lora_magnitude_vector.mul_(1 + torch.rand(24))
        pl.lora_A["default"].weight.copy_(ol.lora_A)
        pl.lora_B["default"].weight.copy_(ol.lora_B)
        pl.lora_magnitude_vector["default"].weight.copy_(ol.lora_magnitude_vector)
    theirs.train()
    ours.train()
    x = torch.randn(3, 7, 40)
    torch.manual_seed(1)  # dropout is the only random draw in either forward: the same mask
    ref = theirs(x)
    torch.manual_seed(1)
    got = ours(x)
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    g = torch.randn_like(ref)
    ref.backward(g)
    got.backward(g)
    for ours_p, theirs_p in [(ol.lora_A, pl.lora_A["default"].weight), (ol.lora_B, pl.lora_B["default"].weight),
                             (ol.lora_magnitude_vector, pl.lora_magnitude_vector["default"].weight)]:
        assert theirs_p.grad.abs().max() > 0
        torch.testing.assert_close(ours_p.grad, theirs_p.grad, rtol=1e-5, atol=1e-5)
    assert not ol.weight.requires_grad


@pytest.mark.parametrize("targets, rslora", [(DEFAULT_TARGETS, False), (("q_proj", "v_proj"), True)])
def test_our_dora_adapter_loads_in_peft(base, tmp_path, targets, rslora):
    ours = load_model(base)
    apply_lora(ours, LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_rslora=rslora, use_dora=True),
               verbose=False)
    _randomize(ours)
    save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(load_hf(base), tmp_path).eval()
    assert theirs.peft_config["default"].use_dora
    ids = _ids()
    with torch.no_grad():
        got, ref, plain = ours(ids), theirs(ids).logits, load_hf(base)(ids).logits
    assert (got - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))


def test_peft_dora_adapter_loads_in_ours(base, tmp_path):
    theirs = peft_trained(load_hf(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, use_dora=True,
                                                      target_modules=["q_proj", "v_proj", "down_proj"]))
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(load_model(base), tmp_path, verbose=False)
    assert ours.lora_config.use_dora
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, **tol("logits_fp32"))
    for p, m in lora_layers(ours):
        assert m.lora_magnitude_vector.requires_grad
        # the magnitude was trained away from ||W||, so it was read from the file
        assert (m.lora_magnitude_vector - m.dense_weight().norm(dim=1)).abs().max() > 1e-4, p


def _dequantized_hf(folder, nf4_model):
    """transformers' model with every linear weight replaced by our NF4 model's dequantized weight."""
    hf = load_hf(folder)
    with torch.no_grad():
        for name, m in nf4_model.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(w, NF4Tensor):
                hf.get_submodule(name).weight.copy_(nf4_reference.nf4_dequantize(w, torch.float32))
    return hf


def test_qdora_both_ways_with_peft_on_the_dequantized_base(base, tmp_path):
    ours = load_model(base, quantize="nf4")
    apply_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "gate_proj", "o_proj"), use_dora=True),
               verbose=False)
    assert all(isinstance(m.weight, NF4Tensor) for _, m in lora_layers(ours))
    _randomize(ours)
    save_adapter(ours, tmp_path / "ours")
    ids = _ids()
    theirs = peft.PeftModel.from_pretrained(_dequantized_hf(base, ours), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, **tol("logits_fp32"))
    # and the other way: PEFT trains DoRA on the dequantized weights (its magnitude starts from their norms)
    trained = peft_trained(_dequantized_hf(base, ours), peft.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, target_modules=["k_proj", "up_proj"]))
    trained.save_pretrained(tmp_path / "theirs")
    again = load_adapter(load_model(base, quantize="nf4"), tmp_path / "theirs", verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), trained(ids).logits, **tol("logits_fp32"))


def test_qdora_magnitude_starts_at_the_dequantized_norm():
    torch.manual_seed(0)
    w = nf4_reference.nf4_quantize(torch.randn(48, 40), 64, True)
    layer = LoraLinear(w, None, r=4, lora_alpha=8, use_dora=True)
    torch.testing.assert_close(layer.lora_magnitude_vector,
                               nf4_reference.nf4_dequantize(w, torch.float32).norm(dim=1), rtol=0, atol=0)
    x = torch.randn(2, 5, 40)
    dense = LoraLinear(nf4_reference.nf4_dequantize(w, torch.float32), None, r=4, lora_alpha=8, use_dora=True)
    with torch.no_grad():
        dense.lora_A.copy_(layer.lora_A)
        dense.lora_B.normal_()
        layer.lora_B.copy_(dense.lora_B)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="merging into 4 bits is lossy"):
        layer.merge()


def test_merge_and_unmerge(base, tmp_path):
    ours = load_model(base)
    apply_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "up_proj"), use_dora=True),
               verbose=False)
    _randomize(ours)
    before = {p: m.weight.detach().clone() for p, m in lora_layers(ours)}
    ids = _ids()
    with torch.no_grad():
        unmerged = ours(ids)
        merge_lora(ours)
        merged = ours(ids)
        merge_lora(ours)  # idempotent
        twice = ours(ids)
    torch.testing.assert_close(merged, unmerged, **tol("logits_fp32"))
    torch.testing.assert_close(twice, merged, rtol=0, atol=0)
    save_adapter(ours, tmp_path)  # the adapter itself is unchanged by merging
    theirs = peft.PeftModel.from_pretrained(load_hf(base), tmp_path).merge_and_unload()
    for p, m in lora_layers(ours):
        torch.testing.assert_close(m.weight, theirs.get_submodule(p).weight, rtol=1e-6, atol=1e-6)
    unmerge_lora(ours)
    for p, m in lora_layers(ours):
        torch.testing.assert_close(m.weight, before[p], rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), unmerged, **tol("logits_fp32"))


def test_dora_errors(base, tmp_path):
    with pytest.raises(ValueError, match="LoraConfig.use_dora must be True or False, got 'yes'"):
        LoraConfig(use_dora="yes")
    model = load_model(base)
    apply_lora(model, LoraConfig(r=4, target_modules=("q_proj",), use_dora=True), verbose=False)
    save_adapter(model, tmp_path)
    plain = load_model(base)
    apply_lora(plain, LoraConfig(r=4, target_modules=("q_proj",)), verbose=False)
    with pytest.raises(ValueError, match="the adapter is DoRA but model.layers.0.self_attn.q_proj on the model is not"):
        load_adapter(plain, tmp_path)
