"""The memory plan of a training step (python -m lora_engine.plan's engine; train --auto-memory uses it too).

See lora_engine/plan.py for the method. It lives here, in the train layer, because `train --auto-memory`
plans its own run before training, and the train layer may not import the commands above it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from lora_engine.cli import CliError, option, option_like, parse_dtype, parse_size, user_input
from lora_engine.train.config import TrainConfig, check_range, quantize_method
from lora_engine.train.options import Choices, MemoryOptions, refuse

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")
GiB = 2**30
# Besides live tensors, a CUDA process holds (all assumed, to be measured by bench/gpu_check.sh):
#   the CUDA context and kernel images: ~500 MiB on an H100 with torch 2.x (not in memory_allocated);
#   cuBLAS/cuBLASLt workspaces: up to 32 MiB per handle, through the caching allocator;
#   fragmentation of the caching allocator: blocks reserved but not allocated, a few % of the peak.
CUDA_CONTEXT_BYTES = 512 * 2**20
CUBLAS_WORKSPACE_BYTES = 32 * 2**20
FRAGMENTATION = 0.03


@dataclass
class PlanConfig:
    """The command line of `python -m lora_engine.plan`."""

    model: str = option_like(TrainConfig, "model", help="Hugging Face model folder, its config.json, or an "
                                                           "embedded model name (only the config is read)")
    seq_len: int = option(2048, "tokens per row")
    batch_size: int = option(1, "rows per step")
    quantize: str = option_like(TrainConfig, "quantize")
    r: int = option_like(TrainConfig, "r")
    target_modules: str = option_like(TrainConfig, "target_modules")
    target_parameters: str | None = option_like(TrainConfig, "target_parameters")
    precision: str = option("bf16", f"weights and autocast dtype, {', '.join(PRECISIONS)} (fp32: no autocast)")
    gradient_checkpointing: bool = option_like(TrainConfig, "gradient_checkpointing")
    offload_activations: bool = option(False, "with --gradient-checkpointing: keep the checkpointed hidden "
                                              "states in CPU memory (--device cuda only)")
    mlp_chunk_size: int = option_like(TrainConfig, "mlp_chunk_size")
    loss_chunk_size: int = option_like(TrainConfig, "loss_chunk_size")
    embedding_on_cpu: bool = option_like(TrainConfig, "embedding_on_cpu")
    head_on_cpu: bool = option_like(TrainConfig, "head_on_cpu")
    device: str = option("cuda", "the device planned for", choices=["cpu", "cuda"])
    world_size: int = option(1, "processes (GPUs) the step is spread over, as torchrun --nproc-per-node: the plan "
                                "is per rank, --batch-size rows on each")
    distributed: str | None = option(None, "ddp (the base replicated, gradients all-reduced in buckets) or fsdp "
                                           "(everything sharded 1/N); default ddp when --world-size > 1",
                                     choices=["ddp", "fsdp"])
    fit: str | None = option(None, "find the longest --seq-len whose peak fits this size (e.g. 24GiB, 6GB), "
                                   "by bisection")
    json: bool = option(False, "print the result as one JSON object on the last line")

    def __post_init__(self):
        self.precision = parse_dtype(self.precision, "--precision")
        for name, low in (("seq_len", 1), ("batch_size", 1), ("r", 1), ("mlp_chunk_size", 0),
                          ("loss_chunk_size", 0), ("world_size", 1)):
            check_range(name, getattr(self, name), low, None)
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2 (a token and the next one it predicts), got {self.seq_len}")
        if self.fit is not None:
            parse_size(self.fit, "--fit")
        if self.distributed is not None and self.world_size == 1:
            raise ValueError(f"--distributed {self.distributed} plans several processes: give --world-size N "
                             "with N >= 2")
        refuse(Choices(memory=MemoryOptions.of(self), quantize=quantize_method(self.quantize), strategy=self.strategy,
                       resolved=True, device=self.device, planned=True))
        if not [m for m in self.target_modules.split(",") if m.strip()]:
            raise ValueError("--target-modules is empty; give comma-separated module names, e.g. q_proj,v_proj")

    @property
    def strategy(self) -> str:
        """none, ddp or fsdp, as train/distributed.py resolve_strategy resolves --distributed."""
        return "none" if self.world_size == 1 else self.distributed or "ddp"


def read_config(model: str):
    """The ModelConfig of --model: a folder, a config.json path, or an embedded name (read from its GGUF
    metadata, nothing converted)."""
    from lora_engine.models.config import ModelConfig
    from lora_engine.sources.embedded import EMBEDDED_MODELS, gguf_path

    if model in EMBEDDED_MODELS:
        from lora_engine.sources.gguf import GGUFFile, hf_config

        g = GGUFFile(gguf_path(model))
        try:
            return ModelConfig.from_hf(hf_config(g, model))
        finally:
            g.close()
    p = Path(model)
    if not p.exists():
        raise FileNotFoundError(f"--model {model!r}: no such folder or file; pass a Hugging Face model folder, its "
                                f"config.json, or an embedded model name ({', '.join(EMBEDDED_MODELS)})")
    return ModelConfig.from_hf(p)


def has_linear_attention(model_path: str, model=None) -> bool:
    """Whether the model (the caller's CausalLM, else --model's config.json, nothing loaded) has linear-attention
    layers (Qwen3.5), whose recurrent state runs through a whole row: train refuses --pack for them."""
    config = read_config(model_path) if model is None else getattr(model, "config", None)
    return config is not None and "linear_attention" in config.layer_types


def cuda_workspace(func, args, out) -> int:
    """Bytes a CUDA kernel allocates inside itself at this op, which the CPU op run in its place does not.

    Flash-attention's backward (FlashAttention-2, which SDPA runs for bf16/fp16): an fp32 dq accumulator
    (B, H, T rounded up to 128, hd), fp32 softmax row sums (B, H, T rounded), and for grouped-query
    attention dk and dv expanded to all H heads (B, H, S, hd) before they are summed per KV head.
    """
    import torch

    if func is not torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
        return 0
    q, k = args[1], args[2]
    B, H, T, hd = q.shape
    S, Hk = k.shape[2], k.shape[1]
    t128 = -(-T // 128) * 128
    extra = 4 * B * H * t128 * hd + 4 * B * H * t128
    if Hk != H:
        extra += 2 * B * H * S * hd * k.element_size()
    return extra


def cuda_overhead(peak: int) -> int:
    """What a CUDA process needs besides the planned peak (see the comment above CUDA_CONTEXT_BYTES)."""
    return CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES + int(FRAGMENTATION * peak)


def meta_model(cfg: PlanConfig, model_config):
    """The bare model on the meta device in the planned dtype, as load_model first builds it (models/builder.py;
    outside any FakeTensorMode: a module cast inside one fails to swap its parameters)."""
    from lora_engine.models.builder import build_model

    return build_model(model_config, _dtype(cfg.precision))


def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def materialize(model):
    """meta_model's model given storage on the CPU (fake under a FakeTensorMode, uninitialised otherwise)."""
    from lora_engine.models import builder

    return builder.materialize(model, "cpu")


