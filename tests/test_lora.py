"""LoRA layers: the invariants (hypothesis, one LoraLinear), apply_lora on a model, and bad configs."""

import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine import LoraConfig, LoraLinear, apply_lora, merge_lora, set_backend, unmerge_lora
from lora_engine.lora.layers import DEFAULT_TARGETS, count_parameters, lora_layers
from lora_engine.models.decoder import CausalLM
from tests.conftest import tiny_config
from tests.kernel_utils import assert_accurate

CFG = tiny_config(wide=True)

layer_args = st.fixed_dictionaries({
    "in_f": st.integers(1, 48), "out_f": st.integers(1, 48), "r": st.sampled_from([1, 2, 3, 8, 16]),
    "alpha": st.floats(0.5, 64), "rslora": st.booleans(), "bias": st.booleans(), "rows": st.integers(1, 9),
    "seed": st.integers(0, 2**16),
})


def _layer(a, dtype=torch.float32, random_b=False):
    g = torch.Generator().manual_seed(a["seed"])
    w = torch.randn(a["out_f"], a["in_f"], generator=g).to(dtype)
    b = torch.randn(a["out_f"], generator=g).to(dtype) if a["bias"] else None
    layer = LoraLinear(w, b, a["r"], a["alpha"], use_rslora=a["rslora"])
    if random_b:
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    x = torch.randn(a["rows"], 3, a["in_f"], generator=g).to(dtype)
    return layer, x


@settings(deadline=None)
@given(layer_args)
def test_initial_output_is_the_base_output(a):
    layer, x = _layer(a)
    assert layer.lora_A.shape == (a["r"], a["in_f"]) and layer.lora_B.shape == (a["out_f"], a["r"])
    assert layer.lora_A.abs().max() > 0 and layer.lora_B.abs().max() == 0
    bound = 1 / math.sqrt(a["in_f"])  # kaiming-uniform with a=sqrt(5) is U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    want = a["alpha"] / (math.sqrt(a["r"]) if a["rslora"] else a["r"])
    assert layer.scale == pytest.approx(want)


@settings(deadline=None)
@given(layer_args)
def test_training_changes_only_the_adapter(a):
    layer, x = _layer(a)
    w0 = layer.weight.clone()
    b0 = None if layer.bias is None else layer.bias.clone()
    a0, b_0 = layer.lora_A.clone(), layer.lora_B.clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # with B = 0 the first step moves only B; the second moves A too
        layer(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(layer.weight, w0) and layer.weight.grad is None
    if b0 is not None:
        assert torch.equal(layer.bias, b0) and layer.bias.grad is None
    assert not torch.equal(layer.lora_B, b_0) and not torch.equal(layer.lora_A, a0)


@settings(deadline=None)
@given(layer_args)
def test_merge_unmerge(a):
    layer, x = _layer(a, random_b=True)
    w0 = layer.weight.clone()
    y = layer(x)
    layer.merge()
    want = (w0.double() + layer.scale * layer.lora_B.double() @ layer.lora_A.double())
    torch.testing.assert_close(layer.weight.double(), want, rtol=1e-6, atol=1e-6)  # W' = W + s B A
    merged_w = layer.weight.clone()
    layer.merge()  # idempotent
    assert torch.equal(layer.weight, merged_w) and layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-4, atol=1e-4)  # not adding the LoRA path twice
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6 * (1 + merged_w.abs().max().item()))
    w1 = layer.weight.clone()
    layer.unmerge()  # a no-op when not merged
    assert torch.equal(layer.weight, w1)
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


@settings(deadline=None, max_examples=5)
@given(layer_args)
def test_bf16_merge_round_trip_within_rounding(a):
    layer, _ = _layer(a, dtype=torch.bfloat16, random_b=True)
    w0 = layer.weight.clone()
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    layer.unmerge()
    # Two roundings to bf16 (8 bits of mantissa) of values about |W'|: within 2 ulps of the largest.
    ulp = 2.0**-7 * (1 + (w0.float() + layer.delta_weight()).abs().max().item())
    assert (layer.weight.float() - w0.float()).abs().max() <= 2 * ulp


