"""Gemma 4's dense text decoder and Phi-4-mini's RoPE.

Gemma 4 (gemma4_text): wider heads with values equal to keys on the full layers, proportional RoPE, the
weightless value norm and the stored layer scalar, against transformers and PEFT; its refused mechanisms
named. Phi-4-mini's RoPE (partial_rotary_factor below 1, longrope's short and long factors) against transformers:
logits on both sides of original_max_position_embeddings and with a padded batch, generation through the
switch to the long factors (transformers runs the whole sequence again there), the phi3 layout saved, and a
LoRA step against PEFT. Tiny random fp32 models (tests/families_fixtures.py)."""

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_model
from lora_engine.export import save_model
from lora_engine.io.safetensors import CheckpointError
from lora_engine.models.config import ModelConfig
from tests.conftest import require_oracle, tol
from tests.families_fixtures import GEMMA4, PHI4_MINI, WINDOW, make_family

ORIGINAL = PHI4_MINI["original_max_position_embeddings"]


@pytest.fixture(scope="module")
def phi4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi4_mini")
    hf = make_family("phi3", folder, fields=PHI4_MINI)
    return folder, hf, load_model(folder)


def test_config_reads_partial_rope_and_longrope(phi4):
    _, hf, ours = phi4
    c = ours.config
    assert c.partial_rotary_factor == 0.75 and c.rope_scaling["rope_type"] == "longrope"
    assert c.rope_scaling["original_max_position_embeddings"] == ORIGINAL
    assert ours.model.rotary_emb.attention_scaling == pytest.approx(hf.model.rotary_emb.attention_scaling)
    assert ours.model.rotary_emb.inv_freq.numel() == 6  # 12 of each head's 16 dims rotated


@pytest.mark.parametrize("length", [ORIGINAL - 3, ORIGINAL, ORIGINAL + 1, 2 * ORIGINAL - 5])
def test_logits_match_transformers_on_both_sides_of_the_original_length(phi4, length):
    _, hf, ours = phi4
    ids = torch.randint(0, 96, (2, length))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **tol("logits_fp32"))


def test_the_factor_sets_differ():
    """The long factors change the logits: the test above would see the wrong set."""
    c = ModelConfig.from_hf({**PHI4_MINI, "model_type": "phi3"})
    from lora_engine.models.decoder import Rotary

    rot = Rotary(c)
    short, _ = rot(torch.arange(ORIGINAL)[None], torch.float32)
    long, _ = rot(torch.arange(ORIGINAL + 1)[None], torch.float32)
    assert (short - long[:, :ORIGINAL]).abs().max() > 0.1


def test_logits_match_with_padding(phi4):
    _, hf, ours = phi4
    ids = torch.randint(0, 96, (3, ORIGINAL + 3))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, -4:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], **tol("logits_fp32"))


def test_loss_and_gradients_match_transformers(phi4):
    _, hf, ours = phi4
    ids = torch.randint(3, 96, (2, ORIGINAL + 5))
    hf.zero_grad()
    ours.zero_grad()
    ref = hf(ids, labels=ids).loss
    got = ours.loss(ids, ids)
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    ref.backward()
    got.backward()
    theirs = dict(hf.named_parameters())
    for name in ("model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.embed_tokens.weight"):
        torch.testing.assert_close(dict(ours.named_parameters())[name].grad, theirs[name].grad,
                                   rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("prompt_length", [ORIGINAL - 6, ORIGINAL])
def test_generation_through_the_switch_to_the_long_factors(phi4, prompt_length):
    from lora_engine.models.generate import decode

    _, hf, ours = phi4
    torch.manual_seed(prompt_length)
    prompt = torch.randint(3, 96, (1, prompt_length))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                          pad_token_id=0)[0, prompt_length:].tolist()
    assert decode(ours, [prompt[0].tolist()], 12).tokens[0] == ref


def test_padded_batch_generation_through_the_switch(phi4):
    """Left padding: the longest row's length decides the factors, in transformers' generate and in ours."""
    from lora_engine.models.generate import decode

    _, hf, ours = phi4
    torch.manual_seed(5)
    a, b = torch.randint(3, 96, (ORIGINAL - 4,)).tolist(), torch.randint(3, 96, (ORIGINAL - 8,)).tolist()
    ids = torch.tensor([a, [0] * 4 + b])
    mask = (torch.arange(len(a))[None] >= torch.tensor([[0], [4]])).long()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert decode(ours, [a, b], 10).tokens == ref[:, len(a):].tolist()


