"""The one model builder: config.json -> module tree on meta -> swaps -> storage -> weights.

Every model the engine runs is built here: load_model's, the NF4 loaders' and the memory plan's meta
model. The steps, in the order that keeps memory near one copy of the weights:

  1. open_checkpoint: config.json parsed (once) and the safetensors headers read (names and shapes;
     nothing allocated). The config is checked against them before anything is built: a config.json
     that does not describe these weights (10^7 layers, a vocabulary of 10^12) is refused in one line.
  2. build_model: CausalLM built on the meta device in its dtype (no storage), then each swap replaces
     modules in place. The model layer knows nothing of quantization: an NF4 loader passes a swap that
     puts Linear4bit shells where nn.Linear were (gpt-fast's quantize.py pattern), so full-precision
     weights are never allocated; MoE experts or a new family's quirks slot in the same way. The model's
     size is checked against the checkpoint's; then it gets uninitialised storage on the device, the
     tied head (once) and its recomputed buffers.
  3. load_weights: each tensor read from its file straight into its parameter by the strict loader
     (io/safetensors.py: every key and shape checked, problems reported together), with a hook for
     what a swap put in place of a parameter (NF4 quantizes or assembles there).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_engine.io.safetensors import (
    CheckpointError,
    LoadHook,
    checkpoint_files,
    float_dtype,
    load_checkpoint,
    read_safetensors_header,
)
from lora_engine.models import gpt_oss, hybrid
from lora_engine.models.config import ModelConfig
from lora_engine.models.decoder import CausalLM
from lora_engine.models.families import fused_groups
from lora_engine.models.moe import checkpoint_views
from lora_engine.sources.embedded import resolve_path

# A swap changes the meta model in place (replaces modules by name); it runs before any storage exists.
Swap = Callable[[CausalLM], None]

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
EMBEDDING = "model.embed_tokens.weight"
# A model may need more bytes than its checkpoint holds: a bf16 or fp16 file loaded in fp32 doubles, in
# fp64 quadruples. Beyond that (and a little slack for tiny models), the config describes other weights.
_WIDENING = 4
_SLACK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Checkpoint:
    """A model folder as read before anything is built: its config.json and its tensors' shapes."""

    folder: Path
    config: ModelConfig
    shapes: Mapping[str, tuple[int, ...]]  # every stored tensor, from the safetensors headers
    nbytes: int  # bytes of tensor data in its files

    @property
    def config_file(self) -> Path:
        return self.folder / "config.json"

    @property
    def quantization_config(self):
        """config.json's `quantization_config` (a saved quantized checkpoint), or None."""
        return self.config.extra.get("quantization_config")

    def dtype(self, requested=None) -> torch.dtype:
        """`requested` (a dtype or its name) when given, else the dtype config.json names."""
        if requested is not None:
            return float_dtype(requested)
        try:
            return float_dtype(self.config.torch_dtype)
        except ValueError as e:
            raise CheckpointError(f"{self.config_file}: {e}; pass dtype= to choose one") from e


def open_checkpoint(path) -> Checkpoint:
    """The folder (or embedded model name, or registry reference) `path` as a Checkpoint, its config.json
    checked against its tensors' shapes. FileNotFoundError/NotADirectoryError for a path that is not a
    model folder, CheckpointError naming the file for a config or checkpoint that does not hold together."""
    folder = resolve_path(path)
    config = ModelConfig.from_hf(folder / "config.json")
    files = checkpoint_files(folder)
    headers = {f: read_safetensors_header(f)[0] for f in sorted(set(files.values()))}
    # A name the index lists but its shard lacks is the strict loader's to report.
    shapes = {hybrid.model_name(config.model_type, name): tuple(headers[f][name]["shape"])
              for name, f in files.items() if name in headers[f]}
    nbytes = sum(end - begin for h in headers.values() for begin, end in (i["data_offsets"] for i in h.values()))
    ckpt = Checkpoint(folder, config, shapes, nbytes)
    _check_config(ckpt, files)
    return ckpt


def _check_config(ckpt: Checkpoint, files: Mapping[str, Path]) -> None:
    """The sizes that decide what building costs, against the stored shapes: the layer count before any
    module is built, the embedding (vocabulary x hidden size) before any storage is allocated. Everything
    else is compared tensor by tensor when the weights are read."""
    c, where = ckpt.config, ckpt.config_file
    stored = max((int(m.group(1)) + 1 for name in ckpt.shapes if (m := _LAYER.match(name))), default=0)
    if c.num_hidden_layers > stored:  # more stored layers than configured: the loader lists the unexpected ones
        held = f"only {stored} (model.layers.0 to model.layers.{stored - 1})" if stored else "none"
        raise CheckpointError(f"{where}: num_hidden_layers is {c.num_hidden_layers:,} but the checkpoint holds "
                              f"{held}: config.json does not describe these weights")
    shape = ckpt.shapes.get(EMBEDDING)
    if shape is not None and shape != (c.vocab_size, c.hidden_size):
        raise CheckpointError(f"{where}: vocab_size {c.vocab_size:,} and hidden_size {c.hidden_size:,} do not fit "
                              f"{EMBEDDING}, which is {shape} in {files[EMBEDDING].name}: config.json does not "
                              "describe these weights")


