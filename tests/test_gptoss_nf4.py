"""QLoRA on gpt-oss (quant/nf4_experts.py, kernels/moe_nf4.py): each expert's slice as transformers stores it,
(K, N) with gate and up interleaved, in bitsandbytes' NF4 bytes; the biases and the router in full precision;
the forward equal to dequantize-then-matmul; expert LoRA trains; MXFP4 experts go to NF4 one at a time."""

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_model
from lora_engine.io.safetensors import CheckpointError
from lora_engine.lora.experts import MOE_TARGETS
from lora_engine.quant.nf4 import Linear4bit, dequantize_model
from lora_engine.quant.nf4_experts import NF4ExpertWeights
from tests.conftest import require_oracle
from tests.test_gptoss import _batch, _mxfp4_folder, make_hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss_nf4")
    return folder, make_hf(folder, intermediate_size=32)


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (128, False)])
def test_expert_bytes_equal_bitsandbytes_per_stored_slice(pair, blocksize, double_quant):
    bnbF = require_oracle("bitsandbytes.functional")
    folder, hf = pair
    ours = load_model(folder, quantize="nf4", blocksize=blocksize, double_quant=double_quant, verbose=False)
    for mine_layer, ref in zip(ours.model.layers, hf.model.layers):
        mlp = mine_layer.mlp
        for name in ("gate_up_proj", "down_proj"):
            mine, dense = getattr(mlp.experts, name), getattr(ref.mlp.experts, name).detach()
            assert isinstance(mine, NF4ExpertWeights) and mine.shape == dense.shape  # (E, K, N) as stored
            for e in range(dense.shape[0]):
                packed, state = bnbF.quantize_4bit(dense[e].contiguous(), blocksize=blocksize,
                                                   compress_statistics=double_quant, quant_type="nf4")
                assert mine[e].shape == tuple(dense[e].shape)
                assert torch.equal(mine[e].packed, packed.view(-1)), (name, e)
                assert torch.equal(mine[e].absmax, state.absmax), (name, e)
            bias = getattr(mlp.experts, name + "_bias")
            assert isinstance(bias, torch.nn.Parameter)
            assert torch.equal(bias, getattr(ref.mlp.experts, name + "_bias").detach())
        assert type(mlp.router) is torch.nn.Linear  # the router in full precision
        assert torch.equal(mlp.router.weight, ref.mlp.router.weight.detach())
        assert isinstance(mine_layer.self_attn.q_proj, Linear4bit)


