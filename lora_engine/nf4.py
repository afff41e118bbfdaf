"""NF4 (QLoRA) weights: quantize, dequantize, 4-bit linear layers, bitsandbytes-compatible checkpoints.

The format and its bitsandbytes state-dict layout: kernels/nf4_format.py. The PyTorch reference
(bit-exact with bitsandbytes 0.50.2): kernels/nf4_reference.py. This module adds the user-facing API:

  quantize(w, blocksize=64, double_quant=True) -> NF4Tensor          (w: (out, in) fp32/fp16/bf16)
  dequantize(w, dtype=None, backend=None) -> Tensor (w.shape)       also w.dequantize(dtype, backend)
  Linear4bit: a frozen linear layer whose `weight` is an NF4Tensor; state_dict in bitsandbytes' keys
  quantize_model / dequantize_model: swap nn.Linear <-> Linear4bit by module name (gpt-fast style)
  load_quantized_model (called by loading.load_model), save_quantized (transformers + bnb layout)

Backends (chosen here, in `choose_backend`, and nowhere else): "torch" the reference, "triton"
(kernels/nf4_triton.py, via dispatch), "cpp" (csrc/, torch.ops.lora_engine, built by setup.py).
None picks triton for CUDA tensors (when dispatch says triton is usable), cpp for CPU tensors when
the extension is built, else torch. All of them give identical bytes.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from lora_engine import dispatch
from lora_engine.io.safetensors import (
    IGNORED_SUFFIXES,
    CheckpointError,
    _dtype,
    checkpoint_files,
    read_safetensors_header,
    read_tensor,
)
from lora_engine.kernels import nf4_cpp
from lora_engine.kernels import nf4_reference as ref
from lora_engine.kernels.nf4_format import (
    DTYPES,
    NF4_CODE,
    QUANT_STATE_KEY,
    NF4Tensor,
    from_bnb_state_dict,
    to_bnb_state_dict,
)
from lora_engine.models.config import ModelConfig
from lora_engine.models.decoder import CausalLM
from lora_engine.sources.embedded import resolve_path

BACKENDS = ("torch", "triton", "cpp")
# Module names kept in full precision by default: the output head (its logits feed the loss directly
# and, when tied, it is the embedding). Embeddings and norms are not nn.Linear, so never quantized.
DEFAULT_SKIP = ("lm_head",)

__all__ = [
    "BACKENDS", "DEFAULT_SKIP", "NF4Tensor", "Linear4bit", "quantize", "dequantize", "choose_backend",
    "quantize_model", "dequantize_model", "memory_report", "load_quantized_model", "save_quantized",
    "transformers_quantization_config",
    "save_nf4_weight", "load_nf4_weight", "move_nf4_weight",
]


@functools.cache
def _cpp_ops():
    """torch.ops.lora_engine when the C++ extension (lora_engine._C) is built, else None, warning once."""
    try:
        import lora_engine._C  # noqa: F401  (importing it registers the ops)
    except ImportError as e:
        warnings.warn(
            f"lora_engine: the C++ extension is not built ({e}); NF4 on CPU uses the PyTorch reference. "
            "Build it with `pip install --no-build-isolation -e .` for faster quantization and dequantization.",
            stacklevel=3,
        )
        return None
    return torch.ops.lora_engine


def choose_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The one place an NF4 backend is chosen: explicit `backend`, else by device (see the module doc)."""
    device = torch.device(device)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"nf4: backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "cpp" and (_cpp_ops() is None or device.type not in ("cpu", "cuda")):
            raise RuntimeError(f"nf4: backend='cpp' requested for a {device.type} tensor but the C++ extension "
                               "is not built (pip install --no-build-isolation -e .)")
        if backend == "triton":
            dispatch.resolve(torch.empty(0, device="meta"), "triton")  # raises when triton is unusable
        return backend
    if device.type == "cuda":
        return dispatch.resolve(torch.empty(0, device=device), None)
    if device.type == "cpu" and _cpp_ops() is not None:
        return "cpp"
    return "torch"


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, backend: str | None = None) -> NF4Tensor:
    """w (any shape; fp32, fp16 or bf16) -> NF4Tensor, byte for byte what bitsandbytes.functional.quantize_4bit
    (quant_type="nf4", compress_statistics=double_quant) writes. blocksize: 32, 64, ..., 4096."""
    ref.check_quantize_args(w, blocksize)
    if choose_backend(w.device, backend) == "cpp" and w.device.type == "cpu":
        packed, absmax = _cpp_ops().nf4_quantize(w.detach(), NF4_CODE, blocksize)
        ref.check_finite(w, absmax)
        return ref.nf4_from_blocks(packed, absmax, tuple(w.shape), w.dtype, blocksize, double_quant)
    return ref.nf4_quantize(w, blocksize, double_quant)  # no Triton quantizer: it runs once per weight


