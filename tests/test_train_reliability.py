"""What a run does when its input or its surroundings go wrong: flags out of range, an --out that holds a run,
a signal, a cut-short metrics line, a disk that refuses writes, an identical preference pair."""

import dataclasses
import errno
import json
import math
import os
import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_engine.cli import run_cli
from lora_engine.train import command, step
from lora_engine.train.command import main
from lora_engine.train.config import _RANGES, TrainConfig, eval_steps, resolve_resume
from lora_engine.train.planning import PlanConfig
from tests.test_train_support import write_jsonl

FLAGS = ("--max-steps", "2", "--batch-size", "4", "--r", "4", "--max-length", "64", "--eval-every", "0",
         "--no-general-eval", "--no-plot", "--warmup-steps", "0", "--precision", "fp32", "--device", "cpu")


def _argv(folder, data, out, *extra):
    return ["--model", str(folder), "--data", str(data), "--out", str(out), *FLAGS, *extra]


# ---- numeric flags ----------------------------------------------------------------------------------
@pytest.mark.parametrize("flag, value, message", [
    ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0, got -1.0"),  # was gradient ascent
    ("--min-lr-ratio", "-5", "--min-lr-ratio must be in [0, 1], got -5.0"),
    ("--lr", "inf", "--lr must be a finite number, got inf"),
    ("--lr", "nan", "--lr must be a finite number, got nan"),
    ("--lora-alpha", "-32", "--lora-alpha must be > 0, got -32.0"),
    ("--weight-decay", "-0.1", "--weight-decay must be >= 0, got -0.1"),
    ("--val-split", "1.5", "--val-split must be in [0, 1), got 1.5"),
    ("--epochs", "inf", "--epochs must be a finite number, got inf"),
    ("--forgetting-threshold", "nan", "--forgetting-threshold must be a finite number"),
    ("--seed", "-3", "--seed must be in [0, 9223372036854775808), got -3"),
])
def test_a_numeric_flag_out_of_range_is_one_error_line(flag, value, message, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(main, [flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {message}" in err and "Traceback" not in err


INT_FIELDS = {f.name for f in dataclasses.fields(TrainConfig) if f.type.startswith("int")}  # argparse gives ints


def _value(name):
    ints = st.integers(min_value=-2**70, max_value=2**70)
    if name in INT_FIELDS:
        return ints
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), ints)


@settings(deadline=None, max_examples=300)
@given(st.data())
def test_any_numeric_flag_value_is_accepted_and_usable_or_refused_by_name(data):
    name = data.draw(st.sampled_from([f for f, *_ in _RANGES]))
    value = data.draw(_value(name))
    try:
        cfg = TrainConfig(**{name: value})
    except ValueError as e:
        assert f"--{name.replace('_', '-')} " in str(e)
        return
    # Accepted: what the run derives from it (the schedule, clipping, the evaluation steps, the seed) works,
    # and every learning rate of the schedule is finite and not negative.
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * 3))
    sched = step.make_scheduler(opt, cfg.warmup_steps, min(total, 50), cfg.min_lr_ratio)
    for _ in range(min(total, 50)):
        p.grad = torch.ones(2)
        torch.nn.utils.clip_grad_norm_([p], cfg.max_grad_norm or float("inf"))
        opt.step()
        sched.step()
        assert all(math.isfinite(lr) and lr >= 0 for lr in sched.get_last_lr())
    eval_steps(min(total, 10**6), cfg.eval_every)
    torch.manual_seed(cfg.seed)


@settings(deadline=None, max_examples=100)
@given(st.sampled_from(["seq_len", "batch_size", "r", "mlp_chunk_size", "loss_chunk_size", "world_size"]),
       st.integers(min_value=-2**40, max_value=2**40))
def test_plan_numeric_flags_are_accepted_or_refused_by_name(name, value):
    try:
        PlanConfig(**{name: value})
    except ValueError as e:
        assert f"--{name.replace('_', '-')} " in str(e)


def test_train_and_plan_refuse_the_same_combination_with_the_same_words():
    with pytest.raises(ValueError, match="--offload-activations offloads the checkpointed hidden states") as t:
        TrainConfig(offload_activations=True)
    with pytest.raises(ValueError, match="--offload-activations offloads the checkpointed hidden states") as p:
        PlanConfig(offload_activations=True)
    assert str(t.value) == str(p.value)
    with pytest.raises(ValueError, match="--offload-activations is not implemented with --distributed fsdp"):
        TrainConfig(distributed="fsdp", gradient_checkpointing=True, offload_activations=True)
    with pytest.raises(ValueError, match="--overwrite starts the run in --out afresh"):
        TrainConfig(overwrite=True, resume="runs/x")