def test_forward_equals_dequantize_then_matmul(pair):
    folder, _ = pair
    ids, mask = _batch()
    q = load_model(folder, quantize="nf4", verbose=False)
    dense = dequantize_model(load_model(folder, quantize="nf4", verbose=False))
    assert isinstance(dense.model.layers[0].mlp.experts.gate_up_proj, torch.nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(q(ids, attention_mask=mask), dense(ids, attention_mask=mask), rtol=0, atol=0)
        assert not torch.allclose(q(ids), load_model(folder)(ids), atol=1e-4)  # really 4-bit


def test_qlora_on_experts_trains_and_leaves_the_base(pair):
    folder, _ = pair
    model = load_model(folder, quantize="nf4", verbose=False)
    apply_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=list(MOE_TARGETS)),
               verbose=False)
    experts = model.model.layers[0].mlp.experts
    before = [s.packed.clone() for s in experts.gate_up_proj]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, _ = _batch()
    losses = []
    for _ in range(3):
        loss = model.loss(ids, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    bs = [p for n, p in model.named_parameters() if "experts.lora" in n and n.endswith("lora_B")]
    assert bs and all(p.abs().sum() > 0 for p in bs)
    assert all(torch.equal(x, y.packed) for x, y in zip(before, experts.gate_up_proj))


def test_mxfp4_experts_quantize_to_nf4_on_load(tmp_path):
    """MXFP4 blocks -> dequantized -> NF4, one expert at a time: the bytes of quantizing the dequantized model."""
    require_oracle("transformers")
    make_hf(tmp_path / "m", intermediate_size=32)
    dequantized = _mxfp4_folder(tmp_path / "m", tmp_path / "q")
    q = load_model(tmp_path / "q", quantize="nf4", verbose=False)
    from lora_engine import dispatch

    for name, w in dequantized.items():  # transformers' dequantization, (E, K, N)
        path, _, leaf = name.rpartition(".")
        mine = getattr(q.get_submodule(path), leaf)
        for e in range(w.shape[0]):
            want = dispatch.nf4_quantize(w[e].contiguous(), 64, True, None)
            assert torch.equal(mine[e].packed, want.packed) and torch.equal(mine[e].absmax, want.absmax), (name, e)


def test_a_loader_hook_without_put_expert_is_refused_for_mxfp4():
    from lora_engine.models import gpt_oss

    expected = {"model.layers.0.mlp.experts.down_proj": torch.empty(2, 32, 8, device="meta")}
    with pytest.raises(CheckpointError, match="experts are stored in MXFP4; this loader cannot take them"):
        gpt_oss.read_mxfp4(expected, {"model.layers.0.mlp.experts.down_proj_blocks"}, lambda t: False, "config.json")


def test_nf4_expert_weights_transpose_only_the_last_two_dims():
    w = NF4ExpertWeights([None, None], (2, 3, 4), torch.float32)
    t = w.transpose(1, 2)
    assert t.shape == (2, 4, 3) and t.transposed and not t.transpose(2, 1).transposed
    with pytest.raises(ValueError, match="only the last two dimensions"):
        w.transpose(0, 1)


def test_grouped_op_on_transposed_nf4_experts_equals_the_dense_reference():
    """kernels/moe_nf4.py on (K, N) slices with biases and LoRA: forward and backward equal the per-expert loop on
    the dequantized experts, an expert without tokens included."""
    from lora_engine import dispatch
    from lora_engine.kernels import moe_reference

    torch.manual_seed(0)
    E, K, N, r = 3, 64, 40, 2
    stored = torch.randn(E, K, N)  # gpt-oss's layout
    weights = NF4ExpertWeights([dispatch.nf4_quantize(stored[e], 64, True, None) for e in range(E)], (E, K, N),
                               torch.float32)
    dense = torch.stack([dispatch.nf4_dequantize(s, torch.float32, backend=None) for s in weights])
    counts = torch.tensor([4, 0, 3])
    args = [torch.randn(7, K), torch.randn(E, N), torch.randn(E, r, K), torch.randn(E, N, r)]
    for t in args:
        t.requires_grad_(True)
    x, bias, a, b = args
    got = dispatch.moe_grouped_mm(x, counts, weights.transpose(1, 2), bias, a, b, 0.5)
    want = moe_reference.grouped_lora_mm(x, counts, dense.transpose(1, 2), bias, a, b, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    for mine, ref in zip(torch.autograd.grad(got, args, g), torch.autograd.grad(want, args, g)):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


def test_train_command_with_nf4_on_a_tiny_gpt_oss_folder(tmp_path):
    """`python -m lora_engine.train --quantize nf4 --target-parameters ...` on gpt-oss: two QLoRA steps, the
    expert adapters trained and loadable onto the NF4 model."""
    from lora_engine.lora import load_adapter
    from lora_engine.train.command import main
    from tests.test_gptoss import _BASE
    from tests.test_train_support import VOCAB, chat_records, save_tokenizer_files, write_jsonl

    tf = require_oracle("transformers")
    folder = tmp_path / "gpt_oss"
    torch.manual_seed(0)
    tf.GptOssForCausalLM(tf.GptOssConfig(**{**_BASE, "vocab_size": VOCAB, "intermediate_size": 32})).save_pretrained(
        folder)
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
