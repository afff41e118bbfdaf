"""NF4 on a checkpoint with fused projections (Phi-3 / Phi-4: qkv_proj, gate_up_proj). Each part (q, k, v, gate,
up) is quantized from its own rows: the bytes bitsandbytes' quantize_4bit writes for that part, as for a checkpoint
storing the parts apart (Unsloth's Phi-3 / Phi-4 uploads). Against bitsandbytes on transformers' fused Linear:
the rows are whole blocks (hidden % blocksize == 0), so the 4-bit codes and each block's absmax are the fused
tensor's rows; only double quantization's per-tensor offset of the absmax differs. QLoRA trains."""

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_model
from lora_engine.quant.nf4 import Linear4bit, dequantize_model
from tests.conftest import require_oracle
from tests.test_families import make_hf


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3_nf4")
    return folder, make_hf("phi3", folder)


def _parts(hf, i):
    attn, mlp = hf.model.layers[i].self_attn, hf.model.layers[i].mlp
    q = attn.config.num_attention_heads * attn.head_dim
    kv = attn.config.num_key_value_heads * attn.head_dim
    qkv, gate_up = attn.qkv_proj.weight.detach(), mlp.gate_up_proj.weight.detach()
    F = gate_up.shape[0] // 2
    return {"self_attn.q_proj": qkv[:q], "self_attn.k_proj": qkv[q : q + kv], "self_attn.v_proj": qkv[q + kv :],
            "mlp.gate_proj": gate_up[:F], "mlp.up_proj": gate_up[F:], "self_attn.o_proj": attn.o_proj.weight.detach(),
            "mlp.down_proj": mlp.down_proj.weight.detach()}, {"self_attn.qkv_proj": qkv, "mlp.gate_up_proj": gate_up}


@pytest.mark.parametrize("double_quant", [True, False])
def test_part_bytes_equal_bitsandbytes(phi3, double_quant):
    bnbF = require_oracle("bitsandbytes.functional")
    folder, hf = phi3
    ours = load_model(folder, quantize="nf4", double_quant=double_quant, verbose=False)
    for i, layer in enumerate(ours.model.layers):
        parts, fused = _parts(hf, i)
        for name, w in parts.items():
            mine = layer.get_submodule(name)
            assert isinstance(mine, Linear4bit), name
            packed, state = bnbF.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=double_quant,
                                               quant_type="nf4")
            assert torch.equal(mine.weight.packed, packed.view(-1)), name
            assert torch.equal(mine.weight.absmax, state.absmax), name
        # transformers + bitsandbytes quantize the fused Linear: the same 4-bit codes, row block by row block
        for fused_name, members in (("self_attn.qkv_proj", ("q_proj", "k_proj", "v_proj")),
                                    ("mlp.gate_up_proj", ("gate_proj", "up_proj"))):
            packed, _ = bnbF.quantize_4bit(fused[fused_name].contiguous(), blocksize=64, compress_statistics=False,
                                           quant_type="nf4")
            prefix = fused_name.split(".")[0]
            mine = torch.cat([layer.get_submodule(f"{prefix}.{m}").weight.packed for m in members])
            assert torch.equal(mine, packed.view(-1)), fused_name


def test_forward_equals_dequantized_and_qlora_trains(phi3):
    folder, _ = phi3
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    q = load_model(folder, quantize="nf4", verbose=False)
    dense = dequantize_model(load_model(folder, quantize="nf4", verbose=False))
    with torch.no_grad():
        torch.testing.assert_close(q(ids), dense(ids), rtol=1e-5, atol=1e-5)
    apply_lora(q, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj"]), verbose=False)
    opt = torch.optim.AdamW([p for p in q.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = q.loss(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_a_part_named_in_quantize_skip_stays_full_precision(phi3):
    folder, hf = phi3
    ours = load_model(folder, quantize="nf4", quantize_skip=("lm_head", "v_proj"), verbose=False)
    v = ours.model.layers[0].self_attn.v_proj
    assert type(v) is torch.nn.Linear
    assert torch.equal(v.weight, _parts(hf, 0)[0]["self_attn.v_proj"])
    assert isinstance(ours.model.layers[0].self_attn.q_proj, Linear4bit)