# ---- --out, --overwrite --------------------------------------------------------------------------------
def test_out_holding_a_run_is_refused_and_overwrite_replaces_it_completely(folder, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(folder, data, out, "--max-steps", "4", "--save-every", "2")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    before = (out / "run.json").read_text()
    capsys.readouterr()
    assert run_cli(main, _argv(folder, data, out)) == 2
    err = capsys.readouterr().err
    assert f"error: --out {out} holds a run already (checkpoints, adapter" in err and "--overwrite" in err
    assert (out / "run.json").read_text() == before  # untouched
    (out / "notes.txt").write_text("mine")
    assert main(_argv(folder, data, out, "--overwrite", "--save-every", "1")) == 0
    # The old run's step-4 checkpoint would outrank the new ones for pruning and --resume: gone.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "run.json").read_text())["final_step"] == 2
    assert (out / "notes.txt").read_text() == "mine"  # only what a run writes is deleted
    # Resuming that run continues it: the --overwrite saved in its config.json is not taken up again.
    resumed, ckpt = resolve_resume(TrainConfig(resume=str(out)), {"resume"})
    assert not resumed.overwrite and ckpt.name == "step-00000002"


# ---- signals, resume from a damaged folder -----------------------------------------------------------------
class _SignalAtStep1(command.ProgressBar):
    def update(self, step, loss, lr, tps):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_exits_128_plus_its_number_and_resume_survives_a_cut_short_metrics_line(folder, data, tmp_path,
                                                                                          monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(command, "ProgressBar", _SignalAtStep1)
    assert main(_argv(folder, data, out)) == 128 + signal.SIGTERM == 143
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "interrupted" and m["stopped_by"] == "SIGTERM" and m["final_step"] == 1
    assert (out / "checkpoints/step-00000001").is_dir()
    assert command.exit_status({"status": "interrupted", "stopped_by": "SIGINT"}) == 130
    assert command.exit_status({"status": "interrupted", "stopped_by": "--stop-after 1"}) == 0
    # Power lost mid-write: half a metrics line, and a run.json that is not JSON.
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "loss": 1.2')
    (out / "run.json").write_text("{garbage")
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["--resume", str(out)]) == 0
    text = capsys.readouterr().out
    assert "metrics.jsonl:2 is cut short" in text and "dropped" in text
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "run.json").read_text())["status"] == "completed"


def test_a_damaged_metrics_line_before_the_last_is_one_error_line(folder, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(folder, data, out, "--max-steps", "3", "--stop-after", "2")) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("not json\n" + lines[1] + "\n")
    capsys.readouterr()
    assert run_cli(main, ["--resume", str(out)]) == 2
    assert f"error: {out / 'metrics.jsonl'}:1: not a metrics line" in capsys.readouterr().err


# ---- a disk that refuses writes ----------------------------------------------------------------------------
def test_a_failed_write_is_one_error_line_and_run_json_says_failed(folder, data, tmp_path, monkeypatch, capsys):
    from lora_engine.train import checkpoint

    out = tmp_path / "run"

    def full_disk(out_dir, step, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(checkpoint.checkpoint_dir(out_dir, step)))

    monkeypatch.setattr(checkpoint, "save_checkpoint", full_disk)
    capsys.readouterr()
    assert run_cli(main, _argv(folder, data, out, "--save-every", "1")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = [line for line in err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith(f"error: could not write {out / 'checkpoints' / 'step-00000001'}: "
                                               "No space left on device; the run stopped at step 1")
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "failed" and "No space left on device" in m["error"] and m["final_step"] == 1


# ---- DPO: an identical pair is dropped, not fatal ---------------------------------------------------------------
def test_an_identical_preference_pair_is_dropped_and_counted(folder, tmp_path, capsys):
    from tests.test_dpo_train import pref_records

    data = write_jsonl(tmp_path / "p.jsonl", pref_records(12) + [{"prompt": "q", "chosen": "s", "rejected": "s"}])
    out = tmp_path / "run"
    assert main(_argv(folder, data, out, "--objective", "dpo", "--max-steps", "1")) == 0
    assert f"1 preference pairs dropped: 'chosen' and 'rejected' are identical, nothing to learn ({data}:13)" \
        in capsys.readouterr().out
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["data"]["identical"] == 1 and m["data"]["records"] == 13
