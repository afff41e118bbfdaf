"""The memory plan (lora_engine/plan.py, lora_engine/train/memory.py) against reality, and its command line.

Reality on CPU: the same model (real, randomly initialised weights: memory does not depend on the
values) trained two steps by train/step.py's own train_step, its live tensor storage counted by the
same StorageTracker on real tensors. The plan runs the step on fake tensors, so any op whose fake
path allocates differently from its real path shows here.
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_engine import plan as P
from lora_engine.train import planning
from lora_engine.train import step as trainer
from lora_engine.train.memory import StorageTracker

LLAMA2 = {"model_type": "llama", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 704,
          "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_act": "silu",
          "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "torch_dtype": "float32"}

@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama2")
    (d / "config.json").write_text(json.dumps(LLAMA2))
    return d


def measured_peak(cfg: P.PlanConfig, model_config) -> int:
    """Two real train_step calls on CPU, live tensor storage counted at every op."""
    torch.manual_seed(0)
    model = P.materialize(P.meta_model(cfg, model_config))
    with torch.no_grad():
        for p in model.parameters():  # to_empty leaves garbage, which NF4 refuses (inf/NaN)
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model, opt, amp = P.build(cfg, model)
    sched = trainer.make_scheduler(opt, 0, 10)
    batch = P.batch_of(cfg.batch_size, cfg.seq_len, model_config.vocab_size)
    tracker = StorageTracker()
    with tracker:
        tracker.track_model(model, opt)
        for _ in range(2):
            trainer.train_step(model, opt, sched, [batch], amp=amp)
    return tracker.report().peak_bytes


def _check(cfg: P.PlanConfig, model_config):
    planned = P.plan_step(cfg, model_config)
    real = measured_peak(cfg, model_config)
    assert planned["peak_bytes"] == pytest.approx(real, rel=0.05), (planned, real)
    assert sum(planned[k] for k in ("weights", "adapters_and_optimizer", "activations", "transient")) \
        == planned["peak_bytes"]


@pytest.mark.parametrize("quantize", ["none", "nf4"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_plan_equals_the_measured_peak_two_layer_llama(llama2_dir, quantize, checkpointing):
    """A vocabulary of 256: the loss chunk is a small part of the peak here; the embedded model tests a real one."""
    cfg = P.PlanConfig(model=str(llama2_dir), seq_len=1024, batch_size=2, quantize=quantize, r=8,
                       precision="fp32", device="cpu", gradient_checkpointing=checkpointing)
    _check(cfg, P.read_config(cfg.model))


def test_plan_equals_the_measured_peak_embedded_model(embedded_home):
    cfg = P.PlanConfig(model="smollm2-135m-instruct", seq_len=128, batch_size=1, r=8, precision="fp32",
                       device="cpu")
    _check(cfg, P.read_config(cfg.model))


def test_the_plan_splits_the_peak_and_counts_flops(llama2_dir):
    cfg = P.PlanConfig(model=str(llama2_dir), seq_len=256, batch_size=1, r=8, precision="fp32", device="cpu")
    r = P.plan_step(cfg)
    # every frozen weight is counted once: embedding + head + 2 layers of 4 attention and 3 MLP matrices + norms
    D, F, V, kv = 256, 704, 256, 2 * 32
    weights = 4 * (2 * V * D + 2 * (D * D * 2 + 2 * D * kv + 3 * D * F + 2 * D) + D)
    assert r["weights"] >= weights and r["weights"] - weights < 64 * 1024  # + rotary buffer
    assert r["adapters_and_optimizer"] > 0 and r["activations"] > 0
    # FLOPs: at least 2 * (forward + input gradient) * frozen linear parameters * tokens
    assert r["flops"] >= 4 * 255 * 2 * (D * D * 2 + 2 * D * kv + 3 * D * F)


def test_cuda_plan_rounds_allocations_and_adds_attention_workspace(llama2_dir, monkeypatch):
    base = dict(model=str(llama2_dir), seq_len=300, batch_size=1, r=8, precision="bf16")
    cpu = P.plan_step(P.PlanConfig(**base, device="cpu"))
    monkeypatch.setattr(planning, "_triton_usable", lambda: False)  # the CPU plan's kernels: only the GPU rules differ
    gpu = P.plan_step(P.PlanConfig(**base, device="cuda"))
    assert gpu["peak_bytes"] > cpu["peak_bytes"]
    assert gpu["overhead_bytes"] >= P.CUDA_CONTEXT_BYTES and gpu["total_bytes"] > gpu["peak_bytes"]


def test_cuda_plan_runs_the_triton_kernels(llama2_dir, monkeypatch):
    """On --device cuda the step goes through the Triton launchers (their fake implementations), as a GPU
    step would, not through the reference."""
    pytest.importorskip("triton")
    from lora_engine.kernels import lora_linear_triton, swiglu_triton

    calls = []
    for mod, name in ((lora_linear_triton, "_fused_mm_op"), (swiglu_triton, "_swiglu_fwd_op")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _n=name: calls.append(_n) or _real(*a))
    base = dict(model=str(llama2_dir), seq_len=64, batch_size=1, r=8, precision="bf16")
    P.plan_step(P.PlanConfig(**base, device="cuda"))
    assert "_fused_mm_op" in calls and "_swiglu_fwd_op" in calls
    calls.clear()
    P.plan_step(P.PlanConfig(**base, device="cpu"))
    assert calls == []


def test_fit_finds_the_longest_length_within_the_budget(llama2_dir):
    cfg = P.PlanConfig(model=str(llama2_dir), r=8, precision="fp32", device="cpu", gradient_checkpointing=True)
    mc = P.read_config(cfg.model)
    budget = P.plan_step(P.PlanConfig(**{**cfg.__dict__, "seq_len": 1000}), mc)["total_bytes"]
    n, r = P.fit(cfg, budget, mc, hi=2048)
    assert 960 <= n <= 1000 and r["total_bytes"] <= budget
    assert P.plan_step(P.PlanConfig(**{**cfg.__dict__, "seq_len": n + 64}), mc)["total_bytes"] > budget


def test_command_prints_json_last(llama2_dir, capsys):
    P.main(["--model", str(llama2_dir / "config.json"), "--seq-len", "64", "--device", "cpu", "--json",
            "--fit", "1GiB"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["max_seq_len"] == 4096 and last["peak_bytes"] > 0  # the whole context fits 1 GiB


@pytest.mark.parametrize("args, match", [
    (["--seq-len", "1"], "--seq-len must be >= 2"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--r", "0"], "--r must be >= 1"),
    (["--fit", "24XB"], "--fit '24XB' is not a size"),
    (["--fit", "0GiB"], "is not a size"),
    (["--offload-activations"], "needs --gradient-checkpointing"),
    (["--offload-activations", "--gradient-checkpointing", "--device", "cpu"], "needs --device cuda"),
    (["--target-modules", ","], "--target-modules is empty"),
])
def test_bad_flags_are_clear_errors(llama2_dir, args, match, capsys):
    with pytest.raises(SystemExit):
        P.main(["--model", str(llama2_dir)] + args)
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("args, match", [
    (["--model", "/no/such/folder"], "no such folder or file"),
    (["--target-modules", "nope_proj"], "--target-modules"),
    (["--fit", "1KiB"], "not even 2 tokens fit"),
])
def test_bad_inputs_are_one_line_errors(llama2_dir, args, match, capsys):
    from lora_engine.cli import run_cli

    argv = (["--model", str(llama2_dir)] if "--model" not in args else []) + args + ["--device", "cpu"]
    assert run_cli(P.main, argv) == 2
    assert match in capsys.readouterr().err
