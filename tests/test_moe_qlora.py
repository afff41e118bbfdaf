"""QLoRA on mixture-of-experts models (quant/nf4_experts.py): each expert's 2-D slice in bitsandbytes' NF4 bytes,
the router in full precision, logits equal to the dequantized model's, LoRA on the NF4 experts trains, and the
train command runs with --quantize nf4. Tiny random fp32 models from tests/test_moe_families.py."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_engine import LoraConfig, apply_lora, load_model
from lora_engine.io.safetensors import CheckpointError
from lora_engine.lora.experts import MOE_TARGETS
from lora_engine.quant.nf4 import Linear4bit, dequantize_model, memory_report, quantize_model
from lora_engine.quant.nf4_experts import NF4ExpertWeights
from tests.conftest import require_oracle
from tests.test_moe_families import make_hf


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral", "olmoe"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return folder, make_hf(request.param, folder)


def _moe_layers(model):
    return [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, False)])
def test_expert_bytes_equal_bitsandbytes_per_slice(pair, blocksize, double_quant):
    bnbF = require_oracle("bitsandbytes.functional")
    folder, hf = pair
    ours = load_model(folder, quantize="nf4", blocksize=blocksize, double_quant=double_quant, verbose=False)
    theirs = [layer.mlp for layer in hf.model.layers if hasattr(layer.mlp, "experts")]
    assert len(theirs) == len(_moe_layers(ours)) > 0
    for mlp, ref in zip(_moe_layers(ours), theirs):
        for name in ("gate_up_proj", "down_proj"):
            mine, dense = getattr(mlp.experts, name), getattr(ref.experts, name).detach()
            assert isinstance(mine, NF4ExpertWeights) and mine.shape == dense.shape and len(mine) == dense.shape[0]
            for e in range(dense.shape[0]):
                packed, state = bnbF.quantize_4bit(dense[e].contiguous(), blocksize=blocksize,
                                                   compress_statistics=double_quant, quant_type="nf4")
                assert mine[e].shape == tuple(dense[e].shape)
                assert torch.equal(mine[e].packed, packed.view(-1)), (name, e)
                assert torch.equal(mine[e].absmax, state.absmax), (name, e)
                if double_quant:
                    assert torch.equal(mine[e].nested_absmax, state.state2.absmax), (name, e)
                    assert mine[e].nested_offset == state.offset.item()
        # the router stays in full precision, equal to the checkpoint's
        assert type(mlp.gate) is torch.nn.Linear
        assert torch.equal(mlp.gate.weight, ref.gate.weight.detach())


def test_logits_equal_dequantize_then_dense(pair):
    folder, _ = pair
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    q = load_model(folder, quantize="nf4", verbose=False)
    assert isinstance(q.model.layers[0].self_attn.q_proj, Linear4bit)
    dense = dequantize_model(load_model(folder, quantize="nf4", verbose=False))
    assert all(isinstance(m.experts.gate_up_proj, torch.nn.Parameter) for m in _moe_layers(dense))
    with torch.no_grad():
        torch.testing.assert_close(q(ids), dense(ids), rtol=1e-5, atol=1e-5)
    # and the experts are really 4-bit: the logits moved off the full-precision model's
    with torch.no_grad():
        assert not torch.allclose(q(ids), load_model(folder)(ids), atol=1e-4)


def test_in_memory_quantize_model_matches_quantize_on_load(pair):
    folder, _ = pair
    loaded = load_model(folder, quantize="nf4", verbose=False)
    swapped = quantize_model(load_model(folder))
    for a, b in zip(_moe_layers(loaded), _moe_layers(swapped)):
        assert type(b.gate) is torch.nn.Linear
        for x, y in zip(a.experts.down_proj, b.experts.down_proj):
            assert torch.equal(x.packed, y.packed) and torch.equal(x.absmax, y.absmax)
    r = memory_report(loaded)
    experts = sum(m.experts.gate_up_proj.numel + m.experts.down_proj.numel for m in _moe_layers(loaded))
    assert r["quantized_params"] > experts
    from lora_engine.lora.layers import count_parameters

    assert count_parameters(loaded)["total"] == count_parameters(load_model(folder))["total"]


def test_lora_on_nf4_experts_trains_and_leaves_the_base(pair):
    folder, _ = pair
    model = load_model(folder, quantize="nf4", verbose=False)
    apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=list(MOE_TARGETS)),
               verbose=False)
    before = [s.packed.clone() for m in _moe_layers(model) for s in m.experts.gate_up_proj]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    bs = [p for n, p in model.named_parameters() if "experts.lora" in n and n.endswith("lora_B")]
    assert bs and all(p.abs().sum() > 0 for p in bs)
    after = [s.packed for m in _moe_layers(model) for s in m.experts.gate_up_proj]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_a_moe_checkpoint_saved_in_nf4_is_refused(pair, tmp_path):
    folder, _ = pair
    out = tmp_path / "nf4"
    out.mkdir()
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"] = torch.zeros(4, dtype=torch.uint8)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                     "bnb_4bit_quant_type": "nf4"}
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mixture-of-experts checkpoint saved in NF4 does not load yet"):
        load_model(out)


def test_train_command_with_nf4_on_a_tiny_qwen3_moe_folder(tmp_path):
    """`python -m lora_engine.train --quantize nf4 --target-parameters ...`: two QLoRA steps on an MoE folder."""
    from lora_engine.lora import load_adapter
    from lora_engine.train.command import main
    from tests.test_train_support import VOCAB, chat_records, save_tokenizer_files, write_jsonl

    tf = require_oracle("transformers")
    folder = tmp_path / "moe"
    torch.manual_seed(0)
    config = tf.Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                               num_experts=4, num_experts_per_tok=2, max_position_embeddings=256)
    tf.Qwen3MoeForCausalLM(config).save_pretrained(folder)
    save_tokenizer_files(folder)
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(12))
    out = tmp_path / "run"
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size",
               "4", "--max-length", "64", "--no-general-eval", "--no-plot", "--lr", "1e-2", "--quantize", "nf4",
               "--target-modules", "q_proj,v_proj", "--target-parameters", ",".join(MOE_TARGETS)])
    assert rc == 0
    model = load_adapter(load_model(folder, quantize="nf4", verbose=False), out / "adapter", verbose=False)
    trained = [n for n, p in model.named_parameters() if "experts.lora" in n and n.endswith("lora_B")]
    assert trained and all(model.get_parameter(n).abs().sum() > 0 for n in trained)
