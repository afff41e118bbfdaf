"""The mixture-of-experts families (models/moe.py) against transformers: logits with a padded batch, the
load-balancing loss, both checkpoint layouts (per-expert 2-D as save_pretrained writes, 3-D as transformers
v5 holds them), save -> load in the family's own layout, and the config errors. Tiny random fp32 models."""

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_engine import load_model
from lora_engine.export import save_model
from lora_engine.io.safetensors import CheckpointError, read_safetensors_header
from lora_engine.models.config import ModelConfig
from tests.conftest import require_oracle
from tests.families_fixtures import make_family

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             output_router_logits=True)
CONFIGS = {
    # layer 1 dense (mlp_only_layers), the others sparse; renormalised top-k
    "qwen3_moe": dict(num_experts=6, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True, mlp_only_layers=[1]),
    "mixtral": dict(num_local_experts=5, intermediate_size=16),
    "olmoe": dict(num_experts=6, intermediate_size=16),  # norm_topk_prob false: its default
}
FAMILIES = tuple(CONFIGS)


def make_hf(family: str, folder, seed: int = 0, **over):
    return make_family(family, folder, seed, fields={**_BASE, **CONFIGS[family], **over})


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, folder)
    return request.param, folder, hf, load_model(folder)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on row 1
    return ids, mask


def test_config_reads_the_family(pair):
    family, _, hf, ours = pair
    c = ours.config
    assert c.model_type == family and c.num_experts == hf.config.num_local_experts == (6 if family != "mixtral" else 5)
    assert c.experts_per_token == 2
    assert c.norm_topk_prob is (family != "olmoe")
    if family == "qwen3_moe":
        assert [c.is_moe_layer(i) for i in range(3)] == [True, False, True]
        assert type(ours.model.layers[1].mlp).__name__ == "MLP"


def test_logits_and_aux_loss_equal_transformers(pair):
    family, _, hf, ours = pair
    ids, mask = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask)
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want.logits[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)


def test_loss_with_router_aux_loss_equals_transformers(pair):
    """router_aux_loss on: cross-entropy + router_aux_loss_coef * aux loss over the real tokens, as transformers'
    loss with output_router_logits; off (the default): the cross-entropy alone."""
    _, _, hf, ours = pair
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 4] = -100  # predicted from a padding position, whose hidden state no two implementations agree on
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, labels=labels)
        plain = ours.loss(ids, labels, attention_mask=mask)
        ours.router_aux_loss = True
        try:
            got = ours.loss(ids, labels, attention_mask=mask)
            summed = ours.loss(ids, labels, attention_mask=mask, reduction="sum")
        finally:
            ours.router_aux_loss = False
    coef = hf.config.router_aux_loss_coef
    torch.testing.assert_close(got, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain, want.loss - coef * want.aux_loss, rtol=1e-5, atol=1e-6)
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(summed / n, got, rtol=1e-5, atol=1e-6)


def test_experts_load_from_the_3d_layout(pair, tmp_path):
    """A folder holding transformers v5's in-memory names (mlp.experts.gate_up_proj (E, 2F, D)) loads too."""
    family, folder, hf, ours = pair
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    names = read_safetensors_header(tmp_path / "model.safetensors")[0]
    assert "model.layers.0.mlp.experts.gate_up_proj" in names
    again = load_model(tmp_path)
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)


def test_save_writes_the_save_pretrained_layout(pair, tmp_path):
    family, folder, hf, ours = pair
    save_model(ours, tmp_path / "out")
    ours_keys = set(read_safetensors_header(tmp_path / "out" / "model.safetensors")[0]) - {"__metadata__"}
    theirs = set(read_safetensors_header(folder / "model.safetensors")[0]) - {"__metadata__"}
    assert ours_keys == theirs
    tf = require_oracle("transformers")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    for k, v in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)


def _cfg(family, **over):
    c = {"model_type": family, **_BASE, **CONFIGS[family], **over}
    return c


@pytest.mark.parametrize(("family", "over", "match"), [
    ("qwen3_moe", dict(num_experts_per_tok=7), r"num_experts_per_tok \(7\) is more than the 6 experts"),
    ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise 0.1"),
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv 8.0"),
    ("qwen3_moe", dict(mlp_only_layers="1"), "mlp_only_layers must list layer numbers"),
    ("olmoe", dict(norm_topk_prob="yes"), "norm_topk_prob must be true or false"),
    ("olmoe", dict(router_aux_loss_coef=-1), "router_aux_loss_coef must be a number >= 0"),
    ("mixtral", dict(num_local_experts=0), "num_local_experts must be from 1"),
])
def test_config_errors_are_named(family, over, match):
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(_cfg(family, **over))


def test_dense_family_with_experts_is_refused():
    with pytest.raises(CheckpointError, match="mixture-of-experts models are not supported"):
        ModelConfig.from_hf({"model_type": "llama", **_BASE, "num_experts": 4})


def test_qwen3_moe_config_as_saved_reads_num_local_experts(tmp_path):
    """save_pretrained writes Qwen3-MoE's expert count as num_local_experts (its attribute map)."""
    cfg = _cfg("qwen3_moe")
    cfg["num_local_experts"] = cfg.pop("num_experts")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ModelConfig.from_hf(tmp_path).num_experts == 6


def test_chunked_mlp_is_refused_for_moe(pair):
    _, _, _, ours = pair
    ours.mlp_chunk_size = 4
    try:
        with pytest.raises(ValueError, match="not supported for mixture-of-experts"):
            ours(torch.tensor([[3, 4, 5]]))
    finally:
        ours.mlp_chunk_size = 0
