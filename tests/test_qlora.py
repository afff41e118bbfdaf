"""QLoRA end to end: LoRA layers on NF4 base weights of the embedded model, trained for 20 steps."""

import pytest
import torch

import lora_engine as le
from lora_engine.data import pipeline as data
from lora_engine.data.embedded import chatterbot_split
from lora_engine.kernels import nf4_reference
from lora_engine.kernels.nf4_format import NF4Tensor
from lora_engine.lora.layers import LoraLinear
from lora_engine.quant.nf4 import quantize
from lora_engine.train import step as trainer


def test_lora_on_an_nf4_base_equals_lora_on_its_dequantized_weight():
    torch.manual_seed(0)
    dense = torch.randn(48, 40)
    w = quantize(dense, blocksize=64)
    q = LoraLinear(w, None, r=4, lora_alpha=8)
    d = LoraLinear(nf4_reference.nf4_dequantize(w, torch.float32), None, r=4, lora_alpha=8)
    with torch.no_grad():
        d.lora_A.copy_(q.lora_A)
        q.lora_B.normal_()
        d.lora_B.copy_(q.lora_B)
    x = torch.randn(3, 5, 40, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    yq, yd = q(x), d(x2)
    torch.testing.assert_close(yq, yd, rtol=1e-6, atol=1e-6)
    yq.square().sum().backward()
    yd.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.lora_A.grad, d.lora_A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.lora_B.grad, d.lora_B.grad, rtol=1e-5, atol=1e-5)
    assert isinstance(q.weight, NF4Tensor)
    with pytest.raises(ValueError, match="merging into 4 bits is lossy"):
        q.merge()


def test_qlora_training_of_the_embedded_model_lowers_the_target_loss(embedded_dir, tmp_path):
    model = le.load_model(embedded_dir, quantize="nf4")
    tok = le.load_tokenizer(embedded_dir)
    le.apply_lora(model, le.LoraConfig(r=16, lora_alpha=32), verbose=False)
    base_layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(base_layers) == 7 * model.config.num_hidden_layers
    assert all(isinstance(m.weight, NF4Tensor) for m in base_layers)

    train_recs, val_recs = chatterbot_split()
    train_rows = data.prepare(data.examples_from_records(train_recs[:80], tok), max_length=64)
    val_rows = data.prepare(data.examples_from_records(val_recs[:24], tok), max_length=64)
    pad = tok.pad_token_id
    val = data.eval_batches(val_rows, 8, pad)
    before = trainer.evaluate(model, val)["loss"]

    trainer.seed_everything(0)
    opt = trainer.make_optimizer(model, lr=1e-3)
    sched = trainer.make_scheduler(opt, warmup_steps=2, total_steps=20)
    for step in range(20):
        rows = [train_rows[(step * 4 + i) % len(train_rows)] for i in range(4)]
        trainer.train_step(model, opt, sched, [data.collate(rows, pad)])
    after = trainer.evaluate(model, val)["loss"]
    print(f"held-out target loss: {before:.4f} -> {after:.4f}")
    assert after < before - 0.1, (before, after)

    # The adapter of a QLoRA run is an ordinary PEFT adapter.
    le.save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
