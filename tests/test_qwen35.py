"""Qwen3.5 (qwen3_5_text, models/hybrid.py) against transformers' Qwen3_5ForCausalLM: logits over a sequence
spanning several of transformers' 64-token delta-rule chunks, a left-padded batch, the loss, greedy
generation with the recurrent state, and the config errors. Tiny random fp32 models, every norm random."""

import json

import pytest
import torch

from lora_engine import load_model
from lora_engine.export import save_model
from lora_engine.io.safetensors import CheckpointError
from lora_engine.models.config import ModelConfig
from lora_engine.models.generate import decode
from tests.conftest import require_oracle, tol
from tests.families_fixtures import make_family

_TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=8,
             linear_value_head_dim=12, linear_num_key_heads=2, linear_num_value_heads=4,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_hf(folder, seed: int = 0, **over):
    """A random Qwen3_5ForCausalLM saved to `folder`; norms drawn around their identity (0 for the (1 + w)
    norms, 1 for the DeltaNet's gated norm)."""
    return make_family("qwen3_5_text", folder, seed, fields={**_TINY, **over})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen35")
    hf = make_hf(folder)
    return folder, hf, load_model(folder)


def test_config_reads_the_schedule(pair):
    _, _, ours = pair
    c = ours.config
    assert c.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert c.linear_attn == {"conv_kernel_dim": 4, "key_head_dim": 8, "value_head_dim": 12, "num_key_heads": 2,
                             "num_value_heads": 4}
    assert c.partial_rotary_factor == 0.25 and c.attn_output_gate and c.norm_style == "gemma"
    assert ours.model.layers[0].linear_attn.conv1d.weight.shape == (2 * 2 * 8 + 4 * 12, 1, 4)
    assert ours.model.layers[3].self_attn.q_proj.weight.shape == (2 * 4 * 32, 64)


def test_logits_match_transformers_over_several_chunks(pair):
    _, hf, ours = pair
    ids = torch.randint(3, 96, (2, 150))  # transformers' chunked path: 3 chunks of 64, the last partial
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, **tol("logits_fp32"))


def test_logits_match_with_left_padding(pair):
    _, hf, ours = pair
    ids = torch.randint(3, 96, (3, 70))
    mask = torch.ones_like(ids)
    mask[0, :9], mask[1, :1] = 0, 0
    with torch.no_grad():
        got, want = ours(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], **tol("logits_fp32"))


def test_loss_matches_transformers(pair):
    _, hf, ours = pair
    ids = torch.randint(3, 96, (2, 40))
    labels = ids.clone()
    labels[0, :7] = -100
    with torch.no_grad():
        torch.testing.assert_close(ours.loss(ids, labels), hf(ids, labels=labels).loss, **tol("logits_fp32"))


def test_packed_documents_are_refused(pair):
    _, _, ours = pair
    ids = torch.randint(3, 96, (1, 10))
    with pytest.raises(ValueError, match="segment_ids .* not supported with linear-attention layers"):
        ours(ids, segment_ids=torch.tensor([[0] * 5 + [1] * 5]))


def _config(**over) -> dict:
    return {"model_type": "qwen3_5_text", **_TINY, **over}