def _triton_usable() -> bool:
    """dispatch's own answer (its one probe of the Triton kernels), not a second import check."""
    from lora_engine import dispatch

    try:
        dispatch.choose_backend("cpu", "triton")
    except RuntimeError:
        return False
    return True


def build(cfg: PlanConfig, model):
    """The LoRA (or QLoRA) model and its AdamW as train builds them, from a materialized model (its
    weights quantized here with --quantize nf4). Returns (model, optimizer, autocast dtype or None)."""
    from lora_engine import dispatch
    from lora_engine.lora.layers import LoraConfig, apply_lora
    from lora_engine.quant.nf4 import quantize_model
    from lora_engine.train.planning_moe import route_evenly
    from lora_engine.train.step import make_optimizer

    dtype = _dtype(cfg.precision)
    route_evenly(model)  # MoE layers: routing without data (train/planning_moe.py)
    if cfg.quantize == "nf4":
        quantize_model(model)
    targets = tuple(m.strip() for m in cfg.target_modules.split(",") if m.strip())
    params = tuple(m.strip() for m in (cfg.target_parameters or "").split(",") if m.strip())
    with user_input("--target-modules, --target-parameters" if params else "--target-modules"):
        apply_lora(model, LoraConfig(r=cfg.r, lora_alpha=2.0 * cfg.r, target_modules=targets,
                                     target_parameters=params), verbose=False)
    MemoryOptions.of(cfg).apply(model)
    # The kernels the step would run: on a GPU the Triton ones, whose launchers are custom ops with fake
    # implementations (kernels/_common.py:kernel_op), so they run here on fake CPU tensors; on CPU the
    # reference (the C++ dequantizer allocates what the reference does).
    dispatch.set_backend(model, "triton" if cfg.device == "cuda" and _triton_usable() else "torch")
    return model, make_optimizer(model, lr=1e-4), (None if cfg.precision == "fp32" else dtype)


