"""gpt-oss (models/gpt_oss.py) against transformers and PEFT: logits with attention sinks, a window shorter
than the sequence, a padded batch and YaRN RoPE; the save_pretrained layout both ways; per-expert LoRA on the
(E, K, N) expert storage equal to PEFT's target_parameters for two SGD steps; the config errors. Tiny fp32."""

import json
import math
from pathlib import Path

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_model
from lora_engine.export import save_model
from lora_engine.io.safetensors import CheckpointError, read_safetensors_header
from lora_engine.lora import save_adapter
from lora_engine.lora.experts import MOE_TARGETS
from lora_engine.models import gpt_oss
from lora_engine.models.config import ModelConfig
from tests.conftest import require_oracle
from tests.families_fixtures import make_family

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, num_local_experts=5, num_experts_per_tok=2, sliding_window=4,
             max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             # YaRN with a non-trivial ramp on these 4 frequencies and an attention factor above 1
             rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 8.0, "beta_slow": 1.0,
                              "truncate": False, "original_max_position_embeddings": 512, "rope_theta": 150000.0})


def make_hf(folder, seed: int = 0, **over):
    return make_family("gpt_oss", folder, seed, fields={**_BASE, **over})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss")
    hf = make_hf(folder)
    return folder, hf, load_model(folder)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (2, 11))  # 11 tokens: longer than the window (4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on row 1
    return ids, mask


def test_config_reads_the_family(pair):
    _, hf, ours = pair
    c = ours.config
    assert (c.num_experts, c.experts_per_token, c.moe_intermediate_size) == (5, 2, 16)
    assert c.layer_types == tuple(hf.config.layer_types) == ("sliding_attention", "full_attention",
                                                             "sliding_attention")
    assert c.attn_sinks and c.qkv_bias and c.o_bias and c.rope_scaling["rope_type"] == "yarn"
    rot = hf.model.rotary_emb
    torch.testing.assert_close(ours.model.rotary_emb.inv_freq, rot.inv_freq, rtol=0, atol=0)
    assert ours.model.rotary_emb.attention_scaling == rot.attention_scaling > 1


def test_logits_equal_transformers(pair):
    _, hf, ours = pair
    ids, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, output_router_logits=True)
        got = ours(ids, attention_mask=mask)
        aux = ours.aux_loss
        plain = ours(ids)
        plain_want = hf(input_ids=ids).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want.logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(aux, want.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, plain_want, rtol=1e-4, atol=1e-4)  # no mask: causal + window, no padding


def test_generation_with_cache_equals_full_forward(pair):
    """Token by token through the KV cache (windowed layers, sinks) gives the full forward's last logits."""
    _, _, ours = pair
    ids, _ = _batch()
    with torch.no_grad():
        full = ours(ids[:1])
        cache = ours.new_cache(1, ids.shape[1])
        steps = [ours(ids[:1, t : t + 1], cache=cache) for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_save_writes_the_save_pretrained_layout(pair, tmp_path):
    folder, hf, ours = pair
    save_model(ours, tmp_path / "out")
    ours_keys = set(read_safetensors_header(tmp_path / "out" / "model.safetensors")[0]) - {"__metadata__"}
    theirs = set(read_safetensors_header(folder / "model.safetensors")[0]) - {"__metadata__"}
    assert ours_keys == theirs and "model.layers.0.mlp.experts.gate_up_proj_bias" in ours_keys
    tf = require_oracle("transformers")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    again = load_model(tmp_path / "out")
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)


