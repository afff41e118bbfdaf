"""The per-rank plan (python -m lora_engine.plan --world-size N --distributed ddp|fsdp) against reality.

Reality: 2 processes on CPU (gloo), the tiny Llama of tests/test_plan.py sharded by train/fsdp.py's
`shard` and trained two steps by train/step.py's own train_step (each rank its own batch, the loss
normalised by the targets of both), each rank's live tensor storage counted by the same StorageTracker
on real tensors (DTensors as their local shards, FSDP2's resized unsharded parameters followed). The
plan runs rank 0 alone on fake tensors over torch's fake process group. Both count live tensor bytes,
so what differs is what the fake path allocates differently from the real one (and the collectives:
gloo's real all-gather against the fake group's).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lora_engine import plan as P

WORLD = 2
# Wider than test_plan's LLAMA2 so that the weights are most of the peak and sharding them shows.
LLAMA = {"model_type": "llama", "vocab_size": 256, "hidden_size": 256, "intermediate_size": 704,
         "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "hidden_act": "silu",
         "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "torch_dtype": "float32"}
TOLERANCE = 0.05  # as tests/test_plan.py's one-process comparison


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama4")
    (d / "config.json").write_text(json.dumps(LLAMA))
    return d


def _cfg(folder, quantize, world_size=1, distributed=None):
    return P.PlanConfig(model=str(folder), seq_len=128, batch_size=1, quantize=quantize, r=8, precision="fp32",
                        device="cpu", world_size=world_size, distributed=distributed)


def _measure(rank, folder, init_file, out_dir):
    """One rank of a real FSDP run: its peak of live tensor bytes over two train_step calls."""
    from lora_engine.train import step as trainer
    from lora_engine.train.distributed import Dist
    from lora_engine.train.fsdp import local_parameter_bytes, shard
    from lora_engine.train.memory import StorageTracker

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for quantize in ("none", "nf4"):
            cfg = _cfg(folder, quantize, WORLD, "fsdp")
            mc = P.read_config(cfg.model)
            torch.manual_seed(0)
            model = P.materialize(P.meta_model(cfg, mc))
            with torch.no_grad():
                for p in model.parameters():  # to_empty leaves garbage, which NF4 refuses (inf/NaN)
                    p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
            model, _, amp = P.build(cfg, model)
            model = shard(model)
            opt = trainer.make_optimizer(model, lr=1e-4)
            sched = trainer.make_scheduler(opt, 0, 10)
            batch = P.batch_of(cfg.batch_size, cfg.seq_len, mc.vocab_size)
            sync = Dist("fsdp", rank, WORLD, rank, "gloo")
            tracker = StorageTracker()
            with tracker, tracker.follow_fsdp_resizes():
                tracker.track_model(model, opt)
                for _ in range(2):
                    trainer.train_step(model, opt, sched, [batch], amp=amp, sync=sync)
            out[quantize] = {**tracker.report().to_dict(), "local": local_parameter_bytes(model)}
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def measured(llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_plan")
    mp.spawn(_measure, args=(str(llama_dir), str(tmp / "pg"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_fsdp_plan_per_rank_equals_the_measured_peak_of_a_real_two_process_run(llama_dir, measured, quantize):
    planned = P.plan_step(_cfg(llama_dir, quantize, WORLD, "fsdp"))
    assert planned["world_size"] == WORLD and planned["strategy"] == "fsdp"
    for rank in range(WORLD):
        real = measured[rank][quantize]
        assert planned["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=TOLERANCE), (rank, planned, real)
    # what sharding saves shows in the measurement too: each rank holds about half the frozen base
    one = P.plan_step(_cfg(llama_dir, quantize))
    assert measured[0][quantize]["local"]["frozen"] < 0.6 * one["weights"]
    # and half the adapters with their AdamW state (the peak itself need not fall on a model this small:
    # FSDP's gathered layers and whole root unit outweigh the halved base; bench/results/distributed.md
    # shows it falling on SmolLM2-135M)
    assert measured[0][quantize]["adapters_and_optimizer"] < 0.6 * one["adapters_and_optimizer"]


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_fsdp_plan_shrinks_with_the_world_size(llama_dir, quantize):
    plans = {n: P.plan_step(_cfg(llama_dir, quantize, n, "fsdp" if n > 1 else None)) for n in (1, 2, 4)}
    assert plans[1]["peak_bytes"] > plans[2]["peak_bytes"] > plans[4]["peak_bytes"]
    assert plans[1]["adapters_and_optimizer"] > plans[2]["adapters_and_optimizer"] > plans[4]["adapters_and_optimizer"]
    # the activations of the per-rank batch do not shrink
    assert plans[1]["activations"] == plans[2]["activations"] == plans[4]["activations"]


def test_fsdp_shards_are_counted_padded_to_a_multiple_of_the_world_size(llama_dir):
    """3 ranks divide none of the matrices' row counts (256, 64, 704): FSDP pads dim 0 to a multiple of 3
    and each rank holds ceil(rows / 3) rows, which is what the plan counts before the step."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lora_engine.train.fsdp import shard
    from lora_engine.train.memory import StorageTracker
    from lora_engine.train.planning import fake_ranks

    cfg = _cfg(llama_dir, "none", 3, "fsdp")
    meta = P.meta_model(cfg, P.read_config(cfg.model))  # outside the FakeTensorMode (see meta_model)
    with fake_ranks(3) as mesh, FakeTensorMode(allow_non_fake_inputs=True):
        model = shard(P.build(cfg, P.materialize(meta))[0], mesh)
        with StorageTracker() as tracker:
            tracker.track_model(model)
    frozen = tracker.report().breakdown["weights"]
    D, F, kv, V, L = 256, 704, 64, 256, LLAMA["num_hidden_layers"]
    layer = sum(-(-rows // 3) * cols for rows, cols in ((D, D), (kv, D), (kv, D), (D, D), (F, D), (F, D), (D, F)))
    norms = 2 * -(-D // 3)
    root = 2 * -(-V // 3) * D + -(-D // 3)  # embedding, head, final norm
    expected = 4 * (L * (layer + norms) + root)
    assert expected > 4 * (L * (2 * D * D + 2 * kv * D + 3 * D * F + 2 * D) + 2 * V * D + D) / 3  # padding exists
    assert expected <= frozen < expected + 64 * 1024  # + the rotary buffers, whole on every rank


def test_ddp_plan_adds_the_gradient_bucket(llama_dir, monkeypatch):
    """DDP holds one process's step and, after the backward, the flat bucket(s) of the trainable gradients:
    the optimizer phase's peak rises by up to the adapters' gradient bytes (one bucket: they are < 25 MB). Up
    to, not exactly: one process's own optimizer-phase peak is AdamW's, with temporaries the all-reduce
    point does not have."""
    one = P.plan_step(_cfg(llama_dir, "none"))
    ddp = P.plan_step(_cfg(llama_dir, "none", 2, "ddp"))
    assert ddp["strategy"] == "ddp" and ddp["world_size"] == 2
    grads = sum(4 * n for n in _adapter_numels())
    rise = ddp["peak_by_phase"]["optimizer"] - one["peak_by_phase"]["optimizer"]
    assert 0.8 * grads < rise <= grads
    assert ddp["peak_bytes"] >= one["peak_bytes"]


def _adapter_numels():
    D, F, kv, r = 256, 704, 64, 8
    shapes = [(D, D), (D, kv), (D, kv), (D, D), (D, F), (D, F), (F, D)]  # (in, out) of the 7 projections
    return [r * (i + o) for i, o in shapes] * LLAMA["num_hidden_layers"]


def test_command_prints_the_per_rank_plan(llama_dir, capsys):
    P.main(["--model", str(llama_dir), "--seq-len", "64", "--device", "cpu", "--world-size", "2",
            "--distributed", "fsdp", "--json", "--fit", "1GiB"])
    out = capsys.readouterr().out.strip().splitlines()
    last = json.loads(out[-1])
    assert last["world_size"] == 2 and last["strategy"] == "fsdp" and last["peak_bytes"] > 0
    assert any("per rank" in line and "fsdp" in line for line in out)
    P.main(["--model", str(llama_dir), "--seq-len", "64", "--device", "cpu", "--world-size", "2", "--json"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["strategy"] == "ddp"  # the default


@pytest.mark.parametrize("args, match", [
    (["--world-size", "0"], "--world-size must be >= 1"),
    (["--distributed", "fsdp"], "give --world-size N"),
    (["--distributed", "zero"], "invalid choice"),
    (["--world-size", "2", "--distributed", "fsdp", "--gradient-checkpointing", "--offload-activations"],
     "--offload-activations is not implemented with --distributed fsdp"),
    (["--world-size", "2", "--distributed", "fsdp", "--head-on-cpu"], "--head-on-cpu is not implemented"),
])
def test_bad_distributed_flags_are_clear_errors(llama_dir, args, match, capsys):
    with pytest.raises(SystemExit):
        P.main(["--model", str(llama_dir)] + args)
    assert match in capsys.readouterr().err


def test_planning_ranks_inside_a_process_group_is_refused(llama_dir):
    from lora_engine.train.planning import fake_ranks

    with fake_ranks(2), pytest.raises(ValueError, match="a process group is already initialised"):
        P.plan_step(_cfg(llama_dir, "none", 2, "fsdp"))