def tracked_steps(model, optimizer, batch: dict, total: int, amp, tracker, steps: int = 2,
                  max_grad_norm: float = 1.0, sync=None):
    """`steps` training steps as train/step.py's train_step runs them (the loss summed over target tokens
    and divided by their count, backward, gradient clipping, AdamW, zero_grad), with the tracker told
    which phase is running. train_step itself reads values (loss finiteness, the norm) that fake tensors
    do not have; everything it allocates is here. total: the batch's target tokens (data.pipeline.n_targets).
    sync: a train.distributed.Dist over the fake process group: its reduce_gradients runs after the
    backward as in train_step (DDP's flat gradient buckets; nothing for FSDP, which reduces in backward)."""
    import torch

    from lora_engine.train.step import micro_batch_loss_sum

    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with tracker.forward_phase():
            part = micro_batch_loss_sum(model, batch, amp) / total
        tracker.set_phase("backward")
        part.backward()
        tracker.set_phase("optimizer")
        if sync is not None:
            sync.reduce_gradients(params)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        tracker.track_optimizer(optimizer)
        optimizer.zero_grad(set_to_none=True)
        del part
        tracker.set_phase("forward")


def host_weights(model) -> tuple:
    """The frozen matrices the planned model keeps in CPU memory (keep_on_host): on the fake CPU tensors of
    a --device cuda plan they look like the rest, so the tracker is told."""
    out = []
    if model.embedding_on_cpu:
        out.append(model.model.embed_tokens.weight)
    if model.head_on_cpu and model.lm_head.weight is not model.model.embed_tokens.weight:
        out.append(model.lm_head.weight)
    return tuple(out)


def batch_of(batch_size: int, seq_len: int, vocab: int) -> dict:
    """A full training batch: every token a target (the most the loss can cost)."""
    import torch

    ids = torch.arange(batch_size * seq_len).reshape(batch_size, seq_len) % vocab
    return {"input_ids": ids, "labels": ids.clone()}


@contextmanager
def fake_ranks(world_size: int):
    """Rank 0 of `world_size` processes, in this one: torch.distributed's fake process group (its collectives
    return at once with their outputs allocated, nothing sent) and the 1-D device mesh FSDP shards over. The
    mesh is made here, outside any FakeTensorMode (its rank tensor must be real). The group is destroyed on
    exit. ValueError when a process group already exists (a plan inside a torchrun run would replace it)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ValueError(f"--world-size {world_size}: a process group is already initialised in this process; "
                         "plan several ranks from a process of its own (python -m lora_engine.plan)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def plan_step(cfg: PlanConfig, model_config=None) -> dict:
    """Plan one configuration: {"peak_bytes", the four parts, "peak_phase", "flops", ...} (bytes), per rank.

    With --world-size N the step is rank 0's, run for real through the fake process group (fake_ranks):
    ddp: the one-process step plus reduce_gradients' flat buckets (train/distributed.py BUCKET_BYTES) after
    the backward; fsdp: the model sharded by train/fsdp.py's own `shard` (fully_shard per layer and the
    root), so the frozen base, adapters, gradients and AdamW state are FSDP's padded 1/N shards, and the
    unsharded parameters are counted while FSDP2 holds them (a layer and the one it prefetches; the root
    unit around model.loss): StorageTracker.follow_fsdp_resizes. Both: --batch-size rows on each rank.
    Not counted: the collectives' internal buffers (NCCL's), and any overlap FSDP's streams allow beyond
    the order they run in here (one stream on fake CPU tensors).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lora_engine.data.pipeline import n_targets
    from lora_engine.train.distributed import Dist
    from lora_engine.train.memory import StorageTracker

    model_config = model_config or read_config(cfg.model)
    on_gpu = cfg.device == "cuda"
    meta = meta_model(cfg, model_config)
    batch = batch_of(cfg.batch_size, cfg.seq_len, model_config.vocab_size)  # real: tiny, and n_targets reads it
    total = n_targets(batch) * cfg.world_size  # train normalises by the global step's targets
    strategy = cfg.strategy
    with fake_ranks(cfg.world_size) if strategy != "none" else nullcontext() as mesh, \
            FakeTensorMode(allow_non_fake_inputs=True):
        model, opt, amp = build(cfg, materialize(meta))
        if strategy == "fsdp":
            from lora_engine.train.fsdp import shard
            from lora_engine.train.step import make_optimizer

            model = shard(model, mesh)
            opt = make_optimizer(model, lr=1e-4)  # over the sharded parameters, as train builds it
        sync = Dist(strategy, 0, cfg.world_size, 0, "fake") if strategy != "none" else None
        tracker = StorageTracker(device_rounding=512 if on_gpu else 1,
                                 extra_workspace=cuda_workspace if on_gpu else None,
                                 host_rounding="pow2" if on_gpu else 1)
        with tracker, tracker.follow_fsdp_resizes() if strategy == "fsdp" else nullcontext():
            tracker.track_model(model, opt, host=host_weights(model))
            tracked_steps(model, opt, batch, total, amp, tracker, sync=sync)
    result = tracker.report().to_dict()
    result["flops"] = result["flops"] // 2  # two steps were counted
    tokens = cfg.batch_size * cfg.seq_len
    result.update(seq_len=cfg.seq_len, batch_size=cfg.batch_size, tokens=tokens, device=cfg.device,
                  world_size=cfg.world_size, strategy=strategy,
                  overhead_bytes=cuda_overhead(result["peak_bytes"]) if on_gpu else 0)
    result["total_bytes"] = result["peak_bytes"] + result["overhead_bytes"]
    return result