def test_fp32_adapters_on_a_bf16_layer():
    layer = LoraLinear(torch.randn(8, 16, dtype=torch.bfloat16), None, r=4, lora_alpha=8)
    assert layer.lora_A.dtype == torch.float32  # default: fp32 adapters (see lora.py)
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and layer.lora_B.grad.abs().max() > 0
    same = LoraLinear(torch.randn(8, 16, dtype=torch.bfloat16), None, r=4, lora_alpha=8, adapter_dtype=None)
    assert same.lora_A.dtype == torch.bfloat16


def test_dropout_only_on_the_lora_path():
    layer = LoraLinear(torch.randn(8, 16), torch.randn(8), r=4, lora_alpha=8, lora_dropout=0.5)
    x = torch.randn(5, 16)
    base = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), base, rtol=0, atol=0)  # B = 0: dropout cannot show yet
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.manual_seed(1)
    y1 = layer(x)
    y2 = layer(x)
    assert not torch.equal(y1, y2)  # training mode: a new mask each call
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    full = base + layer.scale * x @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), full, rtol=1e-5, atol=1e-5)


# ---- on a model ----------------------------------------------------------------------------------
def _model():
    return CausalLM(CFG).eval()


def test_apply_lora_counts_freezes_and_keeps_keys(caplog, capsys):
    model = _model()
    keys = set(model.state_dict())
    total0 = count_parameters(model)["total"]
    with caplog.at_level(logging.INFO, logger="lora_engine"):
        assert apply_lora(model, LoraConfig(r=4, lora_alpha=8)) is model  # PEFT's rule: the model
    D, F_, kv = 64, 112, 2 * 16
    per_layer = 4 * ((D + D) + (D + kv) * 2 + (D + D) + (D + F_) * 2 + (F_ + D))
    assert count_parameters(model) == {"trainable": 2 * per_layer, "total": total0 + 2 * per_layer}
    assert [r.name for r in caplog.records] == ["lora_engine.lora.layers"]
    assert "LoRA on 14 layers (r=4)" in caplog.records[0].getMessage()
    assert capsys.readouterr().out == ""  # through logging, not print
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in model.state_dict() if n.endswith((".lora_A", ".lora_B"))}
    assert {k for k in model.state_dict() if not k.endswith((".lora_A", ".lora_B"))} == keys
    assert not model.model.layers[0].self_attn.q_proj.training  # an eval model stays in eval mode


def test_a_training_step_on_the_model_changes_only_lora():
    model = _model()
    apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=("q_proj", "up_proj")), verbose=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 96, (2, 9))
    for _ in range(2):
        model.loss(ids, ids).backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) != k.endswith((".lora_A", ".lora_B")), k


def test_merge_lora_on_the_model():
    model = _model()
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, use_rslora=True), verbose=False)
    for _, m in lora_layers(model):
        with torch.no_grad():
            m.lora_B.normal_(std=0.1)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        y = model(ids)
        assert merge_lora(merge_lora(model)) is model
        assert all(m.merged for _, m in lora_layers(model))
        torch.testing.assert_close(model(ids), y, rtol=1e-4, atol=1e-4)
        assert unmerge_lora(model) is model
        torch.testing.assert_close(model(ids), y, rtol=1e-5, atol=1e-5)


def test_target_forms_and_patterns():
    model = _model()
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "model.layers.1.mlp.up_proj"),
                                 rank_pattern={"layers.0.self_attn.q_proj": 2}, alpha_pattern={"up_proj": 1}),
               verbose=False)
    got = {p: (m.r, m.lora_alpha) for p, m in lora_layers(model)}
    assert got == {"model.layers.0.self_attn.q_proj": (2, 8), "model.layers.1.self_attn.q_proj": (4, 8),
                   "model.layers.1.mlp.up_proj": (4, 1)}
    model = _model()
    apply_lora(model, LoraConfig(target_modules=r"model\.layers\.0\..*_proj"), verbose=False)
    assert len(list(lora_layers(model))) == 7
    model = _model()
    apply_lora(model, LoraConfig(target_modules="all-linear"), verbose=False)
    assert {p.rsplit(".", 1)[-1] for p, _ in lora_layers(model)} == set(DEFAULT_TARGETS)


def test_set_backend_reaches_lora_layers():
    model = _model()
    apply_lora(model, LoraConfig(), verbose=False)
    set_backend(model, "torch")
    assert {m.backend for _, m in lora_layers(model)} == {"torch"}


