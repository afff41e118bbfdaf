"""The families beyond Llama (models/families.py) against transformers: logits over a sequence longer than
the sliding window and with a padded batch, the loss, a save -> load round trip in the family's own
checkpoint layout, and a LoRA step against PEFT. Tiny random fp32 models, every norm and weight random."""

import json

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_model
from lora_engine.export import save_model
from lora_engine.io.safetensors import CheckpointError, read_safetensors_header
from lora_engine.models.config import ModelConfig
from tests.conftest import require_oracle, tol
from tests.families_fixtures import make_family

WINDOW = 8
_BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
_MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
CONFIGS = {
    "gemma2": dict(sliding_window=WINDOW, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                   final_logit_softcapping=3.0),
    "gemma3_text": dict(sliding_window=WINDOW, query_pre_attn_scalar=24, layer_types=_MIXED, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
    "phi3": dict(sliding_window=WINDOW),
    "smollm3": dict(use_sliding_window=True, sliding_window=WINDOW, no_rope_layers=[1, 0, 1, 0]),
    "olmo2": {},
    "olmo3": dict(sliding_window=WINDOW, layer_types=_MIXED),
    "mistral": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
}
FAMILIES = tuple(CONFIGS)


def make_hf(family: str, folder, seed: int = 0, **over):
    """A random transformers model of `family` saved to `folder` (eager attention: its soft-cap path);
    over: config fields to change."""
    return make_family(family, folder, seed, fields={**_BASE, **CONFIGS[family], **over})


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, folder)
    return request.param, folder, hf, load_model(folder)


def test_config_reads_the_family(pair):
    family, folder, _, ours = pair
    c = ours.config
    assert c.model_type == family
    if family != "olmo2":
        assert "sliding_attention" in c.layer_types and c.sliding_window == WINDOW
    if family == "gemma3_text":
        assert c.sliding_rope == {"rope_type": "default", "rope_theta": 10_000.0}
        assert c.rope_scaling["rope_type"] == "linear"
    if family == "smollm3":
        assert c.rope_layers == (True, False, True, False)


def test_logits_match_transformers_past_the_window(pair):
    _, _, hf, ours = pair
    ids = torch.randint(0, 96, (2, 3 * WINDOW - 1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **tol("logits_fp32"))


def test_logits_match_with_padding(pair):
    _, _, hf, ours = pair
    ids = torch.randint(0, 96, (3, 2 * WINDOW + 1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, -4:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], **tol("logits_fp32"))


def test_loss_and_gradients_match_transformers(pair):
    _, _, hf, ours = pair
    ids = torch.randint(3, 96, (2, 2 * WINDOW + 3))  # no pad token: its embedding row takes no gradient there
    labels = ids.clone()
    labels[0, :4] = -100
    hf.zero_grad()
    ours.zero_grad()
    ref = hf(ids, labels=labels).loss
    got = ours.loss(ids, labels)
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    ref.backward()
    got.backward()
    theirs = dict(hf.named_parameters())
    fused = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
             "up_proj": "gate_up_proj"}
    for name, p in ours.named_parameters():
        if name in theirs:
            torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)
        else:  # a part of a fused tensor: checked through the saved layout instead
            assert any(f".{k}." in name for k in fused), name


def test_generation_with_a_cache_past_the_window(pair):
    from lora_engine.models.generate import decode

    _, _, hf, ours = pair
    prompt = torch.randint(3, 96, (1, WINDOW - 2))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2 * WINDOW,
                          do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    got = decode(ours, [prompt[0].tolist()], 2 * WINDOW).tokens[0]
    assert got == ref