def fit(cfg: PlanConfig, budget: int, model_config=None, lo: int = 2, hi: int | None = None) -> tuple[int, dict]:
    """The longest seq_len (a multiple of 64 above 64) whose total_bytes fits `budget`, by bisection, and its plan.

    The peak grows with the length, so bisection holds. Raises CliError when not even `lo` tokens fit.
    """
    import dataclasses

    model_config = model_config or read_config(cfg.model)
    hi = hi or max(model_config.max_position_embeddings, 2048)

    def at(n):
        return plan_step(dataclasses.replace(cfg, seq_len=n, fit=None), model_config)

    best = at(lo)
    if best["total_bytes"] > budget:
        raise CliError(f"--fit {cfg.fit}: not even {lo} tokens fit; the planned peak is {_gib(best['total_bytes'])} "
                       f"(weights alone {_gib(best['weights'])})")
    top = at(hi)
    if top["total_bytes"] <= budget:
        return hi, top
    lo_n, hi_n = lo, hi  # lo fits, hi does not
    while hi_n - lo_n > (1 if hi_n <= 128 else 64):
        mid = (lo_n + hi_n) // 2
        if mid > 128:
            mid -= mid % 64
        r = at(mid)
        if r["total_bytes"] <= budget:
            lo_n, best = mid, r
        else:
            hi_n = mid
    return lo_n, best


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def format_plan(cfg: PlanConfig, r: dict) -> str:
    lines = [f"planned training step on {cfg.device}: {cfg.model}, {cfg.quantize} base, LoRA r={cfg.r}, "
             f"{cfg.precision}, batch {r['batch_size']} x {r['seq_len']} tokens"
             + (", gradient checkpointing" if cfg.gradient_checkpointing else "")
             + (", offloaded activations" if cfg.offload_activations else "")
             + (f", MLP in chunks of {cfg.mlp_chunk_size} tokens" if cfg.mlp_chunk_size else "")
             + (f", loss in chunks of {cfg.loss_chunk_size} tokens" if cfg.loss_chunk_size else "")
             + (", embedding in CPU memory" if cfg.embedding_on_cpu else "")
             + (", head in CPU memory" if cfg.head_on_cpu else "")
             + (f"; per rank of {cfg.world_size} ({r['strategy']}, {cfg.batch_size} rows on each)"
                if cfg.world_size > 1 else ""),
             f"  peak of live tensors  {_gib(r['peak_bytes']):>12}  (during {r['peak_phase']})"]
    for k in ("weights", "adapters_and_optimizer", "activations", "transient"):
        lines.append(f"    {k:<22}{_gib(r[k]):>12}")
    if r.get("host_weight_bytes"):
        lines.append(f"  host memory (weights) {_gib(r['host_weight_bytes']):>12}  (CPU memory, not in the peak)")
    if r.get("offloaded_bytes"):
        lines.append(f"  host memory (offload) {_gib(r['offloaded_bytes']):>12}  (pinned CPU memory, not in the peak)")
    if r["overhead_bytes"]:
        lines.append(f"  + CUDA overhead       {_gib(r['overhead_bytes']):>12}  (context, cuBLAS workspace, "
                     f"{FRAGMENTATION:.0%} fragmentation)")
        lines.append(f"  = total               {_gib(r['total_bytes']):>12}")
    lines.append(f"  FLOPs of one step     {r['flops'] / 1e12:>10.2f} T")
    return "\n".join(lines)


