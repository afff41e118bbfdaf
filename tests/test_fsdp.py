"""FSDP2 (train/fsdp.py) and DDP (train/distributed.py) on CPU with gloo, 2 processes: sharded LoRA / QLoRA /
QDoRA equals one process, and so does LoRA on every family (tests/families_fixtures.py: MoE experts and
their per-expert LoRA, Qwen3.5's linear-attention layers) sharded and with DDP's gradient all-reduce.

One spawn runs every case; each rank builds the same model twice, trains one copy alone on the whole
global batch (the one-process reference) and shards the other, feeding it its half of the rows with the
loss normalised by the target count of the whole batch. The parent process asserts on what the ranks
report. Tiny llama (tests/hf_models.py): 2 layers, hidden 64, vocab 96; the families' models as tiny.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.families_fixtures import FAMILIES, MOE, make_family
from tests.hf_models import make_hf_model
from tests.kernel_utils import needs_triton

WORLD = 2
STEPS = 3
ROWS, T = 4, 24  # the global batch: each rank takes ROWS // WORLD rows
# name: (quantize, dtype, use_dora); QDoRA adapts q_proj and v_proj only, so the other projections stay
# plain Linear4bit layers (the NF4 base without LoRA) under FSDP, and recomputes each layer in backward
# (gradient checkpointing: the forward, and so the NF4 view, runs again on the re-gathered parameters).
CASES = {
    "lora_fp32": (None, torch.float32, False),
    "lora_bf16": (None, torch.bfloat16, False),
    "qlora": ("nf4", torch.float32, False),
    "qdora": ("nf4", torch.float32, True),
} | {family: (None, torch.float32, False) for family in FAMILIES}  # LoRA on the attention and the experts


def _targets(case):
    """LoraConfig fields of a case: q_proj and v_proj for QDoRA, every projection (and the experts of an
    MoE family; the Qwen3.5 DeltaNet projections) otherwise."""
    from lora_engine.lora.experts import MOE_TARGETS
    from lora_engine.lora.layers import LoraConfig

    if CASES[case][2]:
        return dict(target_modules=("q_proj", "v_proj"))
    if case not in FAMILIES:
        return dict(target_modules=LoraConfig.target_modules)
    modules = ["q_proj", "v_proj", "o_proj"] + (["in_proj_qkv", "out_proj"] if case.startswith("qwen3_5") else [])
    return dict(target_modules=modules, target_parameters=list(MOE_TARGETS) if case in MOE else [])


def _build(folder, case):
    """The case's model with LoRA; folder: the directory holding the llama ("model") and the families."""
    from lora_engine.loading import load_model
    from lora_engine.lora.layers import LoraConfig, apply_lora

    quantize, dtype, dora = CASES[case]
    model = load_model(os.path.join(folder, case if case in FAMILIES else "model"), dtype=dtype, quantize=quantize,
                       verbose=False)
    torch.manual_seed(1)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, use_dora=dora, **_targets(case)), verbose=False)
    with torch.no_grad():  # B != 0, so that A has a gradient at the first step too (the experts' B too)
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0.0, 0.05)
    model.gradient_checkpointing = dora
    return model.train()


def _batches():
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, 96, (ROWS, T), generator=g)
        labels = ids.clone()
        for i in range(ROWS):  # a different number of targets per row: the global count matters
            labels[i, : 2 + 3 * i] = -100
        out.append((ids, labels, int((labels[:, 1:] != -100).sum())))
    return out


