"""Full fine-tuning: a few AdamW steps equal transformers' full fine-tuning (loss summed over target tokens / their
count, clipped, the same schedule), tied embeddings stay tied, the saved folder loads in transformers with equal
logits, and `train --finetune full` checkpoints the full weights and optimizer state and writes model/."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lora_engine.export import save_model
from lora_engine.loading import load_model
from lora_engine.train import step as trainer
from lora_engine.train.command import main
from lora_engine.train.config import TrainConfig
from tests.conftest import require_oracle
from tests.hf_models import make_hf_model
from tests.test_train_support import chat_records, write_jsonl

transformers = require_oracle("transformers")


def _batches(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (3, 11), generator=g)
        labels = ids.clone()
        labels[:, :4] = -100  # a prompt
        mask = torch.ones_like(ids)
        mask[1, 8:], labels[1, 8:] = 0, -100  # right padding
        out.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return out


def _hf_loss(model, b):
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    t = b["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=-100,
                           reduction="sum") / (t != -100).sum()


@pytest.mark.parametrize("tie", [True, False])
def test_adamw_steps_equal_transformers_full_finetuning(tmp_path, tie):
    hf = make_hf_model("llama", tmp_path / "base", tie=tie).train()
    ours = trainer.full_finetuning(load_model(tmp_path / "base"))
    assert all(p.requires_grad for p in ours.parameters())
    kw = dict(lr=3e-3, weight_decay=0.01)
    opt = trainer.make_optimizer(ours, **kw)
    sched = trainer.make_scheduler(opt, warmup_steps=1, total_steps=4)
    hf_opt = torch.optim.AdamW([p for p in hf.parameters()], betas=(0.9, 0.999), eps=1e-8, **kw)
    hf_sched = trainer.make_scheduler(hf_opt, warmup_steps=1, total_steps=4)
    assert len(opt.param_groups[0]["params"]) == len(hf_opt.param_groups[0]["params"])  # a tied matrix once
    ours_losses, hf_losses = [], []
    for b in _batches(n=2) * 2:  # each batch twice, so that the second pass shows the learning
        ours_losses.append(trainer.train_step(ours, opt, sched, [b], max_grad_norm=1.0).loss)
        loss = _hf_loss(hf, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()
        hf_opt.zero_grad()
        hf_sched.step()
        hf_losses.append(float(loss.detach()))
    assert ours_losses == pytest.approx(hf_losses, rel=1e-5, abs=1e-6)
    assert ours_losses[2] < ours_losses[0] and ours_losses[3] < ours_losses[1]  # the steps learned, in both alike
    if tie:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
    hf_state = hf.state_dict()
    # atol 3e-5 (1% of lr): Adam moves an element by ~lr per step whatever its gradient's size, so
    # where a gradient is near its rounding noise the two engines' summation orders can move it
    # differently (seen: one element of 7168 off by 1.3e-5 on an AVX2 CPU). A wrong update is off by ~lr.
    for n, p in ours.state_dict().items():
        torch.testing.assert_close(p, hf_state[n], rtol=1e-4, atol=3e-5, msg=n)

    save_model(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = _batches(1, 1)[0]["input_ids"]
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    assert back.config.tie_word_embeddings == tie


def test_full_finetuning_refuses_lora_and_nf4_models(tmp_path):
    from lora_engine.lora.layers import LoraConfig, apply_lora

    make_hf_model("llama", tmp_path / "base")
    with pytest.raises(ValueError, match="carries LoRA layers"):
        trainer.full_finetuning(apply_lora(load_model(tmp_path / "base"), LoraConfig(r=2), verbose=False))
    with pytest.raises(ValueError, match="quantized \\(NF4\\), which cannot be trained"):
        trainer.full_finetuning(load_model(tmp_path / "base", quantize="nf4"))


@pytest.mark.parametrize("flags, match", [
    (dict(quantize="nf4"), "--finetune full trains every weight, which --quantize nf4"),
    (dict(use_dora=True), "--use-dora configure LoRA adapters"),
    (dict(loraplus_lr_ratio=16.0), "--loraplus-lr-ratio configure LoRA adapters"),
])
def test_config_refuses_full_finetuning_with_lora_only_flags(flags, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(finetune="full", **flags)


def test_help_states_the_memory_of_full_finetuning(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "~16 bytes per parameter" in " ".join(capsys.readouterr().out.split())


def test_cli_full_finetuning_checkpoints_and_writes_a_transformers_folder(folder, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    out = tmp_path / "run"
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "3", "--batch-size",
               "4", "--max-length", "64", "--no-general-eval", "--no-plot", "--lr", "1e-3", "--finetune", "full",
               "--gradient-checkpointing", "--eval-every", "2"])
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["loss"] < rows[0]["loss"]
    ckpt = out / "checkpoints" / "step-00000003"
    base = load_model(folder)
    names = {n for n, _ in base.named_parameters()}  # the tied head shares embed_tokens' tensor: once
    with safe_open(ckpt / "trainable.safetensors", "pt") as f:
        assert set(f.keys()) == names
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert len(state["optimizer"]["state"]) == len(names)  # Adam moments for every weight
    assert not (out / "adapter").exists() and (out / "model-best" / "config.json").is_file()
    trained = load_model(out / "model")
    moved = [n for n, p in trained.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(moved) == len(names)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 40, 41, 42, 7, 90]])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, trained.eval()(ids), rtol=1e-5, atol=1e-5)
    assert (out / "model" / "tokenizer.json").is_file()  # the folder is usable as a --model
