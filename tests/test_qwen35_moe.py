"""Qwen3.5-MoE (qwen3_5_moe_text and the multimodal qwen3_5_moe: models/hybrid.py's layers with models/moe.py's
SharedExpertMoE) against transformers' Qwen3_5MoeForCausalLM / Qwen3_5MoeForConditionalGeneration: logits over
several 64-token delta-rule chunks and with left padding, the load-balancing loss, the save_pretrained layout
both ways, the MTP heads carried, expert LoRA against PEFT, greedy generation, and the config errors. Tiny
random fp32 models with routers scaled up so no token's top-k is a near tie."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_engine import LoraConfig, apply_lora, load_model
from lora_engine.export import save_model
from lora_engine.io.safetensors import CheckpointError, read_safetensors_header
from lora_engine.lora import load_adapter, save_adapter
from lora_engine.lora.experts import MOE_TARGETS
from lora_engine.models.config import ModelConfig
from lora_engine.models.generate import decode
from lora_engine.models.moe import SharedExpertMoE
from tests.conftest import require_oracle, tol
from tests.families_fixtures import make_family, randomize
from tests.test_qwen35 import _MTP, _VISION, _add_mtp, _bytes

_TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=12,
             linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=24,
             shared_expert_intermediate_size=40, num_experts=6, num_experts_per_tok=2, max_position_embeddings=256,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_hf(folder, seed: int = 0, **over):
    """Routers and experts drawn wide (tests/families_fixtures.py), so the top-k choices are clear."""
    return make_family("qwen3_5_moe_text", folder, seed, fields={**_TINY, **over})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen35moe")
    hf = make_hf(folder)
    return folder, hf, load_model(folder)


def test_config_reads_the_family(pair):
    _, _, ours = pair
    c = ours.config
    assert c.model_type == "qwen3_5_moe_text" and c.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert (c.num_experts, c.experts_per_token, c.moe_intermediate_size) == (6, 2, 24)
    assert c.norm_topk_prob and c.shared_expert and c.intermediate_size == 40  # the shared expert's F
    assert c.attn_output_gate and c.partial_rotary_factor == 0.25
    for i in range(4):
        mlp = ours.model.layers[i].mlp
        assert isinstance(mlp, SharedExpertMoE)
        assert mlp.shared_expert.gate_proj.weight.shape == (40, 64) and mlp.shared_expert_gate.weight.shape == (1, 64)
        assert mlp.experts.gate_up_proj.shape == (6, 48, 64)


def test_logits_and_aux_loss_match_transformers_over_several_chunks(pair):
    _, hf, ours = pair
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (2, 150))  # transformers' chunked path: 3 chunks of 64, the last partial
    with torch.no_grad():
        want = hf(ids, output_router_logits=True)
        torch.testing.assert_close(ours(ids), want.logits, **tol("logits_fp32"))
    torch.testing.assert_close(ours.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)


def _padded():
    torch.manual_seed(2)
    ids = torch.randint(3, 96, (3, 72))
    mask = torch.ones_like(ids)
    mask[0, :9], mask[1, :1] = 0, 0
    return ids, mask


def test_logits_and_aux_loss_match_with_left_padding(pair):
    _, hf, ours = pair
    ids, mask = _padded()
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask), hf(ids, attention_mask=mask, output_router_logits=True)
    real = mask.bool()
    torch.testing.assert_close(got[real], want.logits[real], **tol("logits_fp32"))
    torch.testing.assert_close(ours.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)


def test_loss_with_router_aux_loss_matches_transformers(pair):
    _, hf, ours = pair
    ids, mask = _padded()
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 9], labels[1, 1] = -100, -100  # predicted from a padding position: no two implementations agree
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        ours.router_aux_loss = True
        try:
            got = ours.loss(ids, labels, attention_mask=mask)
        finally:
            ours.router_aux_loss = False
    torch.testing.assert_close(got, want.loss, rtol=1e-5, atol=1e-6)


def test_save_writes_the_save_pretrained_layout_and_transformers_reloads_it(pair, tmp_path):
    """Each expert's 2-D gate/up/down weights and the shared expert, under transformers' names: the folder
    loads in transformers to the same tensors, and in ours again to the same logits."""
    tf = require_oracle("transformers")
    folder, hf, ours = pair
    save_model(ours, tmp_path / "out")
    mine = set(read_safetensors_header(tmp_path / "out" / "model.safetensors")[0]) - {"__metadata__"}
    theirs = set(read_safetensors_header(folder / "model.safetensors")[0]) - {"__metadata__"}
    assert mine == theirs and "model.layers.0.mlp.experts.5.up_proj.weight" in mine
    back = tf.Qwen3_5MoeForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0, msg=k)
    ids = torch.randint(3, 96, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "out")(ids), ours(ids), rtol=0, atol=0)


def test_saved_config_is_read_back(pair):
    folder, _, ours = pair
    assert ModelConfig.from_hf(json.loads((folder / "config.json").read_text())) == ours.config


def test_greedy_equals_transformers_generate_on_a_left_padded_batch(pair):
    _, hf, ours = pair
    torch.manual_seed(1)
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (11, 4, 19)]
    W = max(map(len, prompts))
    ids = torch.tensor([[0] * (W - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (W - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0,
                          eos_token_id=None)[:, W:].tolist()
    assert decode(ours, prompts, 16).tokens == ref


def test_gradients_match_transformers(tmp_path):
    """Every parameter's gradient: router, experts, shared expert and its gate, the DeltaNet's."""
    hf = make_hf(tmp_path).train()
    ours = load_model(tmp_path).train()
    torch.manual_seed(4)
    ids = torch.randint(3, 96, (2, 70))
    ref, got = hf(ids, labels=ids).loss, ours.loss(ids, ids)
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    ref.backward()
    got.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_mtp_heads_survive_load_and_save_byte_for_byte(tmp_path):
    make_hf(tmp_path / "base")
    mtp = _add_mtp(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    assert sorted(ours.carried_tensors) == sorted(_MTP)
    save_model(ours, tmp_path / "out")
    saved = load_file(tmp_path / "out" / "model.safetensors")
    for name, t in mtp.items():
        assert saved[name].dtype == t.dtype and _bytes(saved[name]) == _bytes(t)
    assert sorted(load_model(tmp_path / "out").carried_tensors) == sorted(_MTP)


def test_multimodal_checkpoint_loads_and_exports_the_full_checkpoint(tmp_path):
    """Qwen3_5MoeForConditionalGeneration (the released checkpoints' layout, MTP heads added): its text model
    equals transformers', and the saved folder is the full checkpoint again, vision tower and MTP heads byte
    for byte, which transformers loads to the same logits."""
    tf = require_oracle("transformers")
    torch.manual_seed(0)
    hf = tf.Qwen3_5MoeForConditionalGeneration(tf.Qwen3_5MoeConfig(text_config=_TINY, vision_config=_VISION))
    randomize(hf, "qwen3_5_moe_text", "model.language_model.")
    hf.save_pretrained(tmp_path / "mm", safe_serialization=True)
    hf.eval()
    _add_mtp(tmp_path / "mm")
    with pytest.warns(UserWarning, match=r"vision tower \(\d+ tensors, model.visual.\*\) is not trained"):
        ours = load_model(tmp_path / "mm")
    assert ours.config.model_type == "qwen3_5_moe" and ours.config.shared_expert
    ids = torch.randint(3, 96, (2, 70))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, **tol("logits_fp32"))
    save_model(ours, tmp_path / "out")
    before, after = load_file(tmp_path / "mm" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(after) == set(before)
    for name in [k for k in before if k.startswith(("model.visual.", "mtp."))]:
        assert _bytes(after[name]) == _bytes(before[name])
    back = tf.Qwen3_5MoeForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=0, atol=0)


_MODULES = ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
            "down_proj"]  # the MLP names reach the shared expert only: the routed experts are 3-D parameters


def test_expert_lora_two_steps_and_adapter_both_ways_match_peft(tmp_path):
    """LoRA on the attention and DeltaNet projections, the shared expert (target_modules) and every routed
    expert (target_parameters): our adapter loads in PEFT with the same logits, two SGD steps give PEFT's
    losses and the same adapter file, and PEFT's adapter loads into ours."""
    peft = require_oracle("peft")
    hf = make_hf(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    apply_lora(ours, LoraConfig(r=2, lora_alpha=4, target_modules=tuple(_MODULES),
                                target_parameters=list(MOE_TARGETS)), verbose=False)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.1)  # a non-zero update, so the logits see every LoRA
    trained = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert any("shared_expert.gate_proj" in n for n in trained) and any("experts.lora.down_proj" in n for n in trained)
    save_adapter(ours, tmp_path / "ours0")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours0", is_trainable=True)
    ids = torch.randint(3, 96, (2, 70))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), pm(input_ids=ids).logits, **tol("logits_fp32"))
    mine, theirs = [p for p in ours.parameters() if p.requires_grad], [p for p in pm.parameters() if p.requires_grad]
    assert sum(p.numel() for p in mine) == sum(p.numel() for p in theirs)
    opts = torch.optim.SGD(mine, lr=0.5), torch.optim.SGD(theirs, lr=0.5)
    ours.train()
    pm.train()
    for _ in range(2):
        got, ref = ours.loss(ids, ids), pm(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(got, ref, **tol("logits_fp32"))
        for loss, opt in zip((got, ref), opts):
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_adapter(ours, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "peft")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert set(a) == set(b)
    for k in a:
        # atol 1e-4 on factors of size ~0.5: lr 0.5 times the fp32 gradient differences of two chunked delta rules
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4, msg=k)
    ours.eval()
    pm.eval()
    check = torch.randint(3, 96, (1, 30))
    fresh = load_adapter(load_model(tmp_path / "base"), tmp_path / "peft", verbose=False).eval()
    back = peft.PeftModel.from_pretrained(make_hf(tmp_path / "base2"), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(check), pm(input_ids=check).logits, **tol("logits_fp32"))
        torch.testing.assert_close(back(input_ids=check).logits, ours(check), **tol("logits_fp32"))