def _train(model, parts, gather, sync=None):
    """STEPS AdamW steps; (losses, first-step gradients {name: full tensor}). Each step runs forward and
    backward on each row slice of `parts` in turn (gradient accumulation), every loss normalised by the
    target count of the whole global batch; gather: sum the loss over the ranks (the gradients FSDP sums);
    sync(params): called before each optimizer step (DDP's gradient all-reduce)."""
    from lora_engine.train.fsdp import _full

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    losses, grads = [], {}
    for step, (ids, labels, count) in enumerate(_batches()):
        total = torch.zeros(())
        for rows in parts:
            loss = model.loss(ids[rows], labels[rows], reduction="sum") / count
            loss.backward()
            total += loss.detach()
        if gather:
            dist.all_reduce(total)
        if sync is not None:
            sync([p for p in model.parameters() if p.requires_grad])
        losses.append(total.item())
        if step == 0:
            grads = {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
    return losses, grads


def _nf4_report(model, rank):
    """What each rank holds of the NF4 weights, and what a forward sees and all-gathers."""
    from torch.distributed.tensor import DTensor

    from lora_engine.kernels.nf4_format import NF4Tensor

    modules = [m for m in model.modules() if "weight_packed" in m._parameters]
    rep = {"modules": len(modules), "chunks_ok": True, "local_dtypes": set(), "seen": []}
    for m in modules:
        for part in ("weight_packed", "weight_absmax", "weight_nested_absmax"):
            p = m._parameters.get(part)
            if p is None:
                continue
            full = p.shape[0]
            want = len(torch.arange(full).chunk(WORLD)[rank]) if rank < len(torch.arange(full).chunk(WORLD)) else 0
            rep["chunks_ok"] &= isinstance(p, DTensor) and p.to_local().numel() == want and not p.requires_grad
            rep["local_dtypes"].add((part, p.to_local().dtype))

    def seen(module, args):  # runs after the layer's own pre-hook has built the NF4 view
        w = module.weight
        rep["seen"].append((type(w).__name__, w.packed.dtype, w.packed.numel(), isinstance(w.packed, DTensor),
                            w.numel) if isinstance(w, NF4Tensor) else type(w).__name__)

    handle = modules[0].register_forward_pre_hook(seen)
    return rep, handle


def _gathered_bytes_expected(model):
    """Bytes one forward all-gathers if every parameter travels in its stored dtype: each of them once,
    padded by FSDP to WORLD equal shards along dim 0."""
    total = 0
    for p in model.parameters():
        rest = math.prod(p.shape[1:])
        total += WORLD * math.ceil(p.shape[0] / WORLD) * rest * p.element_size()
    return total


def _run_case(folder, case, rank, out_dir):
    from lora_engine.lora.adapter import save_adapter
    from lora_engine.train import fsdp
    from lora_engine.train.distributed import Dist

    halves = [slice(r * ROWS // WORLD, (r + 1) * ROWS // WORLD) for r in range(WORLD)]
    rows = halves[rank]
    ref = _build(folder, case)  # one process with --grad-accum WORLD: the same row halves, one after the other
    ref_losses, ref_grads = _train(ref, halves, gather=False)
    ddp = Dist("ddp", rank, WORLD, rank, "gloo")
    ddp.broadcast_trainable(replica := _build(folder, case))  # as train/distributed.py:prepare does
    ddp_losses, ddp_grads = _train(replica, [rows], gather=True, sync=ddp.reduce_gradients)
    sharded = fsdp.shard(_build(folder, case))
    out = {"ref_losses": ref_losses, "ref_grads": ref_grads, "ddp_losses": ddp_losses, "ddp_grads": ddp_grads,
           "ddp_state": {n: p.detach().clone() for n, p in replica.named_parameters() if p.requires_grad},
           "ref_state": {n: p.detach().clone() for n, p in ref.named_parameters() if p.requires_grad},
           "ref_bytes": fsdp.local_parameter_bytes(_build(folder, case)),
           "local_bytes": fsdp.local_parameter_bytes(sharded),
           "row_slack": sum(math.prod(p.shape[1:]) * p.element_size() for p in sharded.parameters()
                            if not p.requires_grad),
           "dtypes": {n: p.dtype for n, p in sharded.named_parameters()},
           # (local shape, whole shape) of the experts' 3-D weights, their LoRA and the DeltaNet's parameters
           "shards": {n: (tuple(p.to_local().shape), tuple(p.shape)) for n, p in sharded.named_parameters()
                      if ".experts." in n or ".linear_attn." in n}}
    nf4_handle = None
    if CASES[case][0] == "nf4":
        out["nf4"], nf4_handle = _nf4_report(sharded, rank)
    gathered = [0]
    orig = dist.all_gather_single

    def counting(*args, **kwargs):
        t = kwargs.get("output_tensor", args[0] if args else None)
        gathered[0] += t.numel() * t.element_size()
        return orig(*args, **kwargs)

    dist.all_gather_single = counting
    try:
        ids, labels, count = _batches()[0]
        with torch.no_grad():
            sharded.loss(ids[rows], labels[rows], reduction="sum")
    finally:
        dist.all_gather_single = orig
        if nf4_handle is not None:
            nf4_handle.remove()
    out["gathered"], out["gathered_expected"] = gathered[0], _gathered_bytes_expected(sharded)
    out["losses"], out["grads"] = _train(sharded, [rows], gather=True)
    out["state"] = fsdp.full_trainable_state(sharded)
    with fsdp.gathered_trainable(sharded):
        out["gathered_state"] = {n: p.detach().clone() for n, p in sharded.named_parameters() if p.requires_grad}
        if rank == 0:  # the PEFT adapter files of both runs, written by the one-process code
            save_adapter(sharded, os.path.join(out_dir, "adapters", case, "sharded"))
            save_adapter(ref, os.path.join(out_dir, "adapters", case, "ref"))
    fresh = fsdp.shard(_build(folder, case))  # resume: the one-process state into a sharded model
    fsdp.load_full_trainable_state(fresh, out["ref_state"])
    out["loaded_state"] = fsdp.full_trainable_state(fresh)
    out["restored_is_dtensor"] = all(type(p).__name__ == "DTensor" for p in sharded.parameters() if p.requires_grad)
    return out


def _worker(rank, folder, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {case: _run_case(folder, case, rank, out_dir) for case in CASES}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """[rank 0's report, rank 1's report], each {case: {...}}."""
    tmp = tmp_path_factory.mktemp("fsdp")
    make_hf_model("llama", tmp / "model")
    for family in FAMILIES:
        make_family(family, tmp / family)
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(str(tmp), str(tmp / "pg"), str(tmp)), nprocs=WORLD, join=True)
    reports = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for case in CASES:
        reports[0][case]["adapters"] = tmp / "adapters" / case
    return reports


# Tolerances. The reference is one process with gradient accumulation over the same row halves the ranks
# take (what --grad-accum WORLD does): each rank repeats one micro-batch's arithmetic exactly, and the
# reduce-scatter adds the WORLD = 2 fp32 gradients, a + b, which is the accumulated .grad bit for bit (the
# loss likewise). Observed: identical, in fp32, bf16 and NF4. The tolerance leaves only ulp-level room
# for a BLAS whose kernel choice depends on the address of the (gathered) weight; a wrong normalisation
# (a factor 2), a gradient averaged instead of summed or a shard in the wrong place is off by O(1).
LOSS_TOL = {"rtol": 1e-6, "atol": 0.0}
GRAD_RTOL = 1e-6  # plus 1e-6 of the largest |gradient| absolute, for entries near zero
# AdamW's first step is lr * g / (|g| + eps): an entry whose gradient is near zero turns ulp differences
# into up to lr of difference; 1e-5 relative (1e-3 of the step size lr = 1e-2, absolute) covers that.
STATE_TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_losses_and_gradients_equal_one_process(ranks, case):
    for rank, rep in enumerate(ranks):
        r = rep[case]
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(r["ref_losses"]), **LOSS_TOL,
                                   msg=lambda m, rank=rank: f"{case} rank {rank} losses: {m}")
        assert r["grads"].keys() == r["ref_grads"].keys()
        for n, g in r["ref_grads"].items():
            assert g.abs().max() > 0, f"{case}: {n} has no gradient in the reference: the test would prove nothing"
            torch.testing.assert_close(r["grads"][n], g, rtol=GRAD_RTOL, atol=GRAD_RTOL * g.abs().max().item(),
                                       msg=lambda m, n=n, rank=rank: f"{case} rank {rank} gradient of {n}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_losses_gradients_and_state_equal_one_process(ranks, case):
    """train/distributed.py's DDP (each rank its half, the gradients all-reduced once a step) on the same
    replica start: the sum a + b of the two micro-batches' gradients, as one process accumulates them."""
    for rank, rep in enumerate(ranks):
        r = rep[case]
        torch.testing.assert_close(torch.tensor(r["ddp_losses"]), torch.tensor(r["ref_losses"]), **LOSS_TOL)
        assert r["ddp_grads"].keys() == r["ref_grads"].keys()
        for n, g in r["ref_grads"].items():
            torch.testing.assert_close(r["ddp_grads"][n], g, rtol=GRAD_RTOL, atol=GRAD_RTOL * g.abs().max().item(),
                                       msg=lambda m, n=n, rank=rank: f"{case} rank {rank} gradient of {n}: {m}")
        for n, p in r["ref_state"].items():
            torch.testing.assert_close(r["ddp_state"][n], p, **STATE_TOL, msg=lambda m, n=n: f"{case} {n}: {m}")


@pytest.mark.parametrize("case", list(CASES))
def test_full_trainable_state_after_adamw_steps_equals_one_process(ranks, case):
    for rep in ranks:
        r = rep[case]
        assert r["state"].keys() == r["ref_state"].keys()
        for n, p in r["ref_state"].items():
            got = r["state"][n]
            assert got.device.type == "cpu" and type(got) is torch.Tensor and got.dtype == p.dtype == torch.float32
            torch.testing.assert_close(got, p, **STATE_TOL, msg=lambda m, n=n: f"{case} {n}: {m}")
            torch.testing.assert_close(r["gathered_state"][n], got, rtol=0, atol=0)
            torch.testing.assert_close(r["loaded_state"][n], p, rtol=0, atol=0)  # load_full_trainable_state
        assert r["restored_is_dtensor"], "gathered_trainable did not put the shards back"


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_saved_from_the_sharded_model_equals_one_process(ranks, case):
    from safetensors.torch import load_file

    folder = ranks[0][case]["adapters"]
    ours, ref = load_file(folder / "sharded" / "adapter_model.safetensors"), load_file(
        folder / "ref" / "adapter_model.safetensors")
    # DoRA: q, v x 2 layers x (A, B, m); the families' counts differ (fused, experts): their keys are compared
    assert ours.keys() == ref.keys() and len(ref) == {"qdora": 12}.get(case, 28 if case not in FAMILIES else len(ref))
    for k, t in ref.items():
        torch.testing.assert_close(ours[k], t, **STATE_TOL, msg=lambda m, k=k: f"{case} {k}: {m}")
    assert (folder / "sharded" / "adapter_config.json").read_text() == (folder / "ref" / "adapter_config.json").read_text()


@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_holds_half_of_the_frozen_base_in_its_stored_dtype(ranks, case):
    quantize, dtype, _ = CASES[case]
    total = ranks[0][case]["ref_bytes"]["frozen"]
    local = [rep[case]["local_bytes"]["frozen"] for rep in ranks]
    slack = ranks[0][case]["row_slack"]  # FSDP splits dim 0: a rank holds at most one row more than 1/N
    assert sum(local) == total, (local, total)
    for got in local:
        assert abs(got - total / WORLD) <= slack, (case, got, total, slack)
    for n, dt in ranks[0][case]["dtypes"].items():
        if "lora_" in n:
            assert dt == torch.float32, n  # adapters train in fp32 whatever the base
        elif n.endswith(("weight_packed",)):
            assert dt == torch.uint8, n
        elif not n.endswith(("weight_absmax", "weight_nested_absmax")):
            assert dt == dtype, n  # the frozen base is not cast


@pytest.mark.parametrize("case", [f for f in FAMILIES if f in MOE or f.startswith("qwen3_5")])
def test_experts_and_linear_attention_are_sharded_along_their_first_dimension(ranks, case):
    shards = [rep[case]["shards"] for rep in ranks]
    assert any(".experts.lora." in n for n in shards[0]) == (case in MOE)
    assert any(".linear_attn." in n for n in shards[0]) == case.startswith("qwen3_5")
    for n, (local, whole) in shards[0].items():
        assert local[0] + shards[1][n][0][0] == whole[0] and local[1:] == whole[1:], n
        assert local[0] == -(-whole[0] // WORLD), n  # rank 0 holds the first ceil(rows / 2), rank 1 the rest


@pytest.mark.parametrize("case", ["qlora", "qdora"])
def test_nf4_weight_is_sharded_and_gathered_as_packed_bytes(ranks, case):
    for rep in ranks:
        r = rep[case]["nf4"]
        assert r["modules"] == 14  # 7 projections x 2 layers, all NF4 (lm_head is skipped)
        assert r["chunks_ok"], "a rank does not hold its torch.chunk share of packed/absmax/nested_absmax"
        assert r["local_dtypes"] == {("weight_packed", torch.uint8), ("weight_absmax", torch.uint8),
                                     ("weight_nested_absmax", torch.float32)}
        # In forward the layer sees the whole packed bytes as a plain uint8 tensor: ceil(numel / 2) of them.
        name, dt, n_packed, is_dtensor, numel = r["seen"][0]
        assert (name, dt, is_dtensor) == ("NF4Tensor", torch.uint8, False)
        assert n_packed == (numel + 1) // 2
        # Every parameter crosses the wire exactly once, in its stored dtype: had the NF4 weights been
        # gathered dense (bf16: 2 bytes a weight) the count would be ~4x larger for them.
        assert rep[case]["gathered"] == rep[case]["gathered_expected"]


def test_shard_without_torch_distributed_raises():
    from torch import nn

    from lora_engine.quant import nf4
    from lora_engine.train import fsdp

    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        fsdp.shard(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="Linear.weight must be an NF4Tensor, got Parameter"):
        nf4.expose_nf4_parameters(nn.Linear(2, 2))


@pytest.fixture
def one_rank(tmp_path):
    """A gloo group of one process (this one), and the tiny llama's folder."""
    make_hf_model("llama", tmp_path / "model")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield tmp_path / "model"
    finally:
        dist.destroy_process_group()


def test_shard_refuses_what_it_cannot_shard(one_rank):
    from torch import nn

    from lora_engine.loading import load_model
    from lora_engine.lora.layers import LoraConfig, apply_lora, merge_lora
    from lora_engine.train import fsdp

    with pytest.raises(ValueError, match="expected a CausalLM with decoder layers"):
        fsdp.shard(nn.Sequential(nn.Linear(2, 2)))
    model = apply_lora(load_model(one_rank, verbose=False), LoraConfig(r=2), verbose=False)
    model.offload_activations = True
    with pytest.raises(ValueError, match="activation offloading"):
        fsdp.shard(model)
    model.offload_activations = False
    merge_lora(model)
    with pytest.raises(ValueError, match="has its LoRA merged"):
        fsdp.shard(model)
    sharded = fsdp.shard(apply_lora(load_model(one_rank, verbose=False), LoraConfig(r=2), verbose=False))
    with pytest.raises(ValueError, match="already sharded"):
        fsdp.shard(sharded)


def test_load_full_trainable_state_checks_keys_and_shapes(one_rank):
    from lora_engine.train import fsdp

    model = fsdp.shard(_build(one_rank.parent, "lora_fp32"))
    state = fsdp.full_trainable_state(model)
    name = next(iter(state))
    with pytest.raises(ValueError, match=r"1 trainable parameters missing \(first \['" + name.replace(".", r"\.")):
        fsdp.load_full_trainable_state(model, {k: v for k, v in state.items() if k != name})
    with pytest.raises(ValueError, match="0 trainable parameters missing .* 1 unexpected"):
        fsdp.load_full_trainable_state(model, state | {"extra.lora_A": torch.zeros(1)})
    with pytest.raises(ValueError, match=f"{name} is \\(1, 1\\) in the state"):
        fsdp.load_full_trainable_state(model, state | {name: torch.zeros(1, 1)})


@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=needs_triton)])
def test_every_nf4_backend_runs_on_the_gathered_parameters(one_rank, backend):
    """One rank: the layers compute on FSDP's unsharded Parameters (uint8 packed, uint8 absmax) through each
    NF4 kernel backend, with the same loss and adapter gradients as the unsharded model (same kernels on the
    same values: identical). The NF4 view exists inside forward only."""
    from lora_engine.dispatch import set_backend
    from lora_engine.kernels.nf4_format import NF4Tensor
    from lora_engine.train import fsdp

    ref, sharded = _build(one_rank.parent, "qlora"), fsdp.shard(_build(one_rank.parent, "qlora"))
    layer = sharded.model.layers[0].self_attn.q_proj
    assert layer.weight is None
    seen = []
    layer.register_forward_pre_hook(lambda m, a: seen.append(type(m.weight.packed)))  # after the view is built
    ids, labels, count = _batches()[0]
    grads = []
    for model in (ref, sharded):
        set_backend(model, backend)
        (model.loss(ids, labels, reduction="sum") / count).backward()
        grads.append({n: fsdp._full(p.grad) for n, p in model.named_parameters() if p.requires_grad})
    assert seen == [torch.nn.Parameter] and layer.weight is None and not isinstance(layer.weight, NF4Tensor)
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=GRAD_RTOL, atol=GRAD_RTOL * g.abs().max().item())
