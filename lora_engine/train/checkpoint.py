"""Training checkpoints that a resumed run continues from exactly, written atomically.

Layout of one checkpoint, `<out>/checkpoints/step-00000100/`:

  adapter/                 the PEFT adapter at this step (adapter_config.json + safetensors)
  trainable.safetensors    every trainable parameter under its model name (restored bit-exactly)
  state.pt                 optimizer, scheduler, grad scaler, RNG states, data position, loop state
                           (loop.LoopState as a plain dict, so the file holds no class of ours)
  meta.json                step, time, the files above; written last inside the folder

The folder is built under a temporary name and renamed into place (atomic.atomic_dir), so a crash
or kill -9 at any moment leaves every earlier checkpoint complete, and the newest complete one is
what `latest_checkpoint` finds. After a save only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_engine.io import atomic

STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(ValueError):
    """A checkpoint cannot be resumed from; the message says which and why."""


def checkpoint_dir(out: str | Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:08d}"


def save_adapter_if_available(model, folder: Path) -> bool:
    """Write the PEFT adapter when the model carries LoRA layers (lora_engine.lora.adapter)."""
    if not any(n.endswith(("lora_A", "lora_B")) or ".lora_A" in n for n, _ in model.named_parameters()):
        return False
    from lora_engine.lora.adapter import save_adapter

    save_adapter(model, folder)
    return True


def save_checkpoint(out: str | Path, step: int, model, optimizer, scheduler, loop_state: dict,
                    data_state: dict, scaler=None, keep: int = 3, optimizer_state: dict | None = None,
                    meta: dict | None = None) -> Path:
    """Save everything a resume needs; returns the checkpoint folder. Older ones beyond `keep` go.

    loop_state and data_state: plain data (LoopState.to_dict(), Batcher.state_dict()), returned as saved
    by load_checkpoint. optimizer_state: what to save for the optimizer (default optimizer.state_dict();
    a distributed run passes its state gathered to full tensors, so the file is the same whatever the
    world size). meta: further fields of meta.json (a distributed run: world_size, grad_accum)."""
    from lora_engine.train.step import rng_state

    target = checkpoint_dir(out, step)
    trainable = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    state = {
        "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "data": data_state,
        "loop": loop_state,
    }
    atomic.clean_temporaries(target.parent)
    with atomic.atomic_dir(target) as tmp:
        has_adapter = save_adapter_if_available(model, tmp / "adapter")
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")
        info = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "adapter": has_adapter, "trainable": sorted(trainable), "format": 1, **(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2) + "\n")
    prune(out, keep)
    return target


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and (p / "meta.json").is_file() and (p / "state.pt").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prune(out: str | Path, keep: int) -> None:
    if keep < 1:
        return
    for p in list_checkpoints(out)[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(path: str | Path) -> Path:
    """`path` itself when it is a checkpoint folder, else the newest complete checkpoint of a run folder."""
    path = Path(path)
    if not path.exists():
        raise ResumeError(f"--resume {path}: no such folder")
    if (path / "meta.json").is_file() and (path / "state.pt").is_file():
        return path
    for parent in (path, path.parent):
        atomic.recover_dir(parent)
    found = list_checkpoints(path)
    if not found:
        raise ResumeError(f"--resume {path}: neither a checkpoint folder (meta.json + state.pt) nor a run folder with "
                          "complete checkpoints under checkpoints/")
    return found[-1]


def run_dir_of(ckpt: Path) -> Path:
    """The run folder a checkpoint folder belongs to (<out>/checkpoints/step-N -> <out>)."""
    return ckpt.parent.parent


def load_checkpoint(ckpt: str | Path, model, optimizer, scheduler, scaler=None, fit_optimizer_state=None) -> dict:
    """Restore parameters, optimizer, scheduler, scaler and RNG states in place.

    fit_optimizer_state: a function that makes the saved (full) optimizer state fit `optimizer`
    before it is loaded (a sharded run distributes it like the parameters: Dist.shard_optimizer_state).

    Returns {"loop": ..., "data": ..., "meta": ...} for the caller to restore its loop and data
    position. Raises ResumeError when the checkpoint's trainable parameters differ from the model's.
    """
    from lora_engine.train.step import set_rng_state

    ckpt = Path(ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ResumeError(
            f"{ckpt}: its trainable parameters do not match the model's (missing {missing[:3]}, unexpected "
            f"{extra[:3]}): resume with the same model, --r and target modules"
        )
    for n, p in params.items():  # all checked before anything is changed
        if tensors[n].shape != p.shape:
            raise ResumeError(f"{ckpt}: {n} has shape {tuple(tensors[n].shape)}, the model {tuple(p.shape)}: resume "
                              "with the same model, --r and target modules")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    # Our own file, written by save_checkpoint: it holds Python and NumPy RNG states, which the
    # weights-only unpickler refuses.
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"] if fit_optimizer_state is None
                              else fit_optimizer_state(optimizer, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return {"loop": state["loop"], "data": state["data"], "meta": meta}
