"""Gradient checkpointing per layer with the checkpointed hidden state kept in CPU memory.

Plain checkpointing (torch.utils.checkpoint) keeps every layer's input (B, T, D) on the device
until backward: 32 layers x T x 4096 x 2 bytes for an 8B model, 8 GiB at 32k tokens, 25 GiB at 100k.
checkpoint_offloaded runs the layer without saving anything, copies its input to CPU memory, and in
backward copies it back, recomputes the layer and backpropagates through it:

    forward    y = fn(x) under no_grad; host = copy of x in (pinned) CPU memory; x may die
    backward   x' = host back on the device; y' = fn(x') with grad; (dx, dparams) = grad(y', (x', params), dy)

On a GPU the device-to-host copy runs on a side stream (the next layer computes meanwhile; the
source block is kept from reuse with record_stream until the copy is done), and the host-to-device
copy waits for it with an event and runs on the compute stream without blocking the CPU. On CPU
both are plain copies (nothing is saved, but the code path is the one a GPU runs, so it is tested).

The recomputation is the same ops on the same input with the same autocast state and the same RNG
state (dropout draws the same mask), so the loss and gradients equal those of the plain step bit for
bit. The layer's trainable parameters are inputs of the autograd.Function and their gradients its
outputs: a layer whose input needs no gradient (the first one, after a frozen embedding) still
trains its adapters, and the gradients arrive through autograd like any other.

The two copies are custom ops (lora_engine::offload_to_host, lora_engine::offload_to_device) with fake
implementations, so a memory plan (lora_engine/plan.py, train/memory.py) sees which storages live in
host memory and counts them there, not on the device.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch


@torch.library.custom_op("lora_engine::offload_to_host", mutates_args=())
def offload_to_host(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of t in CPU memory: pinned (so the copy is asynchronous) when t is on a GPU."""
    host = torch.empty_like(t, device="cpu", memory_format=torch.contiguous_format,
                            pin_memory=t.device.type == "cuda")
    return host.copy_(t, non_blocking=t.device.type == "cuda")


@offload_to_host.register_fake
def _(t):
    return torch.empty_like(t, device="cpu", memory_format=torch.contiguous_format)


@torch.library.custom_op("lora_engine::offload_to_device", mutates_args=())
def offload_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A contiguous copy of the host tensor t on `device` (a new storage even when device is the CPU)."""
    out = torch.empty_like(t, device=device, memory_format=torch.contiguous_format)
    return out.copy_(t, non_blocking=t.is_pinned())


@offload_to_device.register_fake
def _(t, device):
    return torch.empty_like(t, device=device, memory_format=torch.contiguous_format)


class HostOffloader:
    """The side streams of the device-to-host copies (one per GPU, made on first use)."""

    def __init__(self):
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def to_host(self, x: torch.Tensor):
        """(host copy, event the copy-back waits for or None)."""
        if x.device.type != "cuda":
            return offload_to_host(x), None
        stream = self._streams.get(x.device)
        if stream is None:
            stream = self._streams[x.device] = torch.cuda.Stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))  # x is written by the compute stream
        with torch.cuda.stream(stream):
            host = offload_to_host(x)
        x.record_stream(stream)  # x's block is not reused until the copy is done
        return host, stream.record_event()

    @staticmethod
    def to_device(host: torch.Tensor, event, device: torch.device) -> torch.Tensor:
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)
        return offload_to_device(host, device)


class Replay:
    """What backward needs to rerun fn as forward ran it: autocast state and RNG state."""

    def __init__(self, fn, offloader: HostOffloader, device: torch.device):
        self.fn, self.offloader, self.device = fn, offloader, device
        dt = device.type
        self.autocast = (dt, torch.get_autocast_dtype(dt)) if torch.is_autocast_enabled(dt) else None
        self.cpu_rng = torch.get_rng_state()
        self.device_rng = torch.cuda.get_rng_state(device) if dt == "cuda" else None

    @contextmanager
    def replaying(self):
        devices = [self.device] if self.device_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.set_rng_state(self.cpu_rng)
            if self.device_rng is not None:
                torch.cuda.set_rng_state(self.device_rng, self.device)
            amp = torch.autocast(self.autocast[0], dtype=self.autocast[1]) if self.autocast else nullcontext()
            with torch.enable_grad(), amp:
                yield


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, replay: Replay, x, *params):
        ctx.replay = replay
        ctx.host, ctx.event = replay.offloader.to_host(x.detach())
        ctx.params = params
        with torch.no_grad():
            return replay.fn(x)

    @staticmethod
    def backward(ctx, dy):
        replay = ctx.replay
        x = replay.offloader.to_device(ctx.host, ctx.event, replay.device)
        ctx.host = ctx.event = None  # the host copy is freed as soon as the device copy exists
        need_x = ctx.needs_input_grad[1]
        params = [p for p, need in zip(ctx.params, ctx.needs_input_grad[2:]) if need]
        with replay.replaying():
            x = x.requires_grad_(need_x)
            # fn's output is not kept (backward needs none of it) and x only while autograd needs it
            outputs = [replay.fn(x)]
        inputs = ([x] if need_x else []) + params
        del x
        grads = iter(torch.autograd.grad(outputs.pop(), inputs, dy, allow_unused=True))
        dx = next(grads) if need_x else None
        return (None, dx, *(next(grads) if need else None for need in ctx.needs_input_grad[2:]))


def checkpoint_offloaded(fn, x: torch.Tensor, params: list[torch.Tensor], offloader: HostOffloader) -> torch.Tensor:
    """fn(x) with x kept in CPU memory for backward and fn recomputed there (see the module docstring).

    fn: x (B, T, D) -> (B, T, D), its other inputs captured (they must need no gradient); params: the
    trainable tensors fn uses (their gradients come back through autograd).
    """
    return _OffloadedCheckpoint.apply(Replay(fn, offloader, x.device), x, *params)
