"""Merging a QLoRA adapter (trained over NF4 weights) into full-precision weights, two ways.

Merging into re-quantized 4-bit weights ruins quality (the rounding of W + s·BA to 4 bits is far
coarser than s·BA), so we never do that. Instead:

  merge_into="dequantized":  W' = dequant(W_nf4) + s·B@A, in fp32, cast once on export. The base is
      exactly what training saw, so the merged model computes what the trained model computed
      (up to that final cast). Pick this when the original checkpoint is not at hand, or when the
      adapter should behave exactly as evaluated during training.
  base=PATH_16BIT:            W' = W_16 + s·B@A, the original weights the NF4 base was quantized
      from. The adapter learned to correct dequant(W_nf4), not W_16; the difference is the NF4
      rounding error, which the adapter partly compensated for, so this is a different (usually
      slightly better, never verified by training) model. Pick it to keep the base's full quality.

PATH_16BIT is checked before it is used: its architecture must equal the model's; when the
adapter's run recorded the sha256 of its base files (run.json beside the adapter, see
train/lineage.py) they must be PATH_16BIT's or --model's; and for an NF4 --model, quantizing
PATH_16BIT again must give --model's NF4 bytes exactly (our NF4 is bit-exact with bitsandbytes).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from lora_engine.io.digest import sha256_file
from lora_engine.kernels.nf4_format import NF4Tensor
from lora_engine.loading import load_model
from lora_engine.lora.adapter import load_adapter
from lora_engine.models.config import ModelConfig
from lora_engine.quant.nf4 import dequantize_model, quantize
from lora_engine.sources.embedded import resolve_path

MERGE_INTO = ("dequantized",)


def load_dequantized(model_path, adapter) -> torch.nn.Module:
    """The NF4 base as training built it (quantized on load, or an NF4 checkpoint as stored), the
    adapter loaded, every NF4 weight replaced by its fp32 dequantization: ready to merge."""
    run = _run_manifest(adapter)
    if run and (run.get("config") or {}).get("quantize", "nf4") == "none":
        raise ValueError(f"--merge-into dequantized: the adapter's run ({_run_path(adapter)}) trained on full "
                         "precision (quantize = none), so there are no NF4 weights to dequantize; export without "
                         "--merge-into")
    model = load_model(model_path, quantize="nf4", verbose=False)  # train's NF4 settings: blocksize 64, double quant
    load_adapter(model, adapter, verbose=False)
    with warnings.catch_warnings():  # dequantize_model warns that this is not the 16-bit base: here that is the point
        warnings.simplefilter("ignore")
        dequantize_model(model, torch.float32)
    return model


def load_onto_base(model_path, adapter, base) -> torch.nn.Module:
    """The full-precision checkpoint `base` with the adapter loaded, after checking that `base` is what
    the adapter's NF4 base (`model_path`) was quantized from; ValueError saying what differs."""
    base_dir, model_dir = resolve_path(base), resolve_path(model_path)
    fields = _architecture_difference(ModelConfig.from_hf(base_dir), ModelConfig.from_hf(model_dir))
    if fields:
        raise ValueError(f"--base {base}: its architecture differs from --model {model_path}'s ({'; '.join(fields)}); "
                         "pass the checkpoint the adapter's base was quantized from")
    recorded = _recorded_hashes(adapter)
    model16 = load_model(base_dir, verbose=False)
    if recorded and recorded == _hashes(base_dir):
        pass  # the adapter's run quantized exactly this checkpoint on load
    elif recorded and recorded != _hashes(model_dir):
        raise ValueError(f"--base {base}: the adapter's run ({_run_path(adapter)}) trained on base files with sha256 "
                         f"{_short(recorded)}; neither --base ({_short(_hashes(base_dir))}) nor --model "
                         f"({_short(_hashes(model_dir))}) has them. Pass the base the adapter was trained on")
    else:
        _check_quantizes_to(model16, load_model(model_dir, quantize="nf4", verbose=False), base, model_path)
    load_adapter(model16, adapter, verbose=False)
    return model16


def _architecture_difference(a: ModelConfig, b: ModelConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k} {da[k]!r} vs {db[k]!r}" for k in da if k != "torch_dtype" and da[k] != db[k]]


def _check_quantizes_to(model16, model_nf4, base, model_path) -> None:
    """Every NF4 weight of model_nf4 must be quantize(model16's weight) byte for byte, the rest equal."""
    dense = model16.state_dict()
    for name, module in model_nf4.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, NF4Tensor):
            continue
        w16 = dense[f"{name}.weight"]
        if tuple(w16.shape) != tuple(w.shape):
            raise ValueError(f"--base {base}: {name}.weight has shape {tuple(w16.shape)}, the NF4 base's is {w.shape}")
        q = quantize(w16.to(w.dtype), w.blocksize, w.nested_absmax is not None)
        if not (torch.equal(q.packed, w.packed) and torch.equal(q.absmax, w.absmax)):
            raise ValueError(f"--base {base}: quantizing its {name}.weight does not give --model {model_path}'s NF4 "
                             "bytes, so it is not the checkpoint the adapter's base was quantized from")
    for name, t in model_nf4.state_dict().items():
        if name in dense and t.is_floating_point() and not torch.equal(dense[name].to(t.dtype), t):
            raise ValueError(f"--base {base}: {name} differs from --model {model_path}'s, so it is not the checkpoint "
                             "the adapter's base was made from")


def _run_path(adapter) -> Path | None:
    """run.json of the training run that wrote `adapter` (<run>/adapter, <run>/adapter-best), if any."""
    adapter = Path(adapter)
    return next((p for p in (adapter / "run.json", adapter.parent / "run.json") if p.is_file()), None)


def _run_manifest(adapter) -> dict | None:
    p = _run_path(adapter)
    if p is None:
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read the adapter's run manifest ({e})") from e


def _recorded_hashes(adapter) -> dict[str, str]:
    run = _run_manifest(adapter) or {}
    return {Path(k).name: v for k, v in ((run.get("base_model") or {}).get("sha256") or {}).items()}


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of the weight files and config.json, by file name: what train/lineage.py records."""
    out = {}
    for p in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("config.json")):
        out[p.name] = sha256_file(p)
    return out


def _short(h: dict[str, str]) -> str:
    return ", ".join(f"{k} {v[:12]}" for k, v in sorted(h.items())) or "none"