@pytest.mark.parametrize("target, message", [
    ("c_attn", "'c_attn' matches no module of the model; its linear layers are named down_proj, gate_proj, "
               "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    ("self_attn", "'self_attn' matches 'model.layers.0.self_attn', a Attention, not a linear layer"),
    ("lm_head", "matches the output head 'lm_head'; LoRA on the head is not supported"),
])
def test_bad_targets(target, message):
    model = _model()
    with pytest.raises(ValueError, match=message):
        apply_lora(model, LoraConfig(target_modules=(target,)))
    assert not list(lora_layers(model)) and all(p.requires_grad for p in model.parameters())


def test_apply_twice_and_merge_without_lora():
    model = _model()
    with pytest.raises(ValueError, match="merge_lora: the model has no LoRA layers; call apply_lora"):
        merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora: the model has no LoRA layers"):
        unmerge_lora(model)
    apply_lora(model, LoraConfig(), verbose=False)
    with pytest.raises(ValueError, match="already has LoRA layers .*apply_lora once per model"):
        apply_lora(model, LoraConfig())


@pytest.mark.parametrize("kw, message", [
    (dict(r=0), r"LoraConfig.r \(the rank\) must be a positive integer, got 0"),
    (dict(r=-2), r"LoraConfig.r \(the rank\) must be a positive integer, got -2"),
    (dict(r=2.5), r"LoraConfig.r \(the rank\) must be a positive integer, got 2.5"),
    (dict(r=True), r"LoraConfig.r \(the rank\) must be a positive integer, got True"),
    (dict(lora_alpha=0), "LoraConfig.lora_alpha must be a positive finite number, got 0"),
    (dict(lora_alpha=float("nan")), "LoraConfig.lora_alpha must be a positive finite number, got nan"),
    (dict(lora_dropout=1.0), r"LoraConfig.lora_dropout must be a number in \[0, 1\), got 1.0"),
    (dict(lora_dropout=-0.1), r"LoraConfig.lora_dropout must be a number in \[0, 1\), got -0.1"),
    (dict(target_modules=()), "LoraConfig.target_modules must be a non-empty list of module names"),
    (dict(target_modules=""), "LoraConfig.target_modules is empty"),
    (dict(target_modules="q_proj("), "LoraConfig.target_modules 'q_proj\\(' is not a valid regular expression"),
    (dict(use_rslora="yes"), "LoraConfig.use_rslora must be True or False, got 'yes'"),
    (dict(rank_pattern={"q_proj": 0}), r"LoraConfig.rank_pattern\['q_proj'\] \(the rank\) must be a positive"),
    (dict(alpha_pattern={"q_proj": -1}), r"LoraConfig.alpha_pattern\['q_proj'\] must be a positive finite"),
    (dict(rank_pattern=[1]), "LoraConfig.rank_pattern must be a dict"),
    (dict(alpha_pattern={"q_proj[": 2}), r"LoraConfig.alpha_pattern key 'q_proj\[' is not a valid regular expr"),
])
def test_invalid_config(kw, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**kw)


def test_invalid_layer_arguments():
    with pytest.raises(ValueError, match=r"LoraLinear: weight must be \(out, in\), got shape \(4,\)"):
        LoraLinear(torch.randn(4), None, r=2, lora_alpha=4)
    with pytest.raises(ValueError, match="lora_dropout must be a number in"):
        LoraLinear(torch.randn(4, 4), None, r=2, lora_alpha=4, lora_dropout=2)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernel needs a GPU or TRITON_INTERPRET=1 (set in CI)")
def test_the_layer_runs_the_triton_kernel_unchanged():
    # The layer knows nothing of kernels: switching the backend is all it takes.
    layer = LoraLinear(torch.randn(9, 41), torch.randn(9), r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, 41, requires_grad=True)
    g = torch.randn(3, 5, 9)
    grads = []
    for backend in ("torch", "triton"):
        set_backend(layer, backend)
        y = layer(x)
        (y * g).sum().backward()
        grads.append((y.detach(), x.grad.clone(), layer.lora_A.grad.clone(), layer.lora_B.grad.clone()))
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
    for ref, got in zip(*grads):
        assert_accurate(got, ref)  # fp32 both: only the summation order differs (tests/kernel_utils.py)