def _config(**over) -> dict:
    return {"model_type": "qwen3_5_moe_text", **_TINY, **over}


@pytest.mark.parametrize("over, match", [
    (dict(num_experts_per_tok=7), r"num_experts_per_tok \(7\) is more than the 6 experts"),
    (dict(num_experts=0), "num_experts must be from 1"),
    (dict(moe_intermediate_size=1.5), "moe_intermediate_size must be a whole number"),
    (dict(shared_expert_intermediate_size=True), "intermediate_size must be a whole number"),
    (dict(router_aux_loss_coef=-1), "router_aux_loss_coef must be a number >= 0"),
    (dict(linear_num_value_heads=3), r"linear_num_value_heads \(3\) must be a multiple of linear_num_key_heads"),
    (dict(model_type="qwen3_5_moe"), r"qwen3_5_moe \(Qwen3_5MoeForConditionalGeneration\) config.json holds its "
                                     r"text model's fields in text_config"),
])
def test_config_errors_name_the_field(over, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(_config(**over))


def test_defaults_are_transformers():
    """Fields the config.json leaves out take Qwen3_5MoeTextConfig's defaults (checked against its class)."""
    tf = require_oracle("transformers")
    left_out = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                "router_aux_loss_coef")
    c = ModelConfig.from_hf({k: v for k, v in _config().items() if k not in left_out})
    ref = tf.Qwen3_5MoeTextConfig()
    assert (c.num_experts, c.experts_per_token, c.moe_intermediate_size, c.intermediate_size) == (
        ref.num_experts, ref.num_experts_per_tok, ref.moe_intermediate_size, ref.shared_expert_intermediate_size)
    assert c.router_aux_loss_coef == ref.router_aux_loss_coef


def test_nf4_experts_load_and_equal_the_dequantized_model(pair):
    """QLoRA: the routed experts as per-expert NF4 slices (quant/nf4_experts.py), the shared expert as NF4
    linears; the logits equal the dequantize-then-dense model's, and differ from full precision."""
    from lora_engine.quant.nf4 import dequantize_model

    folder, _, _ = pair
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    q = load_model(folder, quantize="nf4", verbose=False)
    dense = dequantize_model(load_model(folder, quantize="nf4", verbose=False))
    with torch.no_grad():
        torch.testing.assert_close(q(ids), dense(ids), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(q(ids), load_model(folder)(ids), atol=1e-4)