def dequantize(w: NF4Tensor, dtype: torch.dtype | None = None, backend: str | None = None) -> torch.Tensor:
    """NF4Tensor -> tensor of w.shape in `dtype` (default w.dtype): code[q] * absmax in fp32, cast once."""
    if not isinstance(w, NF4Tensor):
        raise TypeError(f"nf4.dequantize: expected an NF4Tensor, got {type(w).__name__}")
    dtype = w.dtype if dtype is None else dtype
    if dtype not in DTYPES:
        raise ValueError(f"nf4.dequantize: dtype {dtype} not supported; use one of {DTYPES}")
    be = choose_backend(w.device, backend)
    if be == "cpp":
        return nf4_cpp.nf4_dequantize(w, dtype)
    return dispatch.nf4_dequantize(w, dtype, backend=be)


class Linear4bit(nn.Module):
    """A frozen linear layer with an NF4 weight. x (..., in) -> (..., out) in x's dtype.

    `weight` is the NF4Tensor itself (so LoRA layers can take it over); `bias` a frozen Parameter or
    None. state_dict() uses bitsandbytes' keys (weight, weight.absmax, weight.quant_map, ...), and
    .to(device) moves the NF4 tensors (dtype casts leave the 4-bit format alone).
    """

    def __init__(self, weight: NF4Tensor | None, bias: torch.Tensor | None, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = weight  # None only while a loader fills the model in
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.backend: str | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> Linear4bit:
        w = quantize(linear.weight.detach(), blocksize, double_quant)
        return cls(w, linear.bias, linear.in_features, linear.out_features)

    def extra_repr(self) -> str:
        w = self.weight
        fmt = "empty" if w is None else f"blocksize={w.blocksize}, double_quant={w.is_nested}"
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4 {fmt}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("Linear4bit: no weight loaded yet (the module was built as a loading placeholder)")
        # On CPU, dispatch runs the C++ dequantizer when the extension is built, else the reference.
        return dispatch.nf4_linear(x, self.weight, self.bias, backend=self.backend)

    # state_dict / load_state_dict / .to(): the NF4 weight is not a Parameter, these hooks carry it.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # the bias
        save_nf4_weight(self, destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        load_nf4_weight(self, state_dict, prefix, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        move_nf4_weight(self, fn)
        return self


# Hooks for any module whose `weight` attribute is an NF4Tensor (Linear4bit, and a LoRA layer that took
# one over): bitsandbytes' keys in the state dict, and device moves.
def save_nf4_weight(module: nn.Module, destination: dict, prefix: str) -> None:
    """Add module.weight's bitsandbytes keys (prefix + "weight", "weight.absmax", ...) to `destination`."""
    if isinstance(module.weight, NF4Tensor):
        destination.update(to_bnb_state_dict(module.weight, prefix))


def load_nf4_weight(module: nn.Module, state_dict: dict, prefix: str, missing_keys: list, unexpected_keys: list,
                    error_msgs: list) -> None:
    """Set module.weight from the bitsandbytes keys under `prefix`; call after nn.Module._load_from_state_dict
    (which reports those keys as unexpected: they are taken off that list here)."""
    mine = {k for k in state_dict if k == prefix + "weight" or k.startswith(prefix + "weight.")}
    unexpected_keys[:] = [k for k in unexpected_keys if k not in mine]
    if prefix + "weight" not in state_dict:
        missing_keys.append(prefix + "weight")
        return
    try:
        w = from_bnb_state_dict(state_dict, prefix, "state_dict")
    except ValueError as e:
        error_msgs.append(str(e))
        return
    want = (module.out_features, module.in_features)
    if w.shape != want:
        error_msgs.append(f"{prefix}weight is an NF4 weight of shape {w.shape}, the layer is {want}")
        return
    old = module.weight
    device = old.device if old is not None else (module.bias.device if module.bias is not None else w.device)
    module.weight = w.to(device)


def move_nf4_weight(module: nn.Module, fn) -> None:
    """Follow a Module._apply: move the NF4 tensors with `fn`'s device; dtype casts leave the format alone."""
    w = module.weight
    if isinstance(w, NF4Tensor):
        moved = fn(w.packed)  # uint8: a float cast returns it unchanged, a move moves it
        if moved.device != w.device:
            module.weight = w.to(moved.device)


def _skipped(name: str, skip) -> bool:
    parts = name.split(".")
    return any(name == s or name.endswith("." + s) or s in parts for s in skip)


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True,
                   skip=DEFAULT_SKIP) -> nn.Module:
    """Replace every nn.Linear of `model` (in place) by a Linear4bit, except modules named in `skip`
    (a name matches the module path, its last part, or any part of it). Returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not _skipped(name, skip):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit.from_linear(module, blocksize, double_quant))
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every Linear4bit by an nn.Linear holding its dequantized weight (in place), e.g. to export.

    A LoRA layer over an NF4 base (any module whose `weight` is an NF4Tensor) gets a dense frozen
    weight instead. Merging LoRA afterwards is lossy with respect to the original full-precision
    model: the base becomes the dequantized 4-bit weight, and that is warned about here.
    """
    lora_over_nf4 = []
    for name, module in list(model.named_modules()):
        w = getattr(module, "weight", None)
        if not isinstance(w, NF4Tensor):
            continue
        dense = dequantize(w, dtype or w.dtype)
        if isinstance(module, Linear4bit):
            lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                            device=dense.device, dtype=dense.dtype)
            with torch.no_grad():
                lin.weight.copy_(dense)
                if module.bias is not None:
                    lin.bias.copy_(module.bias)
            lin.requires_grad_(False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
        else:
            lora_over_nf4.append(name)
            module.weight = nn.Parameter(dense, requires_grad=False)
    if lora_over_nf4:
        warnings.warn(f"nf4.dequantize_model: {len(lora_over_nf4)} LoRA layers ({lora_over_nf4[0]}, ...) sit on a "
                      "4-bit base; their base is now the dequantized NF4 weight, so merging the adapters gives the "
                      "QLoRA model, not the original full-precision weights plus the update (lossy)", stacklevel=2)
    return model


def memory_report(model: nn.Module) -> dict:
    """Bytes of the NF4 weights and of everything else; bits_per_param of the quantized linears."""
    q_params = q_bytes = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, NF4Tensor):
            q_params += w.numel
            q_bytes += w.nbytes
    seen = {id(p): p for p in list(model.parameters()) + list(model.buffers())}
    other = sum(p.numel() * p.element_size() for p in seen.values())
    return {"quantized_params": q_params, "quantized_bytes": q_bytes, "other_bytes": other,
            "bits_per_param": 8 * q_bytes / q_params if q_params else 0.0}


# ---- checkpoints ----------------------------------------------------------------------------------------
_QS_SUFFIX = ".weight." + QUANT_STATE_KEY


def _check_bnb_config(qc, where) -> None:
    if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        raise CheckpointError(f"{where}: quantization_config {qc!r} is not a bitsandbytes 4-bit config; only NF4 "
                              "checkpoints (load_in_4bit, bnb_4bit_quant_type='nf4') load directly")
    if qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise CheckpointError(f"{where}: bnb_4bit_quant_type is {qc.get('bnb_4bit_quant_type')!r}; only 'nf4' is "
                              "supported (fp4 is not)")
    if qc.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise CheckpointError(f"{where}: bnb_4bit_quant_storage {qc['bnb_4bit_quant_storage']!r} is not supported; "
                              "save with the default uint8 storage")


def load_quantized_model(path, dtype=None, device="cpu", quantize: str | None = None, quantize_skip=DEFAULT_SKIP,
                         blocksize: int = 64, double_quant: bool = True, verbose: bool = True):
    """Load a CausalLM with NF4 linear layers, tensor by tensor.

    A checkpoint whose config.json has a bitsandbytes `quantization_config` (transformers + bnb
    save_pretrained) loads as stored. A full-precision checkpoint with quantize="nf4" is quantized
    while it is read: each weight is read, cast to `dtype`, quantized and dropped, so peak memory is
    the quantized model plus one full-precision tensor. quantize_skip: module names kept in full
    precision (default: lm_head; embeddings and norms are never quantized). blocksize/double_quant:
    the NF4 settings for quantize="nf4". Prints the measured bits per quantized parameter.
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"load_model: quantize={quantize!r} is not supported; use quantize='nf4' or None")
    if isinstance(quantize_skip, str):
        quantize_skip = (quantize_skip,)
    folder = resolve_path(path)
    cfg = ModelConfig.from_hf(folder / "config.json")
    qc = cfg.extra.get("quantization_config")
    if qc is not None:
        _check_bnb_config(qc, folder / "config.json")
    files = checkpoint_files(folder)
    stored = {k[: -len(_QS_SUFFIX)] for k in files if k.endswith(_QS_SUFFIX)}
    if qc is None and quantize is None:
        raise ValueError(f"load_quantized_model: {folder} is not quantized; pass quantize='nf4' to quantize it")
    dt = _dtype(dtype if dtype is not None else cfg.torch_dtype)
    with torch.device("meta"):
        model = CausalLM(cfg).to(dt)
    tied = getattr(cfg, "tie_word_embeddings", False)
    targets = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, nn.Linear) or (tied and name == "lm_head"):
            continue
        if name in stored or (not stored and not _skipped(name, quantize_skip)):
            targets[name] = Linear4bit(None, m.bias, m.in_features, m.out_features)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, targets[name])
    model = model.to_empty(device=device)
    model.tie_weights()
    model.reset_buffers()
    _fill(model, folder, files, targets, stored, dt, device, blocksize, double_quant)
    model.name_or_path, model.source_dir = str(path), str(folder)
    model.eval()
    if verbose:
        r = memory_report(model)
        print(f"NF4: {len(targets)} linear layers, {r['quantized_params']:,} parameters in "
              f"{r['quantized_bytes']:,} bytes = {r['bits_per_param']:.3f} bits/param; "
              f"{r['other_bytes']:,} bytes in {dt} elsewhere")
    return model


def _fill(model, folder, files, targets, stored, dt, device, blocksize, double_quant) -> None:
    """Read every checkpoint tensor into `model`; quantize or rebuild the NF4 weights; strict checks."""
    expected = dict(model.state_dict(keep_vars=True))  # placeholders contribute only their biases
    if getattr(model.config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    owner = {}  # checkpoint key -> quantized module path
    for path in targets:
        for k in files:
            if k == path + ".weight" or k.startswith(path + ".weight."):
                owner[k] = path
    headers, problems, loaded, nf4_parts = {}, [], set(), {p: {} for p in targets}
    for name, file in sorted(files.items(), key=lambda kv: (str(kv[1]), kv[0])):
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and "lm_head.weight" not in expected
                                               and "lm_head" not in targets):
            continue
        if file not in headers:
            headers[file] = read_safetensors_header(file)
        header, start = headers[file]
        info = header.get(name)
        if info is None:
            problems.append(f"tensor {name} is listed in the index but absent from {file.name}")
        elif name in owner:
            path = owner[name]
            t = read_tensor(file, info, start)
            if stored:
                nf4_parts[path][name] = t
                continue
            mod = targets[path]
            if tuple(t.shape) != (mod.out_features, mod.in_features):
                problems.append(f"wrong shape for {name} in {file.name}: expected "
                                f"{(mod.out_features, mod.in_features)}, got {tuple(t.shape)}")
                continue
            mod.weight = quantize(t.to(device=device, dtype=dt), blocksize, double_quant)
            del t  # the full-precision tensor is gone before the next one is read
        elif name not in expected:
            problems.append(f"unexpected tensor {name} in {file.name}")
        elif tuple(info["shape"]) != tuple(expected[name].shape):
            problems.append(f"wrong shape for {name} in {file.name}: expected {tuple(expected[name].shape)}, "
                            f"got {tuple(info['shape'])}")
        else:
            with torch.no_grad():
                target = expected[name].data
                buf = read_tensor(file, info, start, out=target)
                if buf is not target:
                    target.copy_(buf)
            loaded.add(name)
    for path, parts in nf4_parts.items() if stored else ():
        mod = targets[path]
        where = str(files.get(path + ".weight", folder))
        try:
            w = from_bnb_state_dict(parts, path + ".", where)
        except ValueError as e:
            problems.append(str(e))
            continue
        if w.shape != (mod.out_features, mod.in_features):
            problems.append(f"{where}: {path}.weight is an NF4 weight of shape {w.shape}, the model's {path} is "
                            f"({mod.out_features}, {mod.in_features})")
            continue
        mod.weight = w.to(device)
    missing = sorted(set(expected) - loaded) + sorted(p + ".weight" for p, m in targets.items() if m.weight is None
                                                      and not any(p in q for q in problems))
    if missing:
        problems.append(f"{len(missing)} tensors missing from the checkpoint: {', '.join(missing)}")
    if problems:
        raise CheckpointError(f"checkpoint {folder} does not match the model built from its config.json:\n  - "
                              + "\n  - ".join(problems))


def transformers_quantization_config(model: nn.Module) -> dict:
    """The `quantization_config` transformers 5 writes for BitsAndBytesConfig(load_in_4bit, nf4, ...)."""
    ws = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), NF4Tensor)]
    if not ws:
        raise ValueError("save_quantized: the model has no NF4 weights; quantize it first (quantize_model)")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    skip = sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear)}) or None
    return {
        "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": str(dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": any(w.is_nested for w in ws), "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


def save_quantized(model: nn.Module, folder) -> None:
    """Write `folder`/model.safetensors (bitsandbytes keys for NF4 weights) and config.json with the
    quantization_config, in the layout transformers + bitsandbytes load. Each file is written atomically."""
    from safetensors.torch import save as safetensors_bytes

    from lora_engine.io.atomic import write_bytes, write_json

    folder = Path(folder)
    qc = transformers_quantization_config(model)
    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # transformers re-ties it; safetensors refuses shared storage
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    for k in [k for k in tensors if k.endswith("quant_map")]:
        tensors[k] = tensors[k].clone()  # small tables that may share storage across layers
    config = dict(model.config.extra) if model.config.extra else model.config.to_dict()
    config["quantization_config"] = qc
    write_bytes(folder / "model.safetensors", safetensors_bytes(tensors, metadata={"format": "pt"}))
    write_json(folder / "config.json", config)