# train --auto-memory: the memory options it switches on, one after another (each keeps the ones before),
# cheapest in step time first. Options only a GPU has (host memory apart from the device's) come last
# among equals and are skipped on --device cpu.
AUTO_OPTIONS = (
    ("loss_chunk_size", 256, False),           # smaller (chunk x vocab) logits: more launches, nothing recomputed
    ("embedding_on_cpu", True, True),          # a (tokens x hidden) copy per micro-batch
    ("gradient_checkpointing", True, False),   # every layer's forward run again in backward (~+1/3 FLOPs)
    ("offload_activations", True, True),       # each layer's input to pinned host memory and back, overlapped
    ("head_on_cpu", True, True),               # the head (V x D) copied to the device once per micro-batch
    ("mlp_chunk_size", 1024, False),           # the MLP recomputed a second time, block by block
)


def auto_memory(cfg: PlanConfig, budget: int, model_config=None) -> tuple[dict, dict]:
    """The options of AUTO_OPTIONS, switched on in order until plan_step(cfg + options) fits `budget` (its
    total_bytes), and that plan: ({name: value} picked, result). Nothing is picked when cfg fits as it is;
    an option already on in cfg stays on. ValueError with the best planned peak when nothing fits."""
    import dataclasses

    model_config = model_config or read_config(cfg.model)
    picked: dict = {}
    result = plan_step(cfg, model_config)
    for name, value, gpu_only in AUTO_OPTIONS:
        if result["total_bytes"] <= budget:
            return picked, result
        if (gpu_only and cfg.device != "cuda") or getattr(cfg, name):
            continue
        picked[name] = value
        result = plan_step(dataclasses.replace(cfg, **picked), model_config)
    if result["total_bytes"] <= budget:
        return picked, result
    raise ValueError(f"--auto-memory {_gib(budget)}: nothing fits a batch of {cfg.batch_size} x {cfg.seq_len} "
                     f"tokens; with every option ({', '.join(picked) or 'all already on'}) the planned peak is "
                     f"{_gib(result['total_bytes'])} (weights alone {_gib(result['weights'])}). Lower "
                     "--batch-size or --max-length, or use --quantize nf4")


def plan_config(cfg: TrainConfig, device, model_path: str) -> PlanConfig:
    """The plan of a run's step: batch_size x max_length tokens (the longest a batch can be) on `device`, in
    --precision's storage dtype, with the run's memory options."""
    import torch

    from lora_engine.train.precision import resolve_precision

    dtype = resolve_precision(device, cfg.precision).storage
    return PlanConfig(model=model_path, seq_len=max(cfg.max_length, 2), batch_size=cfg.batch_size,
                      quantize=cfg.quantize, r=cfg.r, target_modules=cfg.target_modules,
                      precision={torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype],
                      device="cuda" if torch.device(device).type == "cuda" else "cpu",
                      **{name: getattr(cfg, name) for name, _, _ in AUTO_OPTIONS})


def plan_training(cfg: TrainConfig, device, model_path: str, log) -> TrainConfig:
    """train --auto-memory: cfg with the memory options auto_memory picks for its step (batch_size x
    max_length tokens, the longest a batch can be) on `device` within cfg.auto_memory; logs the choice."""
    import dataclasses

    budget = parse_size(cfg.auto_memory, "--auto-memory")
    picked, result = auto_memory(plan_config(cfg, device, model_path), budget)
    log(f"--auto-memory {cfg.auto_memory}: " + (", ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                                                         for k, v in picked.items()) or "no option needed")
        + f"; planned peak {_gib(result['total_bytes'])} for {cfg.batch_size} x {cfg.max_length} tokens")
    return dataclasses.replace(cfg, **picked)
