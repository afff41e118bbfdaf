"""`python -m lora_engine.train --dry-run`: the config, data, parameter count and memory plan; nothing trained or written."""

from __future__ import annotations

import dataclasses
import os

import pytest

from lora_engine.train.command import main
from lora_engine.train.config import TrainConfig
from lora_engine.train.dry_run import dry_run


def flags(folder, data, out, *more):
    return ["--model", str(folder), "--data", str(data), "--out", str(out), "--max-length", "96", "--batch-size", "4",
            "--r", "4", "--device", "cpu", "--dry-run", *more]


def snapshot(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_dry_run_prints_the_plan_and_leaves_no_folder(folder, data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(flags(folder, data, out)) == 0
    text = capsys.readouterr().out
    for part in ("resolved config:", "dry_run", "data: 40 records", "data quality:", "trainable of",
                 "planned training step on cpu", "peak of live tensors", f"dry run: nothing trained, nothing written "
                                                                          f"({out} untouched)"):
        assert part in text, part
    assert not out.exists()


def test_dry_run_does_not_touch_an_existing_out(folder, data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out), out.stat().st_mtime_ns
    assert main(flags(folder, data, out)) == 0
    assert (snapshot(out), out.stat().st_mtime_ns) == before


def test_dry_run_refuses_what_the_run_would_refuse(folder, data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert main(flags(folder, data, out)) == 2
    assert "holds a run already" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert main(flags(folder, bad, tmp_path / "new")) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_dry_run_counts_the_parameters_the_run_trains(folder, data, tmp_path, finetune):
    from lora_engine.loading import load_model
    from lora_engine.lora.layers import apply_lora, count_parameters
    from lora_engine.train.setup import lora_config
    from lora_engine.train.step import full_finetuning

    cfg = TrainConfig(model=str(folder), data=str(data), out=str(tmp_path / "r"), max_length=96, r=4,
                      device="cpu", finetune=finetune, modules_to_save=None, dry_run=True)
    got = dry_run(cfg, log=lambda _: None)
    model = load_model(str(folder))
    full_finetuning(model) if finetune == "full" else apply_lora(model, lora_config(cfg), verbose=False)
    assert {k: got[k] for k in ("trainable", "total")} == count_parameters(model)
    assert got["plan"]["peak_bytes"] > 0 and got["data"]["rows"] > 0
    assert got["config"] == dataclasses.asdict(cfg)
    assert not os.path.exists(cfg.out)