def test_a_cache_of_short_factor_keys_is_not_continued_past_the_original_length(phi4):
    _, _, ours = phi4
    cache = ours.new_cache(1, 2 * ORIGINAL)
    with torch.no_grad():
        ours.hidden_states(torch.randint(3, 96, (1, ORIGINAL - 1)), cache=cache)
        ours.hidden_states(torch.randint(3, 96, (1, 1)), cache=cache)  # position ORIGINAL - 1: still short
        with pytest.raises(ValueError, match="run the whole sequence again without the cache"):
            ours.hidden_states(torch.randint(3, 96, (1, 1)), cache=cache)


def test_save_round_trip_in_the_phi3_layout(phi4, tmp_path):
    _, hf, ours = phi4
    out = save_model(ours, tmp_path / "out")
    tf = require_oracle("transformers")
    again = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert again.config.rope_parameters["rope_type"] == "longrope"
    ids = torch.randint(0, 96, (1, ORIGINAL + 7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=0, atol=0)


def test_lora_step_matches_peft(tmp_path):
    peft = require_oracle("peft")
    hf = make_family("phi3", tmp_path, fields=PHI4_MINI)
    ours = load_model(tmp_path)
    targets = ["o_proj", "down_proj"]  # the unfused projections: the same module names in both models
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
    ids = torch.randint(0, 96, (2, ORIGINAL + 5))
    ref = theirs(ids, labels=ids).loss
    got = ours.loss(ids, ids)
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    ref.backward()
    got.backward()
    lora = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert len(lora) == 2 * 2 * len(targets)
    for name, p in lora:
        torch.testing.assert_close(p.grad, peft_params[f"base_model.model.{name}.default.weight"].grad,
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_old_names_of_longrope_are_read_as_longrope():
    rope = {k: v for k, v in PHI4_MINI["rope_parameters"].items() if k != "rope_type"}
    c = ModelConfig.from_hf({**PHI4_MINI, "model_type": "phi3", "rope_parameters": None,
                             "rope_scaling": {**rope, "type": "su"}})
    assert c.rope_scaling["rope_type"] == "longrope"


_ROPE = PHI4_MINI["rope_parameters"]


@pytest.mark.parametrize("over, message", [
    (dict(partial_rotary_factor=1.5, rope_parameters={**_ROPE, "partial_rotary_factor": 1.5}),
     r"partial_rotary_factor must be a number in \(0, 1\]"),
    (dict(rope_parameters={**_ROPE, "short_factor": [1.0, 2.0]}), "longrope short_factor must list 6 positive"),
    (dict(rope_parameters={**_ROPE, "long_factor": None}), "longrope long_factor must list 6 positive"),
    (dict(original_max_position_embeddings=0), "original_max_position_embeddings must be from 1"),
    (dict(rope_parameters={**_ROPE, "attention_factor": -1.0}), "attention_factor must be a positive number"),
    (dict(partial_rotary_factor=0.5625, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
     "partial_rotary_factor 0.5625 rotates 9 of head_dim 16 dims; RoPE needs an even number"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope scaling type 'dynamic' is not supported"),
])
def test_phi3_rope_refusals_name_the_field(over, message):
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_hf({**PHI4_MINI, "model_type": "phi3", **over})


# ---- Gemma 4 -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma4")
    hf = make_family("gemma4_text", folder, fields=GEMMA4)
    return folder, hf, load_model(folder)


def test_gemma4_config_reads_the_full_layers_own_heads(gemma4):
    _, hf, ours = gemma4
    c = ours.config
    assert c.layer_types == ("sliding_attention", "full_attention") and c.sliding_window == WINDOW
    assert c.attention_dims(0) == (2, 8) and c.attention_dims(1) == (1, 16) and c.attention_k_eq_v
    assert c.rope_scaling["rope_type"] == "proportional" and c.sliding_rope["rope_theta"] == 10_000.0
    assert not hasattr(ours.model.layers[1].self_attn, "v_proj") and hasattr(ours.model.layers[0].self_attn, "v_proj")
    scalars = [b.item() for n, b in hf.named_buffers() if n.endswith("layer_scalar")]
    assert [layer.layer_scalar.item() for layer in ours.model.layers] == scalars and scalars[0] != 1.0


def test_gemma4_logits_match_transformers_past_the_window(gemma4):
    _, hf, ours = gemma4
    ids = torch.randint(0, 96, (2, 3 * WINDOW - 1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **tol("logits_fp32"))


def test_gemma4_logits_match_with_padding(gemma4):
    _, hf, ours = gemma4
    ids = torch.randint(0, 96, (3, 2 * WINDOW + 1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[1, -4:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], **tol("logits_fp32"))


def test_gemma4_loss_and_gradients_match_transformers(gemma4):
    _, hf, ours = gemma4
    ids = torch.randint(3, 96, (2, 2 * WINDOW + 3))
    hf.zero_grad()
    ours.zero_grad()
    ref = hf(ids, labels=ids).loss
    got = ours.loss(ids, ids)
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    ref.backward()
    got.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_gemma4_generation_with_a_cache_past_the_window(gemma4):
    from lora_engine.models.generate import decode

    _, hf, ours = gemma4
    prompt = torch.randint(3, 96, (1, WINDOW - 2))
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2 * WINDOW,
                          do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    assert decode(ours, [prompt[0].tolist()], 2 * WINDOW).tokens[0] == ref


def test_gemma4_save_round_trip_in_its_layout(gemma4, tmp_path):
    folder, hf, ours = gemma4
    from lora_engine.io.safetensors import read_safetensors_header

    out = save_model(ours, tmp_path / "out")
    header, _ = read_safetensors_header(out / "model.safetensors")
    stored, _ = read_safetensors_header(folder / "model.safetensors")
    assert set(header) - {"__metadata__"} == set(stored) - {"__metadata__"}  # layer_scalar included
    tf = require_oracle("transformers")
    again = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, 96, (1, 2 * WINDOW + 5))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=0, atol=0)


def test_gemma4_lora_step_matches_peft(tmp_path):
    peft = require_oracle("peft")
    hf = make_family("gemma4_text", tmp_path, fields=GEMMA4)
    ours = load_model(tmp_path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
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
    assert len(lora) == 2 * (2 * len(targets) - 1)  # the k=v full layer has no v_proj
    for name, p in lora:
        torch.testing.assert_close(p.grad, peft_params[f"base_model.model.{name}.default.weight"].grad,
                                   rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("over, message", [
    (dict(hidden_size_per_layer_input=256), r"hidden_size_per_layer_input 256 \(per-layer input embeddings"),
    (dict(hidden_size_per_layer_input=None), None),
    (dict(num_kv_shared_layers=1), r"num_kv_shared_layers 1 \(layers reusing an earlier layer's keys"),
    (dict(enable_moe_block=True), r"enable_moe_block True \(the mixture-of-experts block"),
    (dict(use_bidirectional_attention="all"), r"use_bidirectional_attention 'all' \(bidirectional attention\)"),
    (dict(per_layer_config={"0": {"head_dim": 16}}), "per_layer_config must give every full-attention layer"),
    (dict(rope_parameters={"full_attention": {"rope_type": "proportional", "partial_rotary_factor": 2.0},
                           "sliding_attention": {"rope_type": "default"}}),
     r"partial_rotary_factor must be a number in \[0, 1\]"),
])
def test_gemma4_refusals_name_the_field(over, message):
    cfg = {**GEMMA4, "model_type": "gemma4_text", **over}
    if message is None:  # null: the field's default (per-layer inputs on), refused as such
        cfg.pop("hidden_size_per_layer_input")
        message = "hidden_size_per_layer_input 256"
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_hf(cfg)


def test_gemma4_with_its_towers_is_refused_pointing_at_the_text_model():
    with pytest.raises(CheckpointError, match=r"Gemma4ForConditionalGeneration.*train the text model"):
        ModelConfig.from_hf({"model_type": "gemma4", "text_config": {}})


def test_gemma4_layer_types_end_with_a_full_layer_as_transformers_makes_them():
    fields = {k: v for k, v in GEMMA4.items() if k != "layer_types"}
    c = ModelConfig.from_hf({**fields, "model_type": "gemma4_text", "num_hidden_layers": 8})
    assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention", "full_attention")
    c = ModelConfig.from_hf({**GEMMA4, "model_type": "gemma4_text", "layer_types": ["sliding_attention"] * 2})
    assert c.layer_types == ("sliding_attention", "full_attention")
