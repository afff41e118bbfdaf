"""Training on several processes under torchrun: the process group, the data share, gradient sync, gathered state.

    torchrun --nproc-per-node 2 -m lora_engine.train ... [--distributed ddp|fsdp]

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `init` reads them and joins the process group
(nccl on CUDA, gloo on CPU) with a bounded timeout (--dist-timeout), so a rank whose peer died
raises instead of waiting forever. Without WORLD_SIZE > 1 the strategy is "none" and nothing here
talks to another process: every method of Dist is then free.

The data (loop._one_step): the Batcher is global, the same seed and order on every rank. One optimizer
step takes world x grad_accum micro-batches of that stream and rank r keeps micro-batches r, r +
world, ... (`share`), so N ranks with --grad-accum G train on exactly the rows of one process with
--grad-accum N*G. Each rank divides its token-loss sums by the target tokens of the whole global
step (`sum` of the counts), so the gradients of the ranks add up (SUM, not mean) to the one-process
gradient; the logged loss is the sum of the ranks' parts.

DDP, by hand rather than torch's DistributedDataParallel: after the backward passes of a step the
gradients of the trainable parameters only (LoRA adapters; every weight with --finetune full) are
flattened into ~25 MB buckets and all-reduced once a step (`reduce_gradients`). Why not torch DDP:
our step calls model.loss, not forward (DDP's reducer hooks run from its forward); DDP averages
where the global-token normalisation wants a sum; it broadcasts every parameter and buffer of the
frozen base at wrap time (uint8 NF4 storage included); and its overlap of communication with backward
buys little for adapters, whose gradients are a few MB. One all-reduce per step, after all
micro-batches, is the cheapest a step can be. The frozen base is replicated and has no gradient.

FSDP (--distributed fsdp): train/fsdp.py's `shard` (fully_shard per decoder layer, then the root);
FSDP reduce-scatters the gradients in backward itself, summed (a divide factor of 1), as the
global-token normalisation wants. Saving gathers the trainable parameters (`gathered`) and the optimizer state
(`optimizer_state`) to full tensors, on every rank, which rank 0 writes in train/checkpoint.py's
one-process format: a checkpoint does not depend on the world size, and a run resumes at another.

Agreement: every decision that changes which collectives run next is taken on all ranks together:
a non-finite loss (`any` per micro-batch, before its backward), the stop on a signal (`any` per
step), so that no rank waits in a collective another rank never enters.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

STRATEGIES = ("ddp", "fsdp", "none")
BUCKET_BYTES = 25 * 2**20  # as torch DDP's default bucket_cap_mb


class DistributedError(ValueError):
    """A --distributed choice that cannot run in this environment; the message says what to do."""


def world_from_env(env=os.environ) -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    try:
        return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    except ValueError as e:
        raise DistributedError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them): {e}") from e


def resolve_strategy(choice: str | None, world: int) -> str:
    """--distributed as run: None (the default) is ddp when WORLD_SIZE > 1, else none."""
    if choice is None:
        return "ddp" if world > 1 else "none"
    if choice not in STRATEGIES:
        raise DistributedError(f"--distributed must be one of {', '.join(STRATEGIES)}, got {choice!r}")
    if choice != "none" and world <= 1:
        raise DistributedError(f"--distributed {choice} needs several processes: start the run with torchrun "
                               f"(torchrun --nproc-per-node 2 -m lora_engine.train ...); WORLD_SIZE is {world}")
    if choice == "none" and world > 1:
        raise DistributedError(f"--distributed none under torchrun (WORLD_SIZE={world}) would train {world} "
                               "independent copies into one folder: use --distributed ddp or fsdp, or run one process")
    return choice


def check_combination(cfg, strategy: str) -> None:
    """The option combinations not implemented on several processes, refused by name before anything loads
    (train/options.py holds the rules; here they see the resolved strategy)."""
    from lora_engine.train.options import refuse

    refuse(cfg.choices(strategy=strategy, resolved=True), DistributedError)


@dataclass
class Dist:
    """This process's place in the run; world 1 (strategy "none") makes every method a no-op."""

    strategy: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def to_dict(self) -> dict:
        return {"world_size": self.world, "backend": self.backend, "strategy": self.strategy}

    def device(self, device: torch.device) -> torch.device:
        """The rank's device: cuda:LOCAL_RANK on CUDA (made current), else `device`."""
        if self.active and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    # ---- collectives (every rank calls each, in the same order) --------------------------------
    def share(self, micro: list) -> list:
        """This rank's micro-batches of a global step: numbers rank, rank + world, ..."""
        return micro[self.rank :: self.world]

    def sum(self, values: list[float]) -> list[float]:
        """The sums over ranks (float64, so integer counts below 2**53 stay exact)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        return bool(self.sum([float(flag)])[0]) if self.active else flag

    def first(self, obj):
        """The first rank's non-None object (e.g. the message of the rank that saw a problem)."""
        if not self.active:
            return obj
        objs = [None] * self.world
        torch.distributed.all_gather_object(objs, obj)
        return next((o for o in objs if o is not None), None)

    def gather(self, obj) -> list:
        """Every rank's object, in rank order, on every rank."""
        if not self.active:
            return [obj]
        objs = [None] * self.world
        torch.distributed.all_gather_object(objs, obj)
        return objs

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    @property
    def _comm_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def reduce_gradients(self, params: list[torch.Tensor]) -> None:
        """DDP: the trainable gradients summed over ranks, in ~25 MB flat buckets (one all-reduce each).

        A parameter without a gradient on this rank counts as zeros (every rank must send the same
        layout); with LoRA every adapter gets a gradient on every micro-batch."""
        if not self.active:
            return
        if self.strategy == "fsdp":  # FSDP reduce-scattered them in backward, summed (fsdp.shard's divide factor 1)
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            bucket.append(p)
            size += p.grad.numel() * p.grad.element_size()
            if size >= BUCKET_BYTES:
                _all_reduce_flat(bucket)
                bucket, size = [], 0
        if bucket:
            _all_reduce_flat(bucket)

    def broadcast_trainable(self, model: torch.nn.Module) -> None:
        """Rank 0's trainable parameters on every rank (before sharding), whatever each rank drew or was given."""
        if not self.active:
            return
        with torch.no_grad():
            for p in (p for p in model.parameters() if p.requires_grad):
                torch.distributed.broadcast(p.data, src=0)

    @contextlib.contextmanager
    def gathered(self, model: torch.nn.Module, write_back: bool = False):
        """Within: every trainable parameter held in full (fsdp.gathered_trainable), so save_adapter and the
        checkpoint read whole tensors; write_back shards the values loaded inside back. Without FSDP a no-op."""
        if self.strategy != "fsdp":
            yield
            return
        from lora_engine.train.fsdp import gathered_trainable

        with gathered_trainable(model, write_back):
            yield

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        """opt.state_dict() with every sharded (DTensor) state gathered to a full CPU tensor."""
        from torch.distributed.tensor import DTensor

        sd = opt.state_dict()
        for k in sorted(sd["state"]):  # the same order on every rank: full_tensor is a collective
            sd["state"][k] = {n: v.full_tensor().cpu() if isinstance(v, DTensor) else v
                              for n, v in sd["state"][k].items()}
        return sd

    def shard_optimizer_state(self, opt: torch.optim.Optimizer, sd: dict) -> dict:
        """A full (one-process) optimizer state_dict made to fit `opt`'s parameters: the states of a
        sharded parameter distributed like it, so load_state_dict gives DTensor states."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for g in opt.param_groups for p in g["params"]]
        for k in sorted(sd["state"]):
            p = params[k]
            if isinstance(p, DTensor):
                sd["state"][k] = {n: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                                  if torch.is_tensor(v) and v.shape == p.shape else v
                                  for n, v in sd["state"][k].items()}
        return sd

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def peer_failed(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another rank died or timed out (that rank reports the cause)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(e)
    return (isinstance(e, dist_error) or (isinstance(e, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting"))))


def _all_reduce_flat(params: list[torch.Tensor]) -> None:
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def init(cfg, env=os.environ) -> Dist:
    """Join the process group torchrun describes (or none); the caller closes it (Dist.close)."""
    rank, world, local = world_from_env(env)
    strategy = resolve_strategy(cfg.distributed, world)
    check_combination(cfg, strategy)
    if strategy == "none":
        return Dist()
    cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    return Dist(strategy, rank, world, local, backend)


def prepare(dist: Dist, model: torch.nn.Module) -> torch.nn.Module:
    """The model made ready for the strategy: the same trainable start on every rank, then sharded with FSDP."""
    dist.broadcast_trainable(model)
    if dist.strategy != "fsdp":
        return model
    from lora_engine.train.fsdp import shard

    return shard(model)