@pytest.mark.parametrize("rope", [
    dict(factor=8.0, beta_fast=8.0, beta_slow=1.0, original_max_position_embeddings=512),  # truncate: default true
    dict(factor=32.0, truncate=False, original_max_position_embeddings=4096),
    dict(factor=4.0, mscale=0.9, mscale_all_dim=0.7, beta_fast=16, original_max_position_embeddings=256),
    dict(factor=4.0, attention_factor=1.3, original_max_position_embeddings=256),
    dict(factor=None, original_max_position_embeddings=128),  # factor: max_position_embeddings / original
])
def test_yarn_equals_transformers(rope):
    tf = require_oracle("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "yarn", "rope_theta": 10000.0, **rope}
    config = tf.GptOssConfig(**{**_BASE, "head_dim": 16, "rope_parameters": dict(params)})
    want, want_scale = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    ours = ModelConfig.from_hf(_cfg(head_dim=16, rope_parameters=dict(params))).rope_scaling
    torch.testing.assert_close(gpt_oss.yarn_inv_freq(16, 10000.0, ours), want, rtol=0, atol=0)
    assert gpt_oss.yarn_attention_factor(ours) == pytest.approx(want_scale, rel=1e-12)


def test_sink_attention_against_a_dense_reference():
    """With sinks -inf the sink column takes nothing: plain softmax attention."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    got = gpt_oss.sink_attention(q, k, v, torch.full((4,), -math.inf), None, 8**-0.5)
    want = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                            is_causal=True, scale=8**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a large sink takes almost all the weight: outputs near zero
    tiny = gpt_oss.sink_attention(q, k, v, torch.full((4,), 30.0), None, 8**-0.5)
    assert tiny.abs().max() < 1e-6


@pytest.mark.parametrize("window", [None, 3])
def test_sink_attention_in_query_chunks_equals_whole(window):
    """Queries in chunks of 2 rows (each recomputed in backward): the same outputs and gradients as all at once."""
    torch.manual_seed(0)
    T, S = 7, 9  # the last 7 of 9 keys: a cache of 2 before them
    q = torch.randn(2, 4, T, 8, requires_grad=True)
    k, v = torch.randn(2, 2, S, 8, requires_grad=True), torch.randn(2, 2, S, 8, requires_grad=True)
    sinks = torch.randn(4, requires_grad=True)
    mask = None
    if window is not None:
        i, j = torch.arange(T)[:, None] + (S - T), torch.arange(S)[None]
        mask = ((j <= i) & (j > i - window)).expand(2, 1, T, S)
    g = torch.randn(2, 4, T, 8)
    results = []
    for chunk in (10**9, 2 * 2 * 4 * S):  # all rows at once; two query rows per chunk
        out = gpt_oss.sink_attention(q, k, v, sinks, mask, 8**-0.5, chunk_elements=chunk)
        results.append((out, *torch.autograd.grad(out, (q, k, v, sinks), g)))
    for whole, chunked in zip(*results):
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_clamped_swiglu():
    h = torch.tensor([[10.0, -9.0, -1.0, 8.0]])  # (gate, up) pairs interleaved
    got = gpt_oss.clamped_swiglu(h, 1.702, 7.0)
    g, u = torch.tensor([7.0, -1.0]), torch.tensor([-7.0, 7.0])
    torch.testing.assert_close(got[0], (u + 1) * g * torch.sigmoid(1.702 * g))


CFG = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], target_parameters=list(MOE_TARGETS))


def test_expert_lora_training_steps_equal_peft(tmp_path):
    """LoRA on gate_up_proj (E, D, 2F) and down_proj (E, F, D) as PEFT's ParamWrapper holds it for
    transposed storage (lora_A (r*E, in), lora_B (out, r*E)): two SGD steps, losses and adapters equal."""
    peft = require_oracle("peft")
    from safetensors.torch import load_file

    hf = make_hf(tmp_path / "m")
    ours = load_model(tmp_path / "m")
    apply_lora(ours, LoraConfig(**CFG), verbose=False)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.2)
    assert ours.model.layers[0].mlp.experts.lora["gate_up_proj"].lora_A.shape == (2 * 5, 32)  # (r*E, D)
    save_adapter(ours, tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a", is_trainable=True)
    try:
        ours.train()
        pm.train()
        mine = [p for p in ours.parameters() if p.requires_grad]
        theirs = [p for p in pm.parameters() if p.requires_grad]
        assert sum(p.numel() for p in mine) == sum(p.numel() for p in theirs)
        opt_a, opt_b = torch.optim.SGD(mine, lr=0.5), torch.optim.SGD(theirs, lr=0.5)
        for step in range(2):
            torch.manual_seed(10 + step)
            ids = torch.randint(3, 96, (2, 9))
            la, lb = ours.loss(ids, ids), pm(input_ids=ids, labels=ids).loss
            torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
            for opt, loss in ((opt_a, la), (opt_b, lb)):
                opt.zero_grad()
                loss.backward()
                opt.step()
        pm.save_pretrained(tmp_path / "peft")
        save_adapter(ours, tmp_path / "ours")
        a, b = load_file(tmp_path / "ours" / "adapter_model.safetensors"), \
            load_file(tmp_path / "peft" / "adapter_model.safetensors")
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    finally:
        pm.unload()


def _cfg(**over):
    return {"model_type": "gpt_oss", **_BASE, **over}


@pytest.mark.parametrize(("over", "match"), [
    (dict(quantization_config={"quant_method": "bitsandbytes"}), "'bitsandbytes'.* is not supported for gpt_oss"),
    (dict(swiglu_limit=-1), "swiglu_limit must be a positive number"),
    (dict(swiglu_alpha="1.7"), "swiglu_alpha must be a positive number"),
    (dict(attention_dropout=0.1), "attention_dropout 0.1 is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "original_max_position_embeddings"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}),
     "factor must be at least 1"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "beta_fast": "x",
                           "original_max_position_embeddings": 64}), "beta_fast must be a number"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 2.0, "truncate": 1,
                           "original_max_position_embeddings": 64}), "truncate must be true or false"),
    (dict(num_experts_per_tok=6), r"num_experts_per_tok \(6\) is more than the 5 experts"),
])
def test_config_errors_are_named(over, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(_cfg(**over))


def test_defaults_as_transformers_derives_them():
    """The released config.json form (rope_scaling + rope_theta) and the bare defaults."""
    c = ModelConfig.from_hf(_cfg(rope_parameters=None, rope_scaling={**gpt_oss.DEFAULT_ROPE}, rope_theta=150000))
    assert c.rope_theta == 150000.0 and c.rope_scaling["factor"] == 32.0
    bare = {k: v for k, v in _cfg().items() if k not in ("rope_parameters", "sliding_window")}
    d = ModelConfig.from_hf(bare)
    assert d.sliding_window == 128 and d.rope_theta == 150000.0 and d.rope_scaling["rope_type"] == "yarn"


# ---- MXFP4 experts (io/mxfp4.py) ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_dequantize_equals_transformers_bit_for_bit(dtype):
    """Every code and every scale (0..255, the edge cases included) on random blocks."""
    require_oracle("transformers")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from lora_engine.io import mxfp4

    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 64, 4, 16), dtype=torch.uint8)
    scales = torch.arange(256, dtype=torch.int32).repeat(3)[: 3 * 64 * 4].view(3, 64, 4).to(torch.uint8)
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # (E, K, N)
    got = mxfp4.dequantize(blocks, scales, dtype).transpose(1, 2)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got.contiguous().view(bits), want.contiguous().view(bits))


def test_mxfp4_dequantize_errors():
    from lora_engine.io import mxfp4

    with pytest.raises(ValueError, match="blocks and scales are uint8"):
        mxfp4.dequantize(torch.zeros(2, 16, dtype=torch.int8), torch.zeros(2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"blocks \(\.\.\., G, 16\) and scales \(\.\.\., G\) expected"):
        mxfp4.dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))


def _mxfp4_folder(folder, quantized, block_dtype=torch.uint8):
    """The released checkpoints' layout from a tiny model: each expert weight as random MXFP4 blocks and scales
    (scales near 2 ** 0), config.json with quant_method mxfp4. Returns {name: transformers' dequantization}."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    state = load_file(folder / "model.safetensors")
    torch.manual_seed(3)
    dequantized = {}
    for name in [k for k in state if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, K, N = state.pop(name).shape
        blocks = torch.randint(0, 256, (E, N, K // 32, 16), dtype=torch.uint8)
        scales = torch.randint(121, 128, (E, N, K // 32), dtype=torch.uint8)
        state[name + "_blocks"], state[name + "_scales"] = blocks.to(block_dtype), scales
        dequantized[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    quantized.mkdir()
    save_file(state, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    (quantized / "config.json").write_text(json.dumps(cfg))
    return dequantized


def test_mxfp4_checkpoint_loads_dequantized_and_saves_plain(tmp_path):
    tf = require_oracle("transformers")
    hf = make_hf(tmp_path / "m", intermediate_size=32)  # MXFP4 blocks: every expert input a multiple of 32
    dequantized = _mxfp4_folder(tmp_path / "m", tmp_path / "q")
    with torch.no_grad():
        for name, w in dequantized.items():
            hf.get_parameter(name).copy_(w)
    ours = load_model(tmp_path / "q")
    ids, mask = _batch()
    with torch.no_grad():
        want, got = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
    save_model(ours, tmp_path / "out")  # the experts dequantized, under transformers' names
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    keys = set(read_safetensors_header(tmp_path / "out" / "model.safetensors")[0]) - {"__metadata__"}
    assert keys == set(hf.state_dict())
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


def test_mxfp4_checkpoint_errors(tmp_path):
    require_oracle("transformers")
    make_hf(tmp_path / "m", intermediate_size=32)
    _mxfp4_folder(tmp_path / "m", tmp_path / "q", block_dtype=torch.int8)
    with pytest.raises(CheckpointError, match="gate_up_proj_blocks in model.safetensors is torch.int8; MXFP4"):
        load_model(tmp_path / "q")
    make_hf(tmp_path / "m16")  # intermediate_size 16: down_proj's inputs are not whole blocks
    state = json.loads((tmp_path / "m16" / "config.json").read_text())
    state["quantization_config"] = {"quant_method": "mxfp4"}
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "m16" / "model.safetensors")
    tensors["model.layers.0.mlp.experts.down_proj_blocks"] = tensors.pop("model.layers.0.mlp.experts.down_proj").to(
        torch.uint8)
    save_file(tensors, str(tmp_path / "m16" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "m16" / "config.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="down_proj has 16 inputs, not a multiple of MXFP4's block of 32"):
        load_model(tmp_path / "m16")


@pytest.mark.parametrize("quantized", [True, False])
def test_size_check_allows_mxfp4_widening_to_fp32(quantized):
    """A model whose experts are nearly all its weights, in fp32 from MXFP4 (4.25 bits a value): 7.5 times the
    checkpoint's bytes, built (on meta, nothing allocated); the same bytes claimed by a plain checkpoint are not."""
    from lora_engine.models.builder import Checkpoint, build_model

    extra = {"quantization_config": {"quant_method": "mxfp4"}} if quantized else {}
    c = ModelConfig.from_hf(_cfg(hidden_size=2048, intermediate_size=2048, num_hidden_layers=8,
                                 num_local_experts=32, **extra))
    ckpt = Checkpoint(Path("gpt-oss"), c, {}, nbytes=int(8 * 32 * 3 * 2048 * 2048 * 4.25 / 8))
    if quantized:
        assert build_model(c, torch.float32, "meta", checkpoint=ckpt).config is c
    else:
        with pytest.raises(CheckpointError, match="config.json does not describe these weights"):
            build_model(c, torch.float32, "meta", checkpoint=ckpt)


def test_the_train_commands_default_targets_reach_the_experts(pair):
    """gpt-oss has no gate_proj module: the CLI's default list names its experts (PEFT would skip the names
    silently and leave every expert frozen), gate_up_proj at rank 2r as on the other MoE families."""
    from lora_engine import LoraConfig, apply_lora, load_model
    from lora_engine.train.config import ALL_PROJECTIONS

    folder = pair[0]
    model = apply_lora(load_model(folder), LoraConfig(r=2, target_modules=ALL_PROJECTIONS.split(",")),
                       verbose=False)
    assert model.lora_config.target_parameters == ("mlp.experts.down_proj", "mlp.experts.gate_up_proj")
    lora = model.model.layers[0].mlp.experts.lora
    assert (lora["gate_up_proj"].r, lora["down_proj"].r) == (4, 2)
