"""The loop: accumulation normalised over the whole batch, the NaN guard, exact resume, and the CLI end to end."""

import json
import math

import pytest
import torch

from lora_engine.data.pipeline import collate, load_examples, prepare
from lora_engine.train import step as trainer
from lora_engine.train.command import main
from lora_engine.train.config import TrainConfig
from lora_engine.train.loop import TrainingStopped, run
from tests.test_train_support import (
    FakeTokenizer,
    chat_records,
    tiny_lora_model,
    write_jsonl,
)

TOK = FakeTokenizer()


def fresh(folder, dropout=0.0):
    torch.manual_seed(0)
    return tiny_lora_model(folder, dropout=dropout)


def test_accumulation_equals_one_big_batch(folder, tmp_path):
    exs = load_examples(write_jsonl(tmp_path / "d.jsonl", [{"text": "a" * n} for n in (3, 17, 8, 30)]), TOK)
    rows = prepare(exs, 64)
    assert len({len(r.input_ids) for r in rows}) == 4  # unequal lengths: a mean of means would differ
    model = fresh(folder)
    results = []
    for micro in ([collate(rows, 0)], [collate([r], 0) for r in rows]):
        total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        loss, problem = trainer.accumulate_gradients(model, micro, total)
        assert problem is None
        results.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (l1, g1), (l4, g4) = results
    assert l1 == pytest.approx(l4, rel=1e-6)
    for n in g1:
        torch.testing.assert_close(g4[n], g1[n], rtol=1e-5, atol=1e-7)
    # The wrong normalisation (mean of per-micro-batch means) is measurably different here.
    means = sum(float(trainer.micro_batch_loss_sum(model, b).detach()) / max(1, int((b["labels"][:, 1:] != -100).sum()))
                for b in [collate([r], 0) for r in rows]) / 4
    assert abs(means - l1) > 1e-3


def _nan_model(folder):
    model = fresh(folder)
    with torch.no_grad():
        # v_proj's: torch's causal CPU flash attention returns finite outputs for NaN queries or keys
        # (it drops NaN scores), so a NaN in q_proj's adapter would show only in the gradients.
        next(p for n, p in model.named_parameters() if n.endswith("v_proj.lora_A")).fill_(float("nan"))
    return model


def test_nan_guard_stops_or_skips(folder, tmp_path):
    rows = prepare(load_examples(write_jsonl(tmp_path / "d.jsonl", chat_records(4)), TOK), 128)
    micro = [collate(rows, 0)]
    model = _nan_model(folder)
    opt = trainer.make_optimizer(model, 1e-3)
    sched = trainer.make_scheduler(opt, 0, 10)
    with pytest.raises(trainer.NonFiniteError, match=r"step 7: non-finite loss \(nan\) in micro-batch 0 \(rows "):
        trainer.train_step(model, opt, sched, micro, where="step 7")
    before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    res = trainer.train_step(model, opt, sched, micro, on_nonfinite="skip")
    assert res.skipped
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, before[n], rtol=0, atol=0, equal_nan=True)
    assert opt.state == {} or all(not s for s in opt.state.values())  # no Adam moments were touched


def test_train_step_on_micro_batches_built_by_hand(folder):
    """A user's own dicts hold input_ids, labels and attention_mask only (no "where" of data.collate)."""
    ids = torch.tensor([[5, 40, 41, 42, 43, 2], [5, 50, 51, 2, 0, 0]])
    micro = [{"input_ids": ids, "labels": ids.masked_fill(ids == 0, -100),
              "attention_mask": (ids != 0).long()}]
    model = fresh(folder)
    opt = trainer.make_optimizer(model, 1e-3)
    res = trainer.train_step(model, opt, trainer.make_scheduler(opt, 0, 10), micro)
    assert math.isfinite(res.loss) and (res.tokens, res.targets) == (10, 8)
    model = _nan_model(folder)
    opt = trainer.make_optimizer(model, 1e-3)
    with pytest.raises(trainer.NonFiniteError,
                       match=r"^non-finite loss \(nan\) in micro-batch 0 \(input_ids of shape \(2, 6\)\)$"):
        trainer.train_step(model, opt, trainer.make_scheduler(opt, 0, 10), micro)
    nothing = [dict(micro[0], labels=torch.full_like(ids, -100))]
    with pytest.raises(ValueError, match=r"^the accumulated batch has no target token \(all labels are -100\)$"):
        trainer.train_step(model, opt, trainer.make_scheduler(opt, 0, 10), nothing)


def _cfg(out, data, **kw):
    base = dict(model="unused", data=str(data), out=str(out), max_steps=6, batch_size=4, grad_accum=2, lr=5e-3,
                warmup_steps=2, r=4, max_length=96, save_every=2, keep_checkpoints=2, general_eval=False,
                eval_batch_size=8, log_every=1, plot=False)
    base.update(kw)
    return TrainConfig(**base)


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_loss_sequence_exactly(folder, data, tmp_path):
    quiet = lambda *a: None
    # Dropout on, so the resumed run must restore the torch RNG state to match.
    run(_cfg(tmp_path / "straight", data, lora_dropout=0.1), tokenizer=TOK, model=fresh(folder, 0.1), log=quiet)
    m = run(_cfg(tmp_path / "split", data, lora_dropout=0.1, stop_after=3), tokenizer=TOK, model=fresh(folder, 0.1),
            log=quiet)
    assert m["status"] == "interrupted" and m["final_step"] == 3
    assert (tmp_path / "split/checkpoints/step-00000003/adapter/adapter_model.safetensors").is_file()
    # Fresh models (different LoRA init): everything must come from the checkpoint. Resumed once
    # into a new folder (metrics history copied), once into the interrupted run's own folder.
    straight = _losses(tmp_path / "straight")
    for out in (tmp_path / "elsewhere", None):
        torch.manual_seed(123)
        m2 = run(_cfg(out, data, resume=str(tmp_path / "split")), {"resume", "out"} if out else {"resume"},
                 tokenizer=TOK, model=tiny_lora_model(folder, dropout=0.1), log=quiet)
        assert m2["status"] == "completed" and m2["resumed_from"].endswith("step-00000003")
        resumed = _losses(out or tmp_path / "split")
        assert len(straight) == 6 and resumed == straight  # bit-identical, not approximately equal