@pytest.mark.parametrize("over, match", [
    (dict(linear_num_value_heads=3), r"linear_num_value_heads \(3\) must be a multiple of linear_num_key_heads"),
    (dict(linear_key_head_dim=0), "linear_key_head_dim must be a whole number from 1"),
    (dict(layer_types=["linear_attention"] * 3), "layer_types must list 4 entries"),
    (dict(layer_types=["sliding_attention"] * 4), "layer_types must list 4 entries"),
    (dict(full_attention_interval=0), "full_attention_interval must be a positive whole number"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.5}),
     r"partial_rotary_factor must be a number in \(0, 1\]"),
])
def test_config_errors_name_the_field(over, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(_config(**over))


def test_default_schedule_is_every_fourth_layer_full():
    c = ModelConfig.from_hf(_config(num_hidden_layers=8, full_attention_interval=4))
    assert c.layer_types == tuple("full_attention" if i in (3, 7) else "linear_attention" for i in range(8))
    assert c.partial_rotary_factor == 0.25  # transformers' default when rope_parameters does not say


def test_linear_layers_need_their_sizes():
    with pytest.raises(CheckpointError, match="linear_attn .* must be given"):
        ModelConfig(**{k: v for k, v in ModelConfig.from_hf(_config()).to_dict().items() if k != "linear_attn"})


def test_saved_config_is_read_back(pair):
    folder, _, ours = pair
    assert ModelConfig.from_hf(json.loads((folder / "config.json").read_text())) == ours.config


def test_greedy_equals_transformers_generate_on_a_left_padded_batch(pair):
    """The conv and delta-rule states carried token to token beside the full layers' KV cache; padded rows
    zeroed on their way into the linear layers, as transformers does."""
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


def test_decode_copies_the_recurrent_state_to_repeated_prompts(pair):
    _, _, ours = pair
    prompt = list(range(3, 20))
    alone = decode(ours, [prompt], 8, logprobs=True)
    twice = decode(ours, [prompt, prompt], 8, logprobs=True)
    assert twice.tokens == alone.tokens * 2
    torch.testing.assert_close(torch.tensor(twice.logprobs), torch.tensor(alone.logprobs * 2), atol=1e-5, rtol=0)


_VISION = dict(depth=1, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, patch_size=4,
               num_position_embeddings=16)
_MTP = {"mtp.fc.weight": torch.float32, "mtp.layers.0.mlp.up_proj.weight": torch.bfloat16}


def _add_mtp(folder):
    """MTP-head tensors appended to a saved checkpoint, as the released Qwen3.5 checkpoints carry them."""
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    tensors = load_file(file)
    for i, (name, dtype) in enumerate(_MTP.items()):
        tensors[name] = torch.randn(8 + i, 64).to(dtype)
    save_file(tensors, file, metadata={"format": "pt"})
    return {k: tensors[k] for k in _MTP}


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_mtp_heads_survive_load_and_save_byte_for_byte(tmp_path):
    make_hf(tmp_path / "base")
    mtp = _add_mtp(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    assert sorted(ours.carried_tensors) == sorted(_MTP)
    for shard in (None, "20KB"):  # one file, and shards with an index
        out = tmp_path / f"out{shard}"
        save_model(ours, out, **({"max_shard_size": shard} if shard else {}))
        files = sorted(out.glob("*.safetensors"))
        assert (len(files) > 1) == (shard is not None)
        from safetensors.torch import load_file

        saved = {k: v for f in files for k, v in load_file(f).items()}
        for name, t in mtp.items():
            assert saved[name].dtype == t.dtype and _bytes(saved[name]) == _bytes(t)
        if shard:
            index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
            assert set(index) == set(saved)
    again = load_model(tmp_path / "outNone")  # the saved folder loads again, heads carried again
    assert sorted(again.carried_tensors) == sorted(_MTP)


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """A tiny Qwen3_5ForConditionalGeneration (the released checkpoints' layout) with MTP heads."""
    tf = require_oracle("transformers")
    folder = tmp_path_factory.mktemp("qwen35_mm")
    torch.manual_seed(0)
    hf = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=_TINY, vision_config=_VISION))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and "language_model" in name:
                p.copy_(0.2 * torch.randn_like(p) + (1.0 if "linear_attn.norm" in name else 0.0))
    hf.save_pretrained(folder, safe_serialization=True)
    mtp = _add_mtp(folder)
    return folder, hf.eval(), mtp


def test_multimodal_checkpoint_loads_its_text_model(multimodal):
    folder, hf, _ = multimodal
    with pytest.warns(UserWarning, match=r"vision tower \(\d+ tensors, model.visual.\*\) is not trained"):
        ours = load_model(folder)
    assert ours.config.model_type == "qwen3_5" and ours.config.layer_types[3] == "full_attention"
    ids = torch.randint(3, 96, (2, 70))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(input_ids=ids).logits, **tol("logits_fp32"))


