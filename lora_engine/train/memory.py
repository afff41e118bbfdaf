"""Memory of a training step, counted op by op: live tensor storage, its peak and what it is made of.

    with StorageTracker(device_rounding=512) as t:     # a TorchDispatchMode
        t.track_model(model, optimizer)                # what exists before the step: weights, adapters
        run_step(model, optimizer, batch, amp)         # forward, backward, clip, AdamW step
    t.report()   # {"peak_bytes", "weights", "adapters_and_optimizer", "activations", "transient", ...}

Every op's outputs are looked at as they are made: a storage not seen before is counted (its
nbytes, rounded up to `device_rounding` as the CUDA caching allocator rounds every block to 512
bytes) and a weak reference to it is kept, whose callback uncounts it when the storage dies. So the
count is what the allocator holds for tensors, at every op boundary, and works the same on real
tensors (a measurement) and on fake ones under FakeTensorMode (a plan: shapes only, nothing
computed). What no dispatch mode sees: memory a kernel allocates inside itself and frees before
returning (cuBLAS, SDPA and flash-attention workspaces); `extra_workspace` adds a model of it per op.

The peak is split after the step, from the life of each storage (allocated at event a, freed at
event f, events numbered across the step) against the event of the peak:
  weights                 frozen parameters and buffers, NF4 packed bytes and scales
  adapters_and_optimizer  trainable parameters, their .grad, the optimizer's state
  activations             tensors autograd saved for backward (the saved-tensor hook saw them), and
                          whatever the forward made that was still alive when the forward ended
                          (checkpointed layer inputs, offloaded copies' handles)
  transient               the rest: an op's outputs in flight, backward's gradients of activations,
                          the loss chunk's logits, workspaces
Host memory is counted apart: frozen weights the model keeps in CPU memory (track_model's host=, an
embedding or head: models/decoder.py:keep_on_host) as host_weight_bytes, unrounded; and the copies
lora_engine::offload_to_host makes (models/offload.py:
checkpointed hidden states kept in CPU memory) are never part of the device peak; their own peak
is `offloaded_bytes` (rounded with `host_rounding`: the CUDA pinned-memory allocator hands out
blocks of a power of two bytes).
Sharded models (FSDP2, train/fsdp.py): a DTensor counts its local shard (FSDP's padded shard
storage), and `follow_fsdp_resizes()` follows FSDP2's unsharded parameters, whose storage it
allocates and frees by resizing it (storage.resize_, which no dispatch mode sees): each resize ends
the storage's life and starts a new one of the new size, counted as weights (the gathered layer).
Also the FLOPs of the step: 2*m*n*k per matmul (mm, addmm, bmm, baddbmm) and the attention kernels'
own matmuls (4*B*H*T*S*hd forward, halved when causal; backward 2.5x forward, as flash attention
recomputes the scores).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lora_engine.models import offload  # noqa: F401  (registers torch.ops.lora_engine.offload_to_host)

CATEGORIES = ("weights", "adapters_and_optimizer", "activations", "transient")
aten = torch.ops.aten
OFFLOAD_TO_HOST = torch.ops.lora_engine.offload_to_host.default
_MATMULS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2), aten.bmm.default: (0, 1),
            aten.baddbmm.default: (1, 2), aten.mm.out: (0, 1), aten.addmm.out: (1, 2)}  # out=: NF4 slabs
# attention op -> (is the backward, index of its is_causal argument)
_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu.default: (False, 4),
              aten._scaled_dot_product_flash_attention_for_cpu_backward.default: (True, 7)}


@dataclass
class _Life:
    nbytes: int
    alloc: int                  # event number of the allocation
    phase: str                  # forward, backward, optimizer (when it was allocated)
    free: int | None = None     # event number of the free, None while alive
    kind: str | None = None     # weights / adapters_and_optimizer / saved, when known
    origin: str = ""            # the op that made it and its shape (for `largest`)


@dataclass
class StepMemory:
    """The result of a tracked step (bytes); `by_phase` gives the peak of each phase."""

    peak_bytes: int
    breakdown: dict[str, int]
    peak_phase: str
    by_phase: dict[str, int] = field(default_factory=dict)
    flops: int = 0
    offloaded_bytes: int = 0  # peak of host memory holding offloaded activations (not in peak_bytes)
    host_weight_bytes: int = 0  # frozen weights kept in CPU memory (track_model's host=), not in peak_bytes
    largest: list = field(default_factory=list)  # [(bytes, category, origin)] of the biggest storages at the peak

    def to_dict(self) -> dict:
        return {"peak_bytes": self.peak_bytes, **self.breakdown, "peak_phase": self.peak_phase,
                "peak_by_phase": dict(self.by_phase), "flops": self.flops, "offloaded_bytes": self.offloaded_bytes,
                "host_weight_bytes": self.host_weight_bytes, "largest_at_peak": [list(x) for x in self.largest]}


def _round(nbytes: int, rounding: int | str) -> int:
    if rounding == "pow2":
        return 1 << max(nbytes - 1, 0).bit_length()
    return -(-nbytes // rounding) * rounding if rounding > 1 else nbytes


class StorageTracker(TorchDispatchMode):
    """Counts live tensor storage at every op (see the module docstring).

    device_rounding: allocation granularity in bytes (512 for the CUDA caching allocator, 1 for CPU).
    extra_workspace: optional fn(func, args, out) -> bytes, a kernel's internal workspace counted at
    that op only (allocated and freed inside it) - for the parts of a GPU kernel a CPU run cannot show.
    host_rounding: the same for offloaded host copies: bytes, or "pow2" (CUDA's pinned-memory allocator).
    """

    def __init__(self, device_rounding: int = 1, extra_workspace=None, host_rounding: int | str = 1):
        super().__init__()
        self.rounding = device_rounding
        self.host_rounding = host_rounding
        self.host_live = 0
        self.host_peak = 0
        self.host_weights = 0
        self.extra_workspace = extra_workspace
        self.lives: dict[int, _Life] = {}       # id(storage) -> its life; ids stay valid while alive
        self._refs: dict[int, weakref.ref] = {}
        self.event = 0
        self.live = 0
        self.peak = 0
        self.peak_event = 0
        self.peak_phase = "forward"
        self.phase = "forward"
        self.by_phase: dict[str, int] = {}
        self.flops = 0
        self._kinds_pending: dict[int, str] = {}

    # ---- counting ----------------------------------------------------------------------------
    def _see(self, t: torch.Tensor, kind: str | None = None, origin: str = "") -> None:
        """Count t's storage if it is new (kind "host": in host memory, apart from the device count)."""
        if isinstance(t, DTensor):  # a shard of a parameter (or its gradient, its AdamW state): this rank's part
            t = t._local_tensor
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" and not _is_fake(t):
            return
        try:
            st = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # a tensor without storage (a sparse or nested one)
            return
        key = id(st)
        life = self.lives.get(key)
        if life is not None and life.free is None:
            if kind is not None and life.kind in (None, "saved"):
                life.kind = kind
            return
        host = kind in ("host", "host_weights")
        rounding = 1 if kind == "host_weights" else self.host_rounding if host else self.rounding
        nbytes = _round(st.nbytes(), rounding)
        self.event += 1
        self.lives[key] = _Life(nbytes, self.event, self.phase, kind=kind, origin=origin)
        self._refs[key] = weakref.ref(st, lambda _, k=key: self._freed(k))
        if kind == "host_weights":
            self.host_weights += nbytes
            return
        if host:
            self.host_live += nbytes
            self.host_peak = max(self.host_peak, self.host_live)
            return
        self.live += nbytes
        self._note_peak(self.live)

    def _freed(self, key: int) -> None:
        life = self.lives.pop(key, None)
        self._refs.pop(key, None)
        if life is None:
            return
        self.event += 1
        life.free = self.event
        if life.kind == "host_weights":
            self.host_weights -= life.nbytes
        elif life.kind == "host":
            self.host_live -= life.nbytes
        else:
            self.live -= life.nbytes
        self._dead.append(life)

    def _resized(self, t: torch.Tensor) -> None:
        """t's storage was just resized in place (FSDP2's alloc_storage / free_storage): the old size's life
        ends here, and a new one of the new size (0 bytes while freed) starts, as the allocator sees it."""
        st = t.untyped_storage()
        key = id(st)
        life = self.lives.get(key)
        nbytes = _round(st.nbytes(), self.rounding)
        if life is None:
            if nbytes:
                self._see(t, "weights", f"FSDP all-gather {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
            return
        if life.nbytes == nbytes:
            return
        self.event += 1
        life.free = self.event
        self.live -= life.nbytes
        self._dead.append(life)
        self.lives[key] = _Life(nbytes, self.event, self.phase, kind="weights", origin=life.origin)
        self.live += nbytes
        self._note_peak(self.live)

    @contextmanager
    def follow_fsdp_resizes(self):
        """Within: FSDP2's unsharded-parameter storages counted as FSDP resizes them (see the module
        docstring). torch's own functions are wrapped, not changed; RuntimeError if this torch has none."""
        from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

        if not all(callable(getattr(m, n, None)) for m, n in ((_fsdp_param, "alloc_storage"),
                                                               (_fsdp_param, "free_storage"),
                                                               (_fsdp_param_group, "alloc_storage"))):
            raise RuntimeError(f"StorageTracker: torch {torch.__version__}'s FSDP2 has no alloc_storage/free_storage "
                               "to follow; the per-rank count of a sharded model needs them")
        saved = [(m, n, getattr(m, n)) for m, n in ((_fsdp_param, "alloc_storage"), (_fsdp_param, "free_storage"),
                                                     (_fsdp_param_group, "alloc_storage"))]

        def wrap(fn):
            def resize(tensor):
                fn(tensor)
                self._resized(tensor)
            return resize

        try:
            for m, n, fn in saved:
                setattr(m, n, wrap(fn))
            yield self
        finally:
            for m, n, fn in saved:
                setattr(m, n, fn)

    def _note_peak(self, total: int) -> None:
        self.by_phase[self.phase] = max(self.by_phase.get(self.phase, 0), total)
        if total > self.peak:
            self.peak, self.peak_event, self.peak_phase = total, self.event, self.phase
            self._peak_extra = total - self.live  # the workspace part of a peak, if any

    def __enter__(self):
        self._dead: list[_Life] = []
        self._peak_extra = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = "host" if func is OFFLOAD_TO_HOST else None
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._see(t, kind, f"{func.__name__} {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
        self._count_flops(func, args, out)
        if self.extra_workspace is not None:
            extra = self.extra_workspace(func, args, out)
            if extra:
                self._note_peak(self.live + _round(extra, self.rounding))
        return out

    # ---- what a storage is -------------------------------------------------------------------
    def track_model(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    host: tuple = ()) -> None:
        """Count what exists before the step: frozen weights, buffers, NF4 tensors, trainable parameters,
        gradients and optimizer state (from an earlier step). host: frozen tensors that live in CPU memory
        on the planned machine (a kept-on-host embedding or head), counted apart as host_weight_bytes."""
        for t in host:
            self._see(t, "host_weights")
        for p in model.parameters():
            self._see(p, "adapters_and_optimizer" if p.requires_grad else "weights")
            if p.grad is not None:
                self._see(p.grad, "adapters_and_optimizer")
        for b in model.buffers():
            self._see(b, "weights")
        from lora_engine.quant.nf4_experts import nf4_expert_tensors  # NF4 MoE experts: lists, not `weight`

        for w in [getattr(m, "weight", None) for m in model.modules()] + nf4_expert_tensors(model):
            for name in ("packed", "absmax", "code", "nested_absmax", "nested_code"):
                t = getattr(w, name, None)
                if isinstance(t, torch.Tensor) and not isinstance(w, torch.Tensor):
                    self._see(t, "weights")
        if optimizer is not None:
            self.track_optimizer(optimizer)
        self._note_peak(self.live)

    def track_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Mark the optimizer's state and the gradients as adapters_and_optimizer (call after a step)."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                self._see(p, "adapters_and_optimizer")
                if p.grad is not None:
                    self._see(p.grad, "adapters_and_optimizer")
        for state in optimizer.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    self._see(v, "adapters_and_optimizer")

    @contextmanager
    def forward_phase(self):
        """The forward: tensors autograd saves are marked as activations; at its end, everything the
        forward made that is still alive is an activation too (checkpoint inputs, say)."""
        self.phase = "forward"

        def pack(t):
            self._see(t, "saved")
            return t

        pack.composable = True  # it returns t itself: models/rebuild.py's rebuilt_into may run its own hook inside it
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        for life in self.lives.values():
            if life.phase == "forward" and life.free is None and life.kind is None:
                life.kind = "saved"

    def set_phase(self, phase: str) -> None:
        self.phase = phase

    # ---- FLOPs -------------------------------------------------------------------------------
    def _count_flops(self, func, args, out) -> None:
        if func in _MATMULS:
            a, b = (args[i] for i in _MATMULS[func])
            batch = a.shape[0] if a.dim() == 3 else 1
            self.flops += 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]
        elif func in _ATTENTION:
            backward, causal_arg = _ATTENTION[func]
            q, k = args[1:3] if backward else args[0:2]  # backward's first argument is the output gradient
            B, H, T, hd = q.shape
            S = k.shape[2]
            causal = len(args) > causal_arg and bool(args[causal_arg])
            fwd = 4 * B * H * T * S * hd // (2 if causal else 1)
            self.flops += fwd * 5 // 2 if backward else fwd

    # ---- the result --------------------------------------------------------------------------
    def report(self, top: int = 12) -> StepMemory:
        """The peak and its split (see the module docstring), with the `top` biggest storages that are not
        weights alive at the peak (what to cut next)."""
        parts = dict.fromkeys(CATEGORIES, 0)
        at = self.peak_event
        alive = []
        for life in list(self.lives.values()) + self._dead:
            if life.kind not in ("host", "host_weights") and life.alloc <= at and (life.free is None or life.free > at):
                parts[_category(life)] += life.nbytes
                if life.kind != "weights":
                    alive.append((life.nbytes, _category(life), life.origin or "(before the step)"))
        parts["transient"] += self._peak_extra
        if self._peak_extra:
            alive.append((self._peak_extra, "transient", "workspace inside the op (extra_workspace)"))
        largest = sorted(alive, key=lambda x: -x[0])[:top]
        return StepMemory(self.peak, parts, self.peak_phase, dict(self.by_phase), self.flops, self.host_peak,
                          self.host_weights, largest)


def _category(life: _Life) -> str:
    if life.kind == "saved":
        return "activations"
    return life.kind or "transient"


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)
