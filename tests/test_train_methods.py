"""Training methods from the command line and the Python path: DoRA, LoRA+ parameter groups,
modules_to_save (trainable embeddings / head)."""

import json
import math

import pytest
import torch
from safetensors import safe_open

from lora_engine.loading import load_model
from lora_engine.lora.adapter import load_adapter
from lora_engine.lora.layers import lora_layers
from lora_engine.train.command import main


def _train(folder, data, out, *flags):
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
               "--r", "4", "--max-length", "96", "--no-general-eval", "--no-plot", "--lr", "1e-2", *flags])
    assert rc == 0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    return out / "adapter"


def test_cli_dora(folder, data, tmp_path):
    adapter = _train(folder, data, tmp_path / "d", "--use-dora", "--target-modules", "q_proj,v_proj")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = f.keys()
    mags = [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == 2 * 2  # 2 layers x (q_proj, v_proj)
    model = load_adapter(load_model(folder), adapter, verbose=False)
    moved = [(m.lora_magnitude_vector - m.dense_weight().norm(dim=1)).abs().max() for _, m in lora_layers(model)]
    assert min(moved) > 0  # two steps at lr 1e-2 trained every magnitude


def test_loraplus_parameter_groups_and_first_step(folder):
    from lora_engine.lora.layers import LoraConfig, apply_lora
    from lora_engine.train import step as trainer

    model = apply_lora(load_model(folder), LoraConfig(r=4, target_modules=("q_proj",), use_dora=True), verbose=False)
    opt = trainer.make_optimizer(model, lr=1e-3, loraplus_lr_ratio=16)
    a, b = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert a["lr"] == 1e-3 and b["lr"] == 16e-3
    assert sorted(names[id(p)].rsplit(".", 1)[1] for p in a["params"]) == ["lora_A"] * 2
    assert sorted(names[id(p)].rsplit(".", 1)[1] for p in b["params"]) == ["lora_B"] * 2 + ["lora_magnitude_vector"] * 2
    ids = torch.randint(0, 64, (2, 9))
    sched = trainer.make_scheduler(opt, 0, 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train_step(model, opt, sched, [{"input_ids": ids, "labels": ids}], max_grad_norm=None)
    for n, p in model.named_parameters():
        if n.endswith("lora_B"):  # Adam's first step moves each entry by about its group's lr
            step = (p.detach() - before[n]).abs().max()
            assert 0.9 * 16e-3 < step <= 16e-3 * 1.001, (n, step)
    assert sched.get_last_lr()[1] == 16 * sched.get_last_lr()[0]
    with pytest.raises(ValueError, match="--loraplus-lr-ratio must be a positive number"):
        trainer.make_optimizer(model, lr=1e-3, loraplus_lr_ratio=0)


def test_cli_loraplus_and_modules_to_save(folder, data, tmp_path):
    with pytest.warns(UserWarning, match="vLLM refuses"):
        adapter = _train(folder, data, tmp_path / "p", "--loraplus-lr-ratio", "8", "--modules-to-save", "lm_head",
                         "--target-modules", "q_proj")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head"]
    model = load_adapter(load_model(folder), adapter, verbose=False)
    assert not torch.equal(model.lm_head.weight, load_model(folder).lm_head.weight)
