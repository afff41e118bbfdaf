"""Training on 2 processes under torchrun (gloo on CPU) against 1 process with twice the accumulation.

N ranks with --grad-accum G read the rows of one process with --grad-accum N*G and normalise by the
global target count, so per-step losses must agree to fp32 summation order (1e-4 relative, far above
the ~1e-7 seen) and the adapters to what 4 AdamW steps make of such differences (see ADAPTER_TOL).
Each torchrun run is a subprocess with OMP_NUM_THREADS=1 on a 2-layer, hidden-32 model: seconds each.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_engine.train.command import main
from tests.conftest import require_oracle

ROOT = Path(__file__).resolve().parent.parent
# AdamW's first steps move each weight by ~lr whatever the gradient's size, so a gradient component
# near zero whose fp32 sum differs in the last bits can move differently: 4 steps at lr 5e-3 bound
# the movement at 2e-2; 2e-5 absolute is 0.1% of it.
ADAPTER_TOL = dict(rtol=1e-4, atol=2e-5)


def _args(folder, data, out, *extra):
    return ["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "4", "--batch-size", "3",
            "--max-length", "96", "--lr", "5e-3", "--warmup-steps", "1", "--save-every", "2",
            "--keep-checkpoints", "2", "--eval-every", "0", "--no-general-eval", "--no-plot", "--precision", "fp32",
            "--device", "cpu", *extra]


def _torchrun(args, script=("-m", "lora_engine.train"), timeout=150, **env_extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env_extra}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(p):
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def _losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())}


def _same_losses(got: dict, ref: dict):
    assert list(got) == list(ref)
    for s in got:
        assert got[s] == pytest.approx(ref[s], rel=1e-4), s


def _adapter(out):
    return load_file(str(Path(out) / "adapter/adapter_model.safetensors"))


def _same_adapters(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **ADAPTER_TOL)


@pytest.fixture(scope="module")
def one(folder, data, tmp_path_factory):
    """The references: 1 process, --grad-accum 2 (LoRA and QLoRA)."""
    runs = {}
    for name, extra in (("lora", ()), ("qlora", ("--quantize", "nf4"))):
        out = tmp_path_factory.mktemp("one") / name
        assert main(_args(folder, data, out, "--grad-accum", "2", "--r", "4", *extra)) == 0
        runs[name] = out
    return runs


@pytest.fixture(scope="module")
def two(folder, data, tmp_path_factory):
    """The same on 2 processes with --grad-accum 1: DDP LoRA, DDP QLoRA, FSDP LoRA, FSDP QLoRA (NF4 sharded)."""
    runs = {}
    for name, extra in (("ddp", ()), ("ddp-qlora", ("--quantize", "nf4")), ("fsdp", ("--distributed", "fsdp")),
                        ("fsdp-qlora", ("--distributed", "fsdp", "--quantize", "nf4"))):
        out = tmp_path_factory.mktemp("two") / name
        # --lora-r: torchrun's parser would take --r for an abbreviation of its own --rdzv-... flags
        _ok(_torchrun(_args(folder, data, out, "--lora-r", "4", *extra)))
        runs[name] = out
    return runs


@pytest.mark.parametrize("name, ref", [("ddp", "lora"), ("ddp-qlora", "qlora"), ("fsdp", "lora"),
                                       ("fsdp-qlora", "qlora")])
def test_two_processes_equal_one_with_double_accumulation(one, two, name, ref):
    _same_losses(_losses(two[name]), _losses(one[ref]))
    assert _losses(one[ref])[1] != _losses(one[ref])[4]  # it trained
    _same_adapters(_adapter(two[name]), _adapter(one[ref]))
    m = json.loads((two[name] / "run.json").read_text())
    assert m["status"] == "completed" and m["distributed"] == {
        "world_size": 2, "backend": "gloo", "strategy": name.split("-")[0]}
    assert json.loads((two[name] / "checkpoints/step-00000002/meta.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("family", ["qwen3_5_moe_text"])
def test_a_family_trains_on_two_processes_as_on_one(family, tmp_path):
    """`train` under torchrun with LoRA on the experts of Qwen3.5-MoE (linear attention, shared experts, the
    router's aux loss in the model): one family end to end, as the command runs it; every family's losses
    and gradients under DDP and FSDP: tests/test_fsdp.py."""
    from tests.families_fixtures import make_family
    from tests.test_train_support import VOCAB, chat_records, save_tokenizer_files, write_jsonl

    require_oracle("transformers")
    make_family(family, tmp_path / "model", vocab_size=VOCAB)
    save_tokenizer_files(tmp_path / "model")
    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(24))
    lora = ("--target-modules", "q_proj,v_proj", "--target-parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj")
    assert main(_args(tmp_path / "model", data, tmp_path / "one", "--grad-accum", "2", "--r", "4", *lora)) == 0
    for strategy in ("ddp", "fsdp"):
        _ok(_torchrun(_args(tmp_path / "model", data, tmp_path / strategy, "--lora-r", "4", "--distributed", strategy,
                            *lora)))
        _same_losses(_losses(tmp_path / strategy), _losses(tmp_path / "one"))
        _same_adapters(_adapter(tmp_path / strategy), _adapter(tmp_path / "one"))
    assert any(".experts." in k for k in _adapter(tmp_path / "one"))


def test_distributed_adapter_loads_in_peft(folder, two):
    peft, transformers = require_oracle("peft"), require_oracle("transformers")
    from lora_engine import load_adapter, load_model

    ours = load_model(folder)
    load_adapter(ours, two["ddp"] / "adapter", verbose=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, two["ddp"] / "adapter").eval()
    ids = torch.randint(3, 128, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids), theirs(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_two_process_checkpoint_resumes_in_one(folder, data, one, two, tmp_path, name):
    out = tmp_path / "resumed"
    assert main(_args(folder, data, out, "--grad-accum", "2", "--resume",
                      str(two[name] / "checkpoints/step-00000002"))) == 0
    _same_losses(_losses(out), _losses(one["lora"]))  # steps 1-2 copied from the 2-process run, 3-4 trained here
    _same_adapters(_adapter(out), _adapter(one["lora"]))


def test_one_process_checkpoint_resumes_in_two_with_fsdp(folder, data, one, tmp_path):
    out = tmp_path / "resumed"
    # --grad-accum given: a resumed run takes the saved run's (2), which would double the global batch here.
    _ok(_torchrun(_args(folder, data, out, "--distributed", "fsdp", "--grad-accum", "1", "--resume",
                        str(one["lora"] / "checkpoints/step-00000002"))))
    _same_losses(_losses(out), _losses(one["lora"]))
    _same_adapters(_adapter(out), _adapter(one["lora"]))


def test_a_rank_that_raises_stops_the_run_with_the_error_once(folder, data, tmp_path):
    t0 = time.time()
    p = _torchrun(_args(folder, data, tmp_path / "f", "--dist-timeout", "30"), script=("tests/distributed_fault.py",))
    assert p.returncode != 0
    assert time.time() - t0 < 120
    text = p.stdout + p.stderr
    assert text.count("RuntimeError: injected fault on rank 1 in step 2") == 1, text[-4000:]
    assert "error: rank 0 stopped: another rank failed" in text  # one line, not a second traceback
    assert _losses(tmp_path / "f") == {1: pytest.approx(_losses(tmp_path / "f")[1])}  # step 1 logged, nothing after


def test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint(folder, data, tmp_path):
    out = tmp_path / "s"
    p = _torchrun(_args(folder, data, out, "--save-every", "0"), script=("tests/distributed_fault.py",),
                  FAULT="sigterm")
    assert p.returncode != 0, p.stdout[-3000:] + p.stderr[-3000:]  # a stopped run is not a finished one
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "interrupted" and m["final_step"] == 2
    assert (out / "checkpoints/step-00000002/adapter/adapter_model.safetensors").is_file()
    assert "stopped by a signal to another rank at step 2" in p.stdout


@pytest.mark.parametrize("env, extra, message", [
    ({}, ("--distributed", "ddp"), r"--distributed ddp needs several processes: start the run with torchrun"),
    ({}, ("--distributed", "fsdp"), r"--distributed fsdp needs several processes"),
    ({"WORLD_SIZE": "2"}, ("--distributed", "none"), r"--distributed none under torchrun \(WORLD_SIZE=2\) would "
                                                       r"train 2 independent copies"),
    ({"WORLD_SIZE": "2"}, ("--distributed", "fsdp", "--finetune", "full"), r"--finetune full is not implemented "
                                                                           r"with --distributed fsdp"),
    ({"WORLD_SIZE": "2"}, ("--objective", "dpo"), r"--objective dpo is not implemented with --distributed ddp"),
    ({"WORLD_SIZE": "2"}, ("--device", "cuda:1"), r"--device cuda:1 under torchrun: each rank takes "
                                                  r"cuda:LOCAL_RANK"),
])
def test_bad_combinations_are_refused_before_anything_runs(folder, data, tmp_path, monkeypatch, capsys, env, extra,
                                                          message):
    import re

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    args = [a for a in _args(folder, data, tmp_path / "x") if a not in ("--device", "cpu")]
    assert main([*args, *extra]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_dist_timeout_must_be_positive():
    from lora_engine.train.config import TrainConfig

    with pytest.raises(ValueError, match=r"--dist-timeout must be in \(0, 10000000\] seconds, got 0"):
        TrainConfig(dist_timeout=0)
