"""Training checkpoints that a resumed run continues from exactly, written atomically.

Layout of one checkpoint, `<out>/checkpoints/step-00000100/`:

  adapter/                 the PEFT adapter at this step (adapter_config.json + safetensors)
  trainable.safetensors    every trainable parameter under its model name (restored bit-exactly)
  state.pt                 optimizer, scheduler, grad scaler, RNG states, data position, loop state:
                           tensors and plain data only (dicts, lists, tuples, str, numbers, None)
  meta.json                step, time, the files above, "format": 2; written last inside the folder

state.pt is read with torch.load(weights_only=True), whose unpickler builds tensors and plain data
and nothing else, so a checkpoint folder someone else wrote (a shared run, a downloaded one)
cannot run code when resumed: a state.pt that holds anything more is refused. That is why the RNG
states are stored as plain data (NumPy's key as a list of ints, Python's as a tuple of ints) and
turned back into what random and numpy expect on load. Checkpoints of format 1 (before this) hold
NumPy arrays, which only the full, unsafe unpickler reads: they are refused with a message to
re-create them; there is no flag to trust one, since a resume can be started again from scratch.

The folder is built under a temporary name and renamed into place (atomic.atomic_dir), so a crash
or kill -9 at any moment leaves every earlier checkpoint complete, and the newest complete one is
what `latest_checkpoint` finds. After a save only the newest `keep` checkpoints are kept.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lora_engine.io import atomic

STEP_DIR = re.compile(r"^step-(\d+)$")
FORMAT = 2  # meta.json's "format": 2 = state.pt loadable with weights_only=True
STATE_KEYS = ("optimizer", "scheduler", "scaler", "rng", "data", "loop")


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
        "rng": plain_rng_state(rng_state()),
        "data": data_state,
        "loop": loop_state,
    }
    atomic.clean_temporaries(target.parent)
    with atomic.atomic_dir(target) as tmp:
        has_adapter = save_adapter_if_available(model, tmp / "adapter")
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save(state, tmp / "state.pt")
        info = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "adapter": has_adapter, "trainable": sorted(trainable), "format": FORMAT, **(meta or {})}
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
    meta = read_meta(ckpt)
    state = read_state(ckpt)  # before anything is changed: a refused file leaves the model as it was
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
    try:
        optimizer.load_state_dict(state["optimizer"] if fit_optimizer_state is None
                                  else fit_optimizer_state(optimizer, state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(rng_from_plain(state["rng"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ResumeError(f"{ckpt / 'state.pt'}: its optimizer, scheduler or RNG state does not fit this run "
                          f"({type(e).__name__}: {e}); resume with the same model, --r and optimizer settings") from e
    return {"loop": state["loop"], "data": state["data"], "meta": meta}


def read_meta(ckpt: Path) -> dict:
    """meta.json of a checkpoint, refused (ResumeError) unless it is a JSON object of the current format."""
    path = ckpt / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResumeError(f"{path}: cannot be read ({e}); resume from another checkpoint") from e
    if not isinstance(meta, dict):
        raise ResumeError(f"{path}: should hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise ResumeError(
            f"{ckpt}: a checkpoint of format {meta.get('format', 1)!r}, written by an older lora_engine whose "
            "state.pt can only be read by Python's full unpickler, which runs any code the file holds; it is not "
            f"loaded. Re-create it (train again without --resume), this version writes format {FORMAT}")
    return meta


def read_state(ckpt: Path) -> dict:
    """state.pt, read without running code: tensors and plain data only, else ResumeError."""
    path = ckpt / "state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ResumeError(f"{path}: not a checkpoint state this version writes ({first[:200]}); it holds more than "
                          "tensors and plain data, or is damaged, and was not loaded. Resume from a checkpoint "
                          "you made, or train again") from e
    if not isinstance(state, dict) or not set(STATE_KEYS) - {"scaler"} <= set(state):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ResumeError(f"{path}: holds {found}, not the state this version writes ({', '.join(STATE_KEYS)})")
    return state


def plain_rng_state(s: dict) -> dict:
    """step.rng_state() as tensors and plain data (NumPy's state is a tuple holding an array)."""
    out = dict(s)
    if "python" in s:
        version, internal, gauss = s["python"]
        out["python"] = [version, list(internal), gauss]
    if "numpy" in s:
        name, key, pos, has_gauss, cached = s["numpy"]
        out["numpy"] = [str(name), [int(k) for k in key], int(pos), int(has_gauss), float(cached)]
    return out


def rng_from_plain(s: dict) -> dict:
    """The inverse of plain_rng_state: what step.set_rng_state takes."""
    if not isinstance(s, dict) or "python" not in s or "torch" not in s:
        raise TypeError(f"the RNG state should be a dict with 'python' and 'torch', got {type(s).__name__}")
    out = dict(s)
    version, internal, gauss = s["python"]
    out["python"] = (version, tuple(internal), gauss)
    if "numpy" in s:
        import numpy as np

        name, key, pos, has_gauss, cached = s["numpy"]
        out["numpy"] = (name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached)
    return out