def test_save_round_trip_in_the_family_layout(pair, tmp_path):
    family, folder, hf, ours = pair
    out = save_model(ours, tmp_path / "out")
    header, _ = read_safetensors_header(out / "model.safetensors")
    stored, _ = read_safetensors_header(folder / "model.safetensors")
    assert set(header) - {"__metadata__"} == set(stored) - {"__metadata__"}  # the family's own keys
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    tf = require_oracle("transformers")
    again = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 96, (1, 2 * WINDOW + 5))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_lora_step_matches_peft(family, tmp_path):
    peft = require_oracle("peft")
    hf = make_hf(family, tmp_path)
    ours = load_model(tmp_path)
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    apply_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=tuple(targets)), verbose=False)
    peft_params = dict(theirs.named_parameters())
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.normal_(std=0.1)
                peft_params[f"base_model.model.{name}.default.weight"].copy_(p)
    theirs.train()
    ours.train()
    ids = torch.randint(0, 96, (2, 2 * WINDOW + 3))
    ref = theirs(ids, labels=ids).loss
    got = ours.loss(ids, ids)
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    ref.backward()
    got.backward()
    lora = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(lora) == 2 * 4 * len(targets)
    for name, p in lora:
        torch.testing.assert_close(p.grad, peft_params[f"base_model.model.{name}.default.weight"].grad,
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_window_falls_back_to_the_reference_attention(monkeypatch):
    # bf16 on the "cpp" backend: a sliding layer's mask and a soft-cap send attention to the reference.
    from lora_engine import dispatch
    from lora_engine.kernels import attention_cpp, ops_reference

    calls = []
    monkeypatch.setattr(attention_cpp, "served", lambda *a: True)
    monkeypatch.setattr(attention_cpp, "attention", lambda *a: calls.append("cpp"))
    monkeypatch.setattr(dispatch, "resolve", lambda x, b: "cpp")
    real = ops_reference.attention
    monkeypatch.setattr(ops_reference, "attention", lambda *a: calls.append("ref") or real(*a))
    q = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    dispatch.attention(q, q, q, True, 0.3, softcap=5.0)
    dispatch.attention(q, q, q, False, 0.3, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    dispatch.attention(q, q, q, True, 0.3)
    assert calls == ["ref", "ref", "cpp"]


def test_softcap_attention_equals_the_eager_expression():
    from lora_engine.kernels.ops_reference import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    s = 3.0 * torch.tanh(q @ kk.transpose(2, 3) * 0.5 / 3.0)
    s = s.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(attention(q, k, v, True, 0.5, softcap=3.0), s.softmax(-1) @ vv)
    # A huge cap is no cap: SDPA's result.
    torch.testing.assert_close(attention(q, k, v, True, 0.5, softcap=1e9), attention(q, k, v, True, 0.5))


def _cfg(**kw):
    return dict(_BASE, model_type="gemma2", **kw)


@pytest.mark.parametrize("cfg, message", [
    (dict(_BASE, model_type="gemma3", text_config={}), "Gemma3ForConditionalGeneration.*train the text model"),
    (dict(_BASE, model_type="gemma4_text"), "hidden_size_per_layer_input 256 .per-layer input embeddings"),
    (_cfg(sliding_window=8, layer_types=["sliding_attention"]), "layer_types must list 4 entries"),
    (_cfg(sliding_window=8, layer_types=["local"] * 4), "layer_types must list 4 entries"),
    (_cfg(sliding_window=0), "sliding_window must be from 1 to"),
    (_cfg(attn_logit_softcapping=-1.0), "attn_logit_softcapping must be a positive number or null"),
    (_cfg(hidden_activation="relu"), "hidden_activation 'relu' is not supported for gemma2"),
    (dict(_BASE, model_type="phi3", partial_rotary_factor=0), r"partial_rotary_factor must be a number in \(0, 1\]"),
    (dict(_BASE, model_type="phi3", rope_scaling={"rope_type": "longrope"}), "longrope short_factor must list 8"),
    (dict(_BASE, model_type="mistral", rope_scaling={"rope_type": "longrope"}), "rope scaling type 'longrope'"),
    (dict(_BASE, model_type="olmo3", sliding_window=8, rope_parameters={
        "full_attention": {"rope_type": "yarn", "factor": 8.0}}), "rope scaling type 'yarn'"),
    (dict(_BASE, model_type="smollm3", no_rope_layers=[1, 0]), "no_rope_layers must list 4 entries"),
    (dict(_BASE, model_type="qwen2", use_sliding_window="yes"), "use_sliding_window must be true or false"),
])
def test_family_refusals_name_the_field(cfg, message):
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_hf(cfg)


def test_a_fused_checkpoint_hands_its_parts_to_a_load_hook(tmp_path):
    """A hook (NF4 on load) is given each row block of qkv_proj / gate_up_proj under its part's name."""
    from lora_engine.models.builder import build_model, load_weights, open_checkpoint

    hf = make_hf("phi3", tmp_path)
    ckpt = open_checkpoint(tmp_path)
    model = build_model(ckpt.config, device="cpu")
    seen = {}

    def hook(stored):
        if stored.name.endswith("v_proj.weight"):
            seen[stored.name] = stored.read()
        return False  # the rest loads as without a hook

    load_weights(model, ckpt, hook=hook)
    v_rows = hf.model.layers[0].self_attn.qkv_proj.weight.detach()[-model.model.layers[0].self_attn.v_proj.out_features:]
    assert torch.equal(seen["model.layers.0.self_attn.v_proj.weight"], v_rows)
    assert torch.equal(model.model.layers[0].self_attn.v_proj.weight, v_rows)