def tied_keys(config: ModelConfig) -> frozenset[str]:
    """State-dict keys that are another tensor (the head tied to the embedding): not stored, not loaded."""
    return frozenset({"lm_head.weight"}) if config.tie_word_embeddings else frozenset()


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device="meta", *,
                swaps: Iterable[Swap] = (), checkpoint: Checkpoint | None = None) -> CausalLM:
    """CausalLM(config) in `dtype`: built on the meta device, each swap applied in order, then (unless
    `device` is meta) given uninitialised storage on `device`, the tied head and the rotary buffers.

    With `checkpoint`, the model's size is checked against the checkpoint's before any storage exists
    (CheckpointError naming config.json when it describes far more than the files hold).
    """
    with torch.device("meta"):
        model = CausalLM(config).to(dtype)  # dtype first: on meta this costs nothing
    for swap in swaps:
        swap(model)
    if checkpoint is not None:
        _check_size(model, checkpoint)
    if torch.device(device).type == "meta":
        return model
    return materialize(model, device)


def materialize(model: CausalLM, device) -> CausalLM:
    """A meta model given uninitialised storage on `device` (fake storage under a FakeTensorMode), its head
    tied again (to_empty gives each parameter its own storage) and its buffers recomputed."""
    model = model.to_empty(device=device)
    model.tie_weights()
    model.reset_buffers()
    return model


def _check_size(model: CausalLM, ckpt: Checkpoint) -> None:
    skip = tied_keys(model.config)
    tensors = [t for k, t in model.state_dict(keep_vars=True).items() if k not in skip]
    need = sum(t.numel() * t.element_size() for t in tensors)
    # gpt-oss's MXFP4 experts take 4.25 bits a value on disk: up to 32 / 4.25 = 7.5 times that in fp32
    widening = 2 * _WIDENING if gpt_oss.is_mxfp4(ckpt.config.extra) else _WIDENING
    if need > widening * ckpt.nbytes + _SLACK_BYTES:
        raise CheckpointError(
            f"{ckpt.config_file}: the model it describes needs {need / 2**30:,.2f} GiB "
            f"({sum(t.numel() for t in tensors):,} values) but the checkpoint's tensors hold "
            f"{ckpt.nbytes / 2**30:,.2f} GiB: config.json does not describe these weights")


def load_weights(model: CausalLM, checkpoint: Checkpoint, hook: LoadHook | None = None, *,
                 finish: Callable[[], list[str]] | None = None,
                 placeholders: Mapping[str, torch.Tensor] | None = None, name_or_path=None) -> CausalLM:
    """Fill every parameter and buffer of the materialized `model` from `checkpoint`, strictly (see
    io/safetensors.py load_checkpoint for `hook` and `finish`). placeholders: {name: meta tensor} a hook
    takes in place of a parameter a swap removed, so the loader checks its shape and reports it missing.
    Records where the model came from (name_or_path, default the folder; source_dir) and returns it in
    eval mode."""
    skip = tied_keys(model.config)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items() if k not in skip}
    expected.update(placeholders or {})
    # MoE experts: read into views of the 3-D parameters under the checkpoint's per-expert names
    expected = checkpoint_views(model.config.model_type, expected, set(checkpoint.shapes))
    hook = _split_fused(model.config, expected, hook, checkpoint.config_file)
    # gpt-oss's MXFP4 experts (the released checkpoints): dequantized while read
    hook = gpt_oss.read_mxfp4(expected, set(checkpoint.shapes), hook, checkpoint.config_file)
    # Keyed as stored (Qwen3.5's multimodal layout), the MTP heads and vision tower carried (models/hybrid.py)
    expected = {hybrid.checkpoint_name(model.config.model_type, k): v for k, v in expected.items()}
    hook = hybrid.carry(model, hook)
    load_checkpoint(checkpoint.folder, expected, hook, skip=skip, finish=finish,
                    what=f"the {model.config.model_type} model built from its config.json")
    hybrid.warn_untrained(model)
    model.name_or_path = str(name_or_path if name_or_path is not None else checkpoint.folder)
    model.source_dir = str(checkpoint.folder)
    return model.eval()


def _split_fused(config: ModelConfig, expected: dict, hook: LoadHook | None, where: Path) -> LoadHook | None:
    """For a checkpoint storing fused tensors (Phi-3's qkv_proj, gate_up_proj; families.FUSED): `expected`
    gets the stored key (a meta tensor of the fused shape, so the loader checks it) in place of its parts,
    and the returned hook reads it once and copies each row block into its part. Else `hook` unchanged.
    With a `hook` (NF4 on load: quant/checkpoint.py), each row block goes to it first as the part it is
    (`q_proj.weight`, ...), so a quantized part is quantized from its own rows; a part it does not take (kept
    in full precision) is copied. Every other stored tensor goes to `hook`."""
    groups = {key: members for key, members in fused_groups(config.model_type, list(expected)) if len(members) > 1}
    if not groups:
        return hook
    parts = {}
    for key, members in groups.items():
        targets = [(m, expected.pop(m)) for m in members]
        expected[key] = torch.empty((sum(t.shape[0] for _, t in targets), *targets[0][1].shape[1:]), device="meta")
        parts[key] = targets

    def split(stored) -> bool:
        targets = parts.get(stored.name)
        if targets is None:
            return hook is not None and hook(stored)
        with torch.no_grad():
            for (name, t), block in zip(targets, stored.read().split([t.shape[0] for _, t in targets])):
                if hook is None or not hook(_Part(name, stored.file, block)):
                    t.data.copy_(block)
        return True

    return split


class _Part:
    """A row block of a fused stored tensor, handed to a load hook as if it were stored under its part's name."""

    def __init__(self, name: str, file: Path, tensor: torch.Tensor):
        self.name, self.file, self._tensor = name, file, tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._tensor.dtype

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensor if out is None else out.copy_(self._tensor)