def test_multimodal_export_is_the_full_checkpoint_again(multimodal, tmp_path):
    """Saved in the multimodal layout with the original config.json: transformers loads it as the same
    Qwen3_5ForConditionalGeneration, vision tower and MTP heads byte for byte."""
    tf = require_oracle("transformers")
    from safetensors.torch import load_file

    folder, hf, mtp = multimodal
    with pytest.warns(UserWarning, match="vision tower"):
        ours = load_model(folder)
    save_model(ours, tmp_path / "out")
    before, after = load_file(folder / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert set(after) == set(before)
    for name in [k for k in before if k.startswith(("model.visual.", "mtp."))]:
        assert _bytes(after[name]) == _bytes(before[name])
    back = tf.Qwen3_5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(3, 96, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, hf(input_ids=ids).logits, rtol=0, atol=0)


def test_multimodal_config_needs_its_text_config():
    with pytest.raises(CheckpointError, match="holds its text model's fields in text_config"):
        ModelConfig.from_hf({"model_type": "qwen3_5", "vision_config": {}})


def test_gradients_match_transformers(tmp_path):
    """Every parameter's gradient, the DeltaNet's conv, decay (A_log, dt_bias) and gated norm included."""
    hf = make_hf(tmp_path).train()
    ours = load_model(tmp_path).train()
    ids = torch.randint(3, 96, (2, 70))
    labels = ids.clone()
    labels[0, :4] = -100
    ref, got = hf(ids, labels=labels).loss, ours.loss(ids, labels)
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    ref.backward()
    got.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    first = {name: p.grad.clone() for name, p in ours.named_parameters()}
    ours.zero_grad()
    ours.gradient_checkpointing = True  # each layer recomputed in backward: the same gradients
    ours.loss(ids, labels).backward()
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, first[name], rtol=0, atol=0, msg=name)


_TARGETS = ["in_proj_qkv", "in_proj_z", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
            "down_proj"]


def test_lora_two_steps_and_adapter_round_trip_match_peft(tmp_path):
    """LoRA on the projections PEFT targets for Qwen3.5: two SGD steps give PEFT's losses, our saved adapter
    loads into PEFT with the same logits, and PEFT's loads into ours."""
    peft = require_oracle("peft")
    from lora_engine import LoraConfig, apply_lora, load_adapter, save_adapter

    hf = make_hf(tmp_path / "base")
    ours = load_model(tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=_TARGETS))
    apply_lora(ours, LoraConfig(r=4, lora_alpha=8, target_modules=tuple(_TARGETS)), verbose=False)
    peft_params = dict(theirs.named_parameters())
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                p.normal_(std=0.1)
                peft_params[f"base_model.model.{name}.default.weight"].copy_(p)
    lora = [p for p in ours.parameters() if p.requires_grad]
    assert len(lora) == 2 * (3 * 3 + 4 + 3 * 4)  # 3 linear layers x 3 targets + 1 full x 4, MLP everywhere
    opts = [torch.optim.SGD(lora, lr=0.5), torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)]
    theirs.train()
    ours.train()
    ids = torch.randint(3, 96, (2, 70))
    for _ in range(2):
        ref, got = theirs(ids, labels=ids).loss, ours.loss(ids, ids)
        torch.testing.assert_close(got, ref, **tol("logits_fp32"))
        for loss, opt in zip((got, ref), opts):
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_adapter(ours, tmp_path / "ours")
    ours.eval()
    back = peft.PeftModel.from_pretrained(make_hf(tmp_path / "base2"), tmp_path / "ours").eval()
    check = torch.randint(3, 96, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(back(check).logits, ours(check), **tol("logits_fp32"))
    theirs.save_pretrained(tmp_path / "peft")
    fresh = load_adapter(load_model(tmp_path / "base"), tmp_path / "peft", verbose=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(check), theirs.eval()(check).logits, **tol("logits_fp32"))


def test_multimodal_checkpoint_loads_quantized(multimodal):
    """The NF4 loader's hook sees our names (model.*) for the text model's tensors stored under
    model.language_model.*, and the carried tensors stay unread."""
    from lora_engine.quant.nf4 import Linear4bit

    folder, _, _ = multimodal
    with pytest.warns(UserWarning, match="vision tower"):
        q = load_model(folder, quantize="nf4", verbose=False)
        full = load_model(folder)
    assert isinstance(q.model.layers[0].linear_attn.in_proj_qkv, Linear4bit)
    assert isinstance(q.model.layers[3].self_attn.q_proj, Linear4bit)
    assert sorted(q.carried_tensors) == sorted(full.carried_tensors)
    ids = torch.randint(3, 96, (1, 20))
    with torch.no_grad():
        assert (q(ids) - full(ids)).abs().max() < 0.2  # NF4's rounding of random weights, not a wrong tensor
