"""Activations rebuilt in backward instead of kept: the sibling of models/recompute.py.

recompute.py recomputes a whole row-wise function chunk by chunk in backward; this file drops one
tensor the forward made (a norm's output, SwiGLU's product) from what autograd saves and makes it
again when backward first asks, from inputs backward keeps anyway. The hook machinery
(`rebuilt_into`) works on any deterministic `make`; `rms_norm_into` and `swiglu_into` are the two
uses the decoder layers make of it, through lora_engine.dispatch for the op itself.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext

import torch

from lora_engine import dispatch


class _Rebuilt:
    """A tensor that backward would keep, dropped after forward and made again when backward asks:
    `make()` under no_grad (and the forward's autocast state) is the same op on the same inputs, so
    the same values bit for bit. Made once for all the saved tensors that share it (q, k and v's
    LoRA keep one normed input) and kept until the last of them is unpacked."""

    __slots__ = ("make", "autocast", "pending", "value")

    def __init__(self, make, device_type: str):
        self.make, self.pending, self.value = make, 0, None
        try:
            enabled = torch.is_autocast_enabled(device_type)
        except RuntimeError:  # a device type autocast does not know (meta): nothing to replay
            enabled = False
        self.autocast = (device_type, torch.get_autocast_dtype(device_type)) if enabled else None

    def get(self) -> torch.Tensor:
        value = self.value
        if value is None:
            amp = torch.autocast(self.autocast[0], dtype=self.autocast[1]) if self.autocast else nullcontext()
            with torch.no_grad(), amp:
                value = self.make()
        self.pending -= 1  # a second backward (retain_graph) unpacks again: then made again each time
        self.value = value if self.pending > 0 else None
        return value


class _SavedView:
    """What a backward keeps in place of a rebuilt tensor, or a view of it: the view's geometry."""

    __slots__ = ("source", "size", "stride", "offset")

    def __init__(self, source: _Rebuilt, view: torch.Tensor):
        self.source, self.size, self.stride, self.offset = source, view.shape, view.stride(), view.storage_offset()
        source.pending += 1

    def __call__(self) -> torch.Tensor:
        return self.source.get().as_strided(self.size, self.stride, self.offset)


def rebuilt_into(make, fn):
    """fn(h) for h = make(), keeping no copy of h for backward: whatever fn saves of h (a LoRA
    input, say) is dropped after forward and rebuilt by make() when backward first needs it. For an
    h that is cheap to make again from tensors backward keeps anyway (a norm of the residual, which
    the norm saves; SwiGLU of gate and up, which SwiGLU saves): one elementwise pass more in
    backward for one activation less per layer. make must be deterministic (no RNG).

    Plain fn(make()) where nothing would be saved (no grad), under torch.compile (the compiler's
    partitioner chooses its own recomputation), and inside another saved-tensor hook (activation
    checkpointing or offload, which already drop the tensor) unless that hook is composable (its
    pack marked `composable = True`: another rebuilt_into, or an observer that returns the tensor
    itself, like the memory plan's counter, train/memory.py, which then sees every saved tensor but
    the rebuilt ones: the plan counts what a real step keeps)."""
    h = make()
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return fn(h)  # (before any call dynamo cannot trace)
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if h.numel() == 0 or not h.is_contiguous() or (outer is not None and not getattr(outer[0], "composable", False)):
        return fn(h)
    h_ref = weakref.ref(h)  # not h itself: nothing saved for backward may keep it alive
    source = _Rebuilt(make, h.device.type)

    def pack(t):
        base = h_ref()
        if base is not None and (t is base or t._base is base):  # h or a view of it
            return _SavedView(source, t)
        # t itself would keep a saved output's grad_fn, its own node, alive from inside that node: a
        # cycle through C++ that gc cannot break, leaking the graph of a forward never backwarded.
        return outer[0](t) if outer is not None else t.detach()

    def unpack(saved):
        if isinstance(saved, _SavedView) and saved.source is source:
            return saved()
        return outer[1](saved) if outer is not None else saved

    pack.composable = True  # a rebuilt_into inside fn (SwiGLU inside a normed MLP) passes the rest here
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(h)


def swiglu_into(gate, up, fn, backend=None):
    """fn(silu(gate) * up), e.g. the down projection of an MLP, keeping no copy of the (..., F) SwiGLU
    output for backward (rebuilt_into): whatever fn saves of it (the LoRA A input, the base GEMM's)
    is rebuilt from gate and up, which SwiGLU's own backward keeps anyway. That is one of the three
    MLP-width tensors a layer holds, for one elementwise pass more per layer in backward."""
    return rebuilt_into(lambda: dispatch.swiglu(gate, up, backend=backend), fn)


def rms_norm_into(x, weight, eps, fn, backend=None):
    """fn(rms_norm(x, weight, eps)), e.g. the projections after a layer's norm, keeping no copy of the
    normed (..., D) tensor for backward (rebuilt_into): the LoRA layers that read it (q, k and v;
    gate and up) get it rebuilt, once, from x, which the norm's own backward keeps anyway. Two
    hidden-width tensors a layer, for two norm passes more in backward."""
    return rebuilt_into(lambda: dispatch.rms_norm(x, weight, eps, backend=backend), fn)
