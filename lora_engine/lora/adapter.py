"""LoRA adapters on disk in PEFT's format, both ways.

One idea over ~470 lines: PEFT's adapter folder read and written (dense, fused Phi-3, expert and multimodal
names are that one format's cases, so they stay beside its reader and writer).

A folder holds `adapter_config.json` and `adapter_model.safetensors`, whose keys are
`base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r); our module
paths equal Hugging Face's (`model.layers.0.self_attn.q_proj`), so the key is PEFT's exactly.
Per-module ranks and alphas travel in `rank_pattern` / `alpha_pattern`, as PEFT writes them.
DoRA adds `...<path>.lora_magnitude_vector` (out,) per layer (no `.weight` suffix: PEFT's key) and
`use_dora: true` in the config. modules_to_save are stored whole under their plain keys,
`base_model.model.<module path>.weight` (PEFT drops its `modules_to_save.default.` infix on save).
A family whose checkpoint fuses projections (Phi-3's qkv_proj, gate_up_proj) keeps PEFT's fused names on
disk: save_adapter stacks the parts' LoRAs into one, load_adapter splits one, both exactly (lora/fused.py).
A model read out of a multimodal checkpoint (Qwen3.5's, models/hybrid.py) keeps its text model under
model.language_model.* where we say model.*: its adapters use the checkpoint's names (PEFT's on that class),
in the keys, rank_pattern / alpha_pattern and full-path target_modules, both ways (`_stored_name`).

The folder is built under a temporary name and swapped into place (lora_engine.io.atomic.atomic_dir), so
a folder with a config always has the weights it describes; an existing folder is replaced only if it
holds nothing but an adapter's two files (ADAPTER_FILES), so a run folder or a user's folder is refused.
Reading a folder first puts back one that a kill left half-swapped. Loading checks every key and shape
before touching the model, so a bad adapter leaves the model as it was.

load_adapter returns the model, as PEFT's loading does (and apply_lora); the adapter's LoraConfig
is read_adapter_config(folder)[0], or `model.lora_config` after loading.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from lora_engine.io import atomic
from lora_engine.io.safetensors import CheckpointError, read_safetensors_header, read_tensor, save_tensors
from lora_engine.lora import experts
from lora_engine.lora.fused import fuse_layers, fused_modules, split_adapter, stored_paths
from lora_engine.lora.layers import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    lora_layers,
    lora_scale,
    saved_module_paths,
    target_paths,
)
from lora_engine.models import hybrid

MAGNITUDE = "lora_magnitude_vector"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
# What save_adapter writes: an existing folder holding anything else is not replaced.
ADAPTER_FILES = atomic.Owned("an adapter folder", (CONFIG_NAME, WEIGHTS_NAME), marker=CONFIG_NAME)

logger = logging.getLogger(__name__)

# adapter_config.json fields that change what the adapter computes and that we do not implement:
# field -> (value(s) that are fine, what it is). Anything else in the file is bookkeeping.
UNSUPPORTED = {
    "bias": (("none", None), "trained biases (bias != 'none')"),
    "lora_bias": ((False, None), "lora_bias (a bias on lora_B)"),
    "fan_in_fan_out": ((False, None), "fan_in_fan_out (Conv1D-style transposed weights)"),
    "layers_to_transform": ((None, []), "layers_to_transform"),
    "layer_replication": ((None, []), "layer_replication"),
    "exclude_modules": ((None, []), "exclude_modules"),
    "trainable_token_indices": ((None, [], {}), "trainable_token_indices"),
    "use_qalora": ((False, None), "QALoRA"),
    "alora_invocation_tokens": ((None, []), "aLoRA (activated LoRA)"),
    "use_bdlora": ((False, None), "block-diagonal LoRA"),
    "megatron_config": ((None,), "Megatron parallel layers"),
}


# adapter_config.json fields we read: (key, accepted JSON types, what to say). LoraConfig checks the values.
_FIELD_TYPES = (
    ("r", (int,), "a positive integer"),
    ("lora_alpha", (int, float), "a positive number"),
    ("lora_dropout", (int, float), "a number in [0, 1)"),
    ("target_modules", (str, list), "a list of module names or one regular expression"),
    ("use_rslora", (bool,), "true or false"),
    ("use_dora", (bool,), "true or false"),
    ("rank_pattern", (dict,), "an object {module pattern: rank}"),
    ("alpha_pattern", (dict,), "an object {module pattern: alpha}"),
    ("modules_to_save", (list,), "a list of module names"),
    ("target_parameters", (list,), "a list of parameter names"),
)
# Stored dtypes LoRA weights may have: anything else (an int32 tensor, say) is not a trained weight.
FLOAT_ST_DTYPES = ("F32", "F16", "BF16", "F64")


# ---- save ----------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, folder: str | os.PathLike, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA weights and config as a PEFT adapter folder; returns the folder.

    base_model_name_or_path: recorded in the config (default: `model.name_or_path`, set by
    load_model). Adapter tensors are saved in their own dtype (fp32 unless chosen otherwise).
    An existing `folder` is replaced only if it is empty or holds nothing but an adapter's files
    (ADAPTER_FILES); else OutputError, before any work.
    """
    layers = dict(lora_layers(model))
    if not layers and not experts.adapter_keys(model, ""):
        raise ValueError("save_adapter: the model has no LoRA layers; call apply_lora(model, config) first")
    folder = Path(folder)
    atomic.check_dir_replaceable(folder, ADAPTER_FILES)
    config = _peft_config(model, layers, base_model_name_or_path or getattr(model, "name_or_path", None))
    tensors = {}
    for path, rec in fuse_layers(model, layers).items():  # fused modules (Phi-3) as PEFT names them: lora/fused.py
        path = _stored_name(model, path)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = rec["lora_A"]
        tensors[f"{PREFIX}{path}.lora_B.weight"] = rec["lora_B"]
        if "magnitude" in rec:
            tensors[f"{PREFIX}{path}.lora_magnitude_vector"] = rec["magnitude"]
    for key, (p, _) in experts.adapter_keys(model, PREFIX).items():  # MoE experts: PEFT's ParamWrapper keys
        tensors[key] = p.detach().cpu().contiguous()
    config["target_parameters"] = experts.targeted(model) or None
    if config["modules_to_save"]:
        warnings.warn(f"save_adapter: the adapter carries modules_to_save {config['modules_to_save']}: PEFT and "
                      "transformers load it, vLLM refuses adapters with modules_to_save (merge it with "
                      "lora_engine.export instead)", stacklevel=2)
        for path in saved_module_paths(model, model.lora_config):
            for name, p in model.get_submodule(path).named_parameters(recurse=False):
                tensors[f"{PREFIX}{_stored_name(model, path)}.{name}"] = p.detach().cpu().contiguous()
    with atomic.atomic_dir(folder, ADAPTER_FILES) as tmp:
        save_tensors(tmp / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        atomic.write_text(tmp / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def _peft_config(model: nn.Module, layers: dict[str, LoraLinear], base: str | None) -> dict:
    cfg = getattr(model, "lora_config", None)
    if cfg is None and not layers:
        raise ValueError("save_adapter: the model's expert LoRA has no lora_config; apply it with apply_lora")
    first = next(iter(layers.values()), None)
    r = cfg.r if cfg else first.r
    alpha = cfg.lora_alpha if cfg else first.lora_alpha
    dropout = cfg.lora_dropout if cfg else getattr(first.dropout, "p", 0.0)
    rslora = {m.use_rslora for m in layers.values()} or {cfg.use_rslora}
    if len(rslora) > 1:
        raise ValueError("save_adapter: some LoRA layers use rsLoRA and others do not; PEFT's format has one flag")
    dora = {m.use_dora for m in layers.values()} or {False}
    if len(dora) > 1:
        raise ValueError("save_adapter: some LoRA layers use DoRA and others do not; PEFT's format has one flag")
    # Only what differs from the global values goes into the patterns, keyed by full module path.
    records = fuse_layers(model, layers)
    name = functools.partial(_stored_name, model)
    rank_pattern = {name(p): rec["r"] for p, rec in records.items() if rec["r"] != r}
    alpha_pattern = {name(p): rec["lora_alpha"] for p, rec in records.items() if rec["lora_alpha"] != alpha}
    for p, f in experts.factor_records(model).items():  # PEFT keys an expert parameter by its full path too
        if f.r != r:
            rank_pattern[name(p)] = f.r
        if f.lora_alpha != alpha:
            alpha_pattern[name(p)] = f.lora_alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora.pop(),
        "target_modules": [name(t) for t in _target_names(model, list(records))] or None,  # None: expert LoRA alone
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_dora": dora.pop(),
        "modules_to_save": [name(m) for m in cfg.modules_to_save] if cfg and cfg.modules_to_save else None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def _stored_name(model: nn.Module, path: str, inverse: bool = False) -> str:
    """The checkpoint's (and so PEFT's) name for our module path, or ours for the checkpoint's (inverse)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return (hybrid.model_name if inverse else hybrid.checkpoint_name)(model_type, path)


def _our_names(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """The adapter's config with full module paths in our names (target_modules' one regular expression is
    matched against ours as written)."""
    ours = functools.partial(_stored_name, model, inverse=True)
    targets = config.target_modules
    return dataclasses.replace(
        config, target_modules=targets if isinstance(targets, str) else tuple(map(ours, targets)),
        rank_pattern={ours(k): v for k, v in config.rank_pattern.items()},
        alpha_pattern={ours(k): v for k, v in config.alpha_pattern.items()},
        modules_to_save=tuple(map(ours, config.modules_to_save)))


def _target_names(model: nn.Module, paths: list[str]) -> list[str]:
    """Short names (q_proj, ...) when they select exactly these layers, else the full paths."""
    short = sorted({p.rsplit(".", 1)[-1] for p in paths})
    linear = stored_paths(model, [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoraLinear))])
    covered = {n for n in linear if n.rsplit(".", 1)[-1] in short}
    return short if covered == set(paths) else sorted(paths)


# ---- load ----------------------------------------------------------------------------------------
def adapter_folder(folder: str | os.PathLike) -> Path:
    """The folder itself, or for a registry reference ("registry:NAME@production", "registry:NAME@v3")
    the registry's copy of that version, after checking every file against its recorded sha256."""
    if isinstance(folder, str) and folder.startswith("registry:"):
        from lora_engine.registry.refs import resolve_ref

        return resolve_ref(folder)
    folder = Path(folder)
    with contextlib.suppress(OSError):  # a swap a kill interrupted is put back; a read-only folder is read as is
        atomic.recover_dir(folder)
    return folder


def read_adapter_config(folder: str | os.PathLike) -> tuple[LoraConfig, dict]:
    """Parse and check a PEFT adapter_config.json (in a folder or a registry reference): (LoraConfig, the raw dict)."""
    folder = adapter_folder(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist; pass the folder that holds "
                                f"{CONFIG_NAME} (a training run writes <out>/adapter)")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no {CONFIG_NAME}, so it is not a PEFT adapter folder; save one with "
            "save_adapter(model, folder) or PEFT's model.save_pretrained(folder)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: peft_type {peft_type!r:.60} is not supported; only LoRA adapters "
                              "(peft_type 'LORA')")
    for key, (fine, what) in UNSUPPORTED.items():
        if raw.get(key) not in fine:
            raise CheckpointError(
                f"{path}: {key}={raw[key]!r:.60} asks for {what}, which lora_engine does not support yet; "
                "retrain the adapter without it"
            )
    if raw.get("target_modules") is None and not raw.get("target_parameters"):
        raise CheckpointError(f"{path}: target_modules is missing or null and there are no target_parameters; the "
                              "adapter names no layers")
    for key, kinds, what in _FIELD_TYPES:
        if key in raw and raw[key] is not None and (not isinstance(raw[key], kinds) or isinstance(raw[key], bool)
                                                    and bool not in kinds):
            raise CheckpointError(f"{path}: {key} must be {what}, got {type(raw[key]).__name__} {raw[key]!r:.60}")
    try:  # PEFT's defaults for absent fields: r=8, lora_alpha=8, lora_dropout=0
        config = LoraConfig(
            r=raw.get("r", 8), lora_alpha=raw.get("lora_alpha", 8), lora_dropout=raw.get("lora_dropout", 0.0),
            target_modules=raw.get("target_modules"), use_rslora=raw.get("use_rslora", False),
            rank_pattern=raw.get("rank_pattern") or {}, alpha_pattern=raw.get("alpha_pattern") or {},
            use_dora=raw.get("use_dora") or False, modules_to_save=raw.get("modules_to_save") or (),
            target_parameters=raw.get("target_parameters") or (),
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return config, raw


def load_adapter(model: nn.Module, folder: str | os.PathLike, verbose: bool = True) -> nn.Module:
    """Load a LoRA adapter saved by PEFT or by save_adapter into `model`; returns `model`.

    A model without LoRA gets LoRA layers from the adapter's config (apply_lora, so the rest is
    frozen). A model that already has LoRA layers must have exactly the adapter's layers and ranks;
    their weights are replaced and their scales follow the adapter's lora_alpha.
    The adapter's LoraConfig becomes `model.lora_config`. Logs one line (INFO) unless verbose=False.
    `folder` may be a registry reference, "registry:NAME@production" or "registry:NAME@v3" (verified first).
    Raises before changing anything when a key or shape does not fit.
    """
    folder = adapter_folder(folder)
    config, raw = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        hint = " (found adapter_model.bin: re-save it with safe_serialization=True)" \
            if (folder / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}{hint}")
    existing = dict(lora_layers(model))
    if any(m.merged for m in existing.values()):
        raise ValueError("load_adapter: the model's LoRA is merged into its weights; call unmerge_lora(model) first")
    config = _our_names(model, config)
    header, start = read_safetensors_header(weights)
    header.pop("__metadata__", None)
    stored = {PREFIX + _stored_name(model, k.removeprefix(PREFIX), inverse=True) if k.startswith(PREFIX) else k: k
              for k in header}
    on_disk = header
    header = {k: on_disk[s] for k, s in stored.items()}

    def read(key):
        return read_tensor(weights, on_disk[stored[key]], start)

    fused = fused_modules(model)
    if any(f".{name}." in key for key in header for name in fused):  # PEFT's LoRA on fused modules: lora/fused.py
        config, split = split_adapter(model, config, {k: read(k) for k in header}, PREFIX, weights,
                                      {p: m.r for p, m in existing.items()})
        header = {k: {"dtype": header[k]["dtype"] if k in header else _st_dtype(t), "shape": list(t.shape)}
                  for k, t in split.items()}
        read = split.__getitem__
    expected = _expected_layers(model, config, existing, folder)
    whole = _expected_saved(model, config, existing, folder)
    expert_keys = _check_expert_keys(model, config, header, folder)
    tensors = _check_keys({k: v for k, v in header.items() if k not in expert_keys}, expected, whole, weights,
                          raw.get("base_model_name_or_path"), model)
    if not existing:
        apply_lora(model, config, verbose=False)
    layers = dict(lora_layers(model))
    with torch.no_grad():
        for path, m in layers.items():
            m.lora_A.copy_(read(tensors[path][0]))
            m.lora_B.copy_(read(tensors[path][1]))
            if config.use_dora:
                m.lora_magnitude_vector.copy_(read(tensors[path][2]))
            m.lora_alpha = config.rank_and_alpha(path)[1]
            m.use_rslora = config.use_rslora
            m.scale = lora_scale(m.r, m.lora_alpha, m.use_rslora)
            m.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
            m.dropout.train(m.training)
        for key, (path, name, _) in whole.items():
            getattr(model.get_submodule(path), name).copy_(read(key))
        for key, (p, _) in experts.adapter_keys(model, PREFIX).items():
            p.copy_(read(key))
    model.lora_config = config
    if verbose:
        logger.info(f"loaded LoRA adapter {folder} into {len(layers)} layers")
    return model


def _check_expert_keys(model, config: LoraConfig, header: dict, folder: Path) -> set[str]:
    """The adapter's expert LoRA keys (target_parameters), each present with the shape the model needs."""
    try:
        want = experts.expected_keys(model, config, PREFIX)
    except ValueError as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {e}; was the adapter made for another base model?") from e
    on_model = experts.adapter_keys(model, PREFIX)
    if on_model and set(on_model) != set(want):
        raise ValueError(f"{folder}: the adapter's target_parameters differ from the expert LoRA already on the "
                         "model; load it into a model without LoRA instead")
    problems = [f"missing tensor {k}" if k not in header else
                f"{k}: the adapter's tensor is {tuple(header[k]['shape'])}, this model's experts need {shape}"
                for k, shape in want.items() if k not in header or tuple(header[k]["shape"]) != shape]
    if problems:
        raise CheckpointError(f"{folder / WEIGHTS_NAME} does not fit this model's experts:\n  - "
                              + "\n  - ".join(problems[:12]))
    return set(want)


def _st_dtype(t: torch.Tensor) -> str:
    return {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}.get(t.dtype, "?")


def _expected_layers(model, config: LoraConfig, existing: dict, folder: Path) -> dict[str, tuple]:
    """{module path: (lora_A shape, lora_B shape)} that the adapter must provide for this model."""
    try:
        paths = target_paths(model, config)
    except ValueError as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {e}; was the adapter made for another base model?") from e
    if existing:
        if set(paths) != set(existing):
            extra, missing = sorted(set(paths) - set(existing)), sorted(set(existing) - set(paths))
            raise ValueError(
                f"{folder}: the adapter targets other layers than the LoRA already on the model "
                f"(only in the adapter: {extra[:4] or 'none'}; only on the model: {missing[:4] or 'none'}); "
                "load it into a model without LoRA instead"
            )
        for path, m in existing.items():
            r = config.rank_and_alpha(path)[0]
            if r != m.r:
                raise ValueError(f"{folder}: {path} has rank {r} in the adapter but {m.r} on the model; "
                                 "load it into a model without LoRA instead")
            if config.use_dora != m.use_dora:
                raise ValueError(f"{folder}: the adapter {'is' if config.use_dora else 'is not'} DoRA but {path} on "
                                 f"the model {'is' if m.use_dora else 'is not'}; load it into a model without LoRA "
                                 "instead")
        shapes = {p: (m.r, m.in_features, m.out_features) for p, m in existing.items()}
    else:
        shapes = {}
        for p in paths:
            w = model.get_submodule(p).weight
            shapes[p] = (config.rank_and_alpha(p)[0], w.shape[1], w.shape[0])
    # {path: {kind: shape}}: lora_A (r, in), lora_B (out, r), DoRA's magnitude (out,)
    return {p: {"lora_A": (r, i), "lora_B": (o, r)} | ({MAGNITUDE: (o,)} if config.use_dora else {})
            for p, (r, i, o) in shapes.items()}


def _expected_saved(model, config: LoraConfig, existing: dict, folder: Path) -> dict[str, tuple]:
    """{file key: (module path, parameter name, shape)} of the adapter's modules_to_save."""
    if existing and tuple(getattr(model, "lora_config", LoraConfig()).modules_to_save) != config.modules_to_save:
        raise ValueError(f"{folder}: the adapter's modules_to_save {list(config.modules_to_save)} differ from the "
                         "model's; load it into a model without LoRA instead")
    try:
        paths = saved_module_paths(model, config)
    except ValueError as e:
        raise CheckpointError(f"{folder / CONFIG_NAME}: {e}") from e
    return {f"{PREFIX}{p}.{n}": (p, n, tuple(t.shape))
            for p in paths for n, t in model.get_submodule(p).named_parameters(recurse=False)}


def _check_keys(header: dict, expected: dict, whole: dict, file: Path, adapter_base,
                model) -> dict[str, tuple[str, ...]]:
    """Map every adapter key onto a layer (or a module to save, `whole`) and check its shape:
    {path: (A key, B key[, magnitude key])}."""
    problems, found = [], {}
    base_note = (f" (the adapter was made for {adapter_base!r}, this model is "
                 f"{getattr(model, 'name_or_path', 'unnamed')!r})")
    for key, info in header.items():
        if info["dtype"] not in FLOAT_ST_DTYPES:
            problems.append(f"{key} is stored as {info['dtype']}, not a floating-point type; LoRA weights are "
                            f"{', '.join(FLOAT_ST_DTYPES)}")
    for key in whole:
        if key not in header:
            problems.append(f"missing tensor {key} (the config lists its module in modules_to_save)")
        elif tuple(header[key]["shape"]) != whole[key][2]:
            problems.append(f"{key}: the adapter's tensor is {tuple(header[key]['shape'])}, this model's module "
                            f"needs {whole[key][2]}")
    for key, info in header.items():
        if key in whole:
            continue
        path, kind = _split_key(key)
        if path is None:
            problems.append(f"unexpected tensor {key!r} (not a lora_A/lora_B weight: a PEFT feature we do not "
                            "support, such as LoRA on embeddings)")
            continue
        if path not in expected:
            problems.append(f"the adapter has weights for {path}, which this model has no LoRA layer for")
            continue
        if kind not in expected[path]:
            problems.append(f"unexpected tensor {key!r}: a DoRA magnitude in an adapter whose config says "
                            "use_dora=false")
            continue
        want = expected[path][kind]
        if tuple(info["shape"]) != want:
            problems.append(f"{path}.{kind}: the adapter's tensor is {tuple(info['shape'])}, this model's "
                            f"layer needs {want}")
            continue
        found.setdefault(path, {})[kind] = key
    for path, kinds in expected.items():
        for kind in kinds:
            if kind not in found.get(path, {}):
                problems.append(f"missing tensor {PREFIX}{path}.{kind}{'' if kind == MAGNITUDE else '.weight'}")
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise CheckpointError(
            f"{file} does not fit this model{base_note if adapter_base else ''}; was the adapter made for "
            "another base model?\n  - " + "\n  - ".join(shown)
        )
    return {p: tuple(d[k] for k in expected[p]) for p, d in found.items()}


def _split_key(key: str) -> tuple[str | None, str | None]:
    """'base_model.model.<path>.lora_A.weight' -> (<path>, 'lora_A'), also lora_B and DoRA's
    '<path>.lora_magnitude_vector'; anything else -> (None, None)."""
    if not key.startswith(PREFIX):
        return None, None
    if key.endswith("." + MAGNITUDE):
        return key[len(PREFIX):-len(MAGNITUDE) - 1], MAGNITUDE
    for kind in ("lora_A", "lora_B"):
        suffix = f".{kind}.weight"
        if key.endswith(suffix):
            return key[len(PREFIX):-len(suffix)], kind
    return None, None
