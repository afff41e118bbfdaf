"""save_gguf: a model (LoRA merged in) as one GGUF file for llama.cpp, plus an Ollama Modelfile beside it.

    save_gguf(model, "out/model.gguf", gguf_type="q8_0")   # writes out/model.gguf, out/model.Modelfile
    ollama create my-model -f out/model.Modelfile

The weights are what save_model(merge=True) writes (W + s * B @ A in fp32 per tensor, one tensor
at a time), cast once to the GGUF type by sources/gguf_write.py; the model in memory is not changed. The
tokenizer and chat template come from the folder the model was loaded from (`model.source_dir`).

The Modelfile's TEMPLATE is Ollama's Go-template form of the chat template. Jinja cannot be
translated in general, so we recognise the families whose markers we know (ChatML, Llama 3,
Mistral [INST]) and write their template; for any other we leave TEMPLATE out (Ollama then picks
one from the GGUF's tokenizer.chat_template) and say so in the file and in a warning.

Many templates put a system prompt of their own when the conversation has none (SmolLM2's "You are
a helpful AI assistant named SmolLM, ..."); the model was trained and evaluated with it. Ollama's
TEMPLATE only loops over messages, so that text goes into the Modelfile's SYSTEM, which Ollama puts
first when a request has no system message: the prompt then reads as the Jinja template renders it.
We find the text by rendering the template with a marker as the system message and without one.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from lora_engine.io.atomic import atomic_file, check_file_replaceable, starts_with
from lora_engine.kernels.nf4_format import NF4Tensor
from lora_engine.lora.layers import lora_layers
from lora_engine.models.chat_template import ChatTemplateError
from lora_engine.models.tokenizer import Tokenizer
from lora_engine.sources.gguf_write import GGUF_TYPES, MAGIC, chat_template, check_config, read_json, write_gguf

logger = logging.getLogger(__name__)
# The first line of every Modelfile we write: an existing Modelfile is replaced only if it starts so.
MODELFILE_HEAD = "# Written by lora_engine.export."

# Chat-template family: (marker in the Jinja template, Ollama TEMPLATE, stop strings).
OLLAMA_TEMPLATES = {
    "chatml": ("<|im_start|>",
               "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
               "{{ end }}<|im_start|>assistant\n",
               ("<|im_start|>", "<|im_end|>")),
    "llama3": ("<|start_header_id|>",
               "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
               "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "mistral": ("[INST]",
                '{{- range .Messages }}{{- if eq .Role "user" }}[INST] {{ .Content }}[/INST]'
                '{{- else if eq .Role "assistant" }}{{ .Content }}</s>{{- end }}{{- end }}',
                ("[INST]", "[/INST]")),
}


def save_gguf(model: nn.Module, path: str | os.PathLike, gguf_type: str = "f16", modelfile: bool = True,
              verbose: bool = True) -> Path:
    """Write `model` with its LoRA merged as a GGUF file (and `<stem>.Modelfile` beside it); returns the path.

    gguf_type: a llama.cpp file type: f32, f16, bf16, q8_0, q4_0, q4_1, q4_k_s, q4_k_m, q5_k_s, q5_k_m or
    q6_k, each with llama-quantize's per-tensor type mix (norms and biases stay F32).
    Raises ValueError for NF4 weights (merge a QLoRA adapter with export's --merge-into dequantized
    or --base), an unsupported family or tokenizer, before anything is written; OutputError when
    `path` or the Modelfile exists and is not a GGUF file / a Modelfile we wrote.
    """
    check_file_replaceable(path, starts_with(MAGIC), "a GGUF file")
    if modelfile:
        check_file_replaceable(modelfile_path(path), starts_with(MODELFILE_HEAD.encode()), "a Modelfile")
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"save_gguf: gguf_type {gguf_type!r} is not supported; supported: {', '.join(GGUF_TYPES)}")
    nf4 = [n for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), NF4Tensor)]
    if nf4:
        raise ValueError(f"save_gguf: {nf4[0]} (and {len(nf4) - 1} more) holds NF4 weights; GGUF export needs full "
                         "precision: merge into the dequantized weights (--merge-into dequantized) or into the "
                         "original checkpoint (--base PATH_16BIT)")
    source = getattr(model, "source_dir", None)
    if not source:
        raise ValueError("save_gguf: the model has no source_dir (the folder it was loaded from), so there is no "
                         "tokenizer to put into the GGUF file; load it with load_model(folder)")
    cfg = model.config
    check_config({"model_type": gguf_config(cfg)["model_type"]})  # a family we do not write, before any work
    carried = sorted(getattr(model, "carried_tensors", None) or ())
    if carried:
        warnings.warn(f"save_gguf: {len(carried)} tensors carried from the checkpoint ({', '.join(carried[:3])}"
                      f"{' ...' if len(carried) > 3 else ''}: a vision tower, multi-token-prediction heads) are not "
                      "in the GGUF file; the Hugging Face export (--out) keeps them", stacklevel=2)
    config = {**gguf_config(cfg), **{k: cfg.extra[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                     if cfg.extra.get(k) is not None}}
    state = model.state_dict()
    layers = dict(lora_layers(model))
    tied = getattr(cfg, "tie_word_embeddings", False)  # llama.cpp re-ties a missing output.weight
    names = [n for n in state if not n.endswith((".lora_A", ".lora_B")) and not (tied and n == "lm_head.weight")]

    def merged(name: str) -> torch.Tensor:  # (out, in) fp32
        module, _, leaf = name.rpartition(".")
        t = state[name].detach().float()
        if leaf == "weight" and module in layers and not layers[module].merged:
            t = t + layers[module].delta_weight()
        return t.cpu()

    log = logger.info if verbose else None
    path = write_gguf(path, config, {n: tuple(state[n].shape) for n in names},
                      merged,
                      source, gguf_type, name=Path(str(getattr(model, "name_or_path", "") or path)).name, log=log)
    if modelfile:
        write_modelfile(path, chat_template(source), _eos_token(source), default_system_prompt(source))
    return path


def gguf_config(cfg) -> dict:
    """The config.json the GGUF writer reads: rebuilt for the Llama families, else the one read from the folder,
    with the attention schedule as the engine resolved it (transformers' defaults applied)."""
    if cfg.model_type in ("llama", "mistral", "qwen2", "qwen3") and not cfg.layer_types:
        return cfg.to_hf()
    config = dict(cfg.extra)
    if isinstance(config.get("text_config"), dict):  # Qwen3.5's multimodal checkpoint: its text model is written
        config = {**config, **config["text_config"], "model_type": config["text_config"].get("model_type")}
    config["layer_types"] = list(cfg.layer_types) or None
    config["sliding_window"] = cfg.sliding_window
    if cfg.rope_layers:
        config["no_rope_layers"] = [int(x) for x in cfg.rope_layers]
    return config


# Stands in for a system message while the template renders; what surrounds it is the system turn's frame.
_MARK, _USER = "\x02lora-engine-system\x03", [{"role": "user", "content": "\x02lora-engine-user\x03"}]


def default_system_prompt(folder: str | os.PathLike) -> str | None:
    """The system prompt the folder's chat template writes when the conversation has none, else None.

    Rendered with a marked system message, the template shows the frame of a system turn (the text
    before and after the mark); rendered without one, a default system prompt is whatever fills that
    frame. Templates that write no system turn, or refuse one, have none."""
    if not chat_template(folder):
        return None
    tok = Tokenizer(folder)
    try:
        marked = tok.apply_chat_template([{"role": "system", "content": _MARK}, *_USER])
        plain = tok.apply_chat_template(_USER)
    except ChatTemplateError:
        return None
    if marked.count(_MARK) != 1:
        return None
    before, after = marked.split(_MARK)
    if len(plain) <= len(before) + len(after) or not (plain.startswith(before) and plain.endswith(after)):
        return None
    return plain[len(before):len(plain) - len(after)]


def _eos_token(folder) -> str | None:
    t = (read_json(Path(folder) / "tokenizer_config.json") or {}).get("eos_token")
    return t.get("content") if isinstance(t, dict) else t


def modelfile_text(gguf_name: str, template: str | None, eos: str | None, system: str | None = None) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` (beside it): FROM, TEMPLATE, SYSTEM (the template's
    default system prompt, when it has one), PARAMETER stop."""
    family = next((f for f, (marker, _, _) in OLLAMA_TEMPLATES.items() if template and marker in template), None)
    stem = gguf_name.rsplit(".", 1)[0]
    lines = [f"{MODELFILE_HEAD} Create the model with: ollama create NAME -f {stem}.Modelfile",
             f"FROM ./{gguf_name}"]
    stops = [eos] if eos else []
    if family:
        _, go, extra = OLLAMA_TEMPLATES[family]
        lines.append(f'TEMPLATE """{go}"""')
        stops += [s for s in extra if s not in stops]
    else:
        lines.append("# No TEMPLATE: the chat template is none we translate to Ollama's Go templates (ChatML, Llama 3, "
                     "Mistral); Ollama chooses one from the GGUF file's tokenizer.chat_template.")
    if system and '"""' in system:  # a Modelfile has no escape for it inside """...""": leave SYSTEM out
        warnings.warn(f'save_gguf: the chat template\'s default system prompt holds """, which a Modelfile cannot '
                      f"quote; the Modelfile has no SYSTEM, so add it yourself: {system[:80]!r}", stacklevel=3)
    elif system:
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | os.PathLike, template: str | None, eos: str | None,
                    system: str | None = None) -> Path:
    gguf_path = Path(gguf_path)
    text = modelfile_text(gguf_path.name, template, eos, system)
    if "\nTEMPLATE " not in text:
        warnings.warn(f"save_gguf: {gguf_path.stem}.Modelfile has no TEMPLATE: the chat template is not ChatML, "
                      "Llama 3 or Mistral; Ollama will choose one from the GGUF metadata", stacklevel=3)
    out = modelfile_path(gguf_path)
    with atomic_file(out, starts_with(MODELFILE_HEAD.encode()), "a Modelfile") as f:
        f.write(text.encode("utf-8"))
    return out


def modelfile_path(gguf_path: str | os.PathLike) -> Path:
    """The Modelfile beside a GGUF file: out/model.gguf -> out/model.Modelfile."""
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")