def _nan_loss_at_step(n: int):
    """trainer.train_step, except that optimizer step n (1-based, global) sees a NaN loss.

    Keyed on the schedule, which advances exactly once per training step (scheduler.last_epoch is
    the number of steps taken), not on a count of forward calls, which evaluations also make.
    """
    real_step, real_loss = trainer.train_step, trainer.micro_batch_loss_sum

    def train_step(model, optimizer, scheduler, micro_batches, *args, **kwargs):
        if scheduler.last_epoch + 1 != n:
            return real_step(model, optimizer, scheduler, micro_batches, *args, **kwargs)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trainer, "micro_batch_loss_sum", lambda *a, **k: real_loss(*a, **k) * float("nan"))
            return real_step(model, optimizer, scheduler, micro_batches, *args, **kwargs)

    return train_step


@pytest.mark.parametrize("bad_step, kept", [(3, ["step-00000002"]), (6, ["step-00000002", "step-00000004"])])
def test_nan_in_a_run_keeps_the_last_good_checkpoint(folder, data, tmp_path, monkeypatch, bad_step, kept):
    monkeypatch.setattr(trainer, "train_step", _nan_loss_at_step(bad_step))
    with pytest.raises(TrainingStopped, match=rf"step {bad_step} \(epoch \d+, rows .*non-finite loss.*last good "
                                              rf"checkpoint \(.*{kept[-1]}\)"):
        # Mid-run evaluations on: their forward calls must not move the step that fails.
        run(_cfg(tmp_path / "r", data, eval_every=2), tokenizer=TOK, model=fresh(folder), log=lambda *a: None)
    manifest = json.loads((tmp_path / "r/run.json").read_text())
    assert manifest["status"] == "failed" and "non-finite" in manifest["error"]
    assert manifest["final_step"] == bad_step - 1
    assert sorted(p.name for p in (tmp_path / "r/checkpoints").iterdir()) == kept  # nothing saved after the NaN
    # Every step before the bad one logged and finite; nothing of the bad step written.
    losses = _losses(tmp_path / "r")
    assert len(losses) == bad_step - 1 and all(math.isfinite(x) for x in losses)


def test_cli_end_to_end(folder, data, tmp_path, capsys):
    from lora_engine import load_adapter, load_model
    from lora_engine.train.lineage import main as runs_main

    out = tmp_path / "run"
    cfg = tmp_path / "c.toml"
    cfg.write_text('lr = 0.005\nmax-length = 96\nr = 4\n')
    rc = main(["--config", str(cfg), "--model", str(folder), "--data", str(data), "--out", str(out),
               "--max-steps", "4", "--batch-size", "4", "--save-every", "2", "--eval-every", "2",
               "--general-tokens", "32"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "resolved config:" in printed and "lr" in printed and "0.005" in printed and "general English ppl" in printed
    for name in ("adapter/adapter_model.safetensors", "adapter-best/adapter_config.json", "metrics.jsonl", "loss.png",
                 "config.json", "run.json", "checkpoints/step-00000004/state.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all({"loss", "lr", "tokens_per_s"} <= set(r) for r in rows)
    assert "val_loss" in rows[1] and "val_loss" not in rows[3]  # the last step is the final evaluation's
    assert [r["target_tokens_seen"] for r in rows] == [sum(r["targets"] for r in rows[: i + 1]) for i in range(4)]
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["config"]["lr"] == 0.005 and m["config"]["r"] == 4
    assert set(m["base_model"]["sha256"]) >= {str(folder / "model.safetensors")}
    assert list(m["data"]["sha256"]) == [str(data)] and m["package_version"] and m["started"] and m["ended"]
    assert {"before", "after", "change"} <= set(m["eval"]) and "general" in m["eval"]["after"]
    # adapter-best/ is the final adapter exactly when the final evaluation is at least as good as step 2's.
    final_is_best = m["eval"]["after"]["target"]["loss"] <= rows[1]["val_loss"]
    same = [(out / d / "adapter_model.safetensors").read_bytes() for d in ("adapter", "adapter-best")]
    assert (same[0] == same[1]) == final_is_best
    model = load_model(folder)
    load_adapter(model, out / "adapter", verbose=False)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
    runs_main(["list", str(tmp_path)])
    assert str(out) in capsys.readouterr().out


def test_cli_rejects_bad_values(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--batch-size", "0"])
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    bad = tmp_path / "c.toml"
    bad.write_text("learning_rate = 1\n")
    from lora_engine.cli import ConfigError

    with pytest.raises(ConfigError, match=r"c.toml: unknown setting 'learning_rate'"):
        main(["--config", str(bad)])


def test_cli_qlora_on_an_nf4_base(folder, data, tmp_path):
    out = tmp_path / "q"
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
               "--r", "4", "--max-length", "96", "--quantize", "nf4", "--no-general-eval", "--no-plot"])
    assert rc == 0 and (out / "adapter/adapter_model.safetensors").is_file()
    m = json.loads((out / "run.json").read_text())
    assert m["config"]["quantize"] == "nf4" and m["status"] == "completed"
    assert all(math.isfinite(json.loads(x)["loss"]) for x in (out / "metrics.jsonl").read_text().splitlines())
