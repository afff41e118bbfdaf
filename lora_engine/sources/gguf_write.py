"""Hugging Face config + tensors + tokenizer folder -> one GGUF file for llama.cpp and Ollama.

    write_gguf("model.gguf", config, shapes, tensor, tokenizer_dir, gguf_type="f16")

Pure Python (numpy and the `gguf` package from llama.cpp for its key names, type sizes and
quantizers); no llama.cpp build. The file is streamed, one tensor in memory at a time, into a
temporary beside the target and renamed into place (io/atomic.atomic_file): an interrupted export
leaves no partial file. An existing file is replaced only if it is a GGUF file (starts with "GGUF").

Layout (GGUF v3, little-endian): "GGUF", version, tensor count, key/value count, the key/values,
the tensor table (name, dims fastest-first, ggml type, offset), then each tensor's data aligned to
32 bytes. Per family: tensor names, fused/split/transposed tensors and the Q/K row permutation in
sources/gguf_layout.py; the metadata each llama.cpp architecture reads, and what it cannot express, in
sources/gguf_metadata.py.

Types (`gguf_type`): a llama.cpp file type (f32, f16, bf16, q8_0, q4_0, q4_1, q4_k_s, q4_k_m,
q5_k_s, q5_k_m, q6_k). The type of each tensor is llama-quantize's mix for that file type
(sources/gguf_mix.py: output head Q6_K, attn_v / ffn_down at more bits on some layers, 256-block
types demoted where rows do not fit, F16 where no block fits); 1-D tensors (norms, biases) are F32,
as llama.cpp's converter writes them. The 32-block quantizers are gguf.quants', numpy ports of
ggml's reference quantizers (quantize_row_q8_0_ref, ..._q4_0_ref, ...), which llama.cpp's
gguf-py/tests/test_quants.py checks byte for byte against libggml; the K-quants are ours
(sources/gguf_kquants.py). llama-quantize without an importance matrix calls the same reference
functions, so a tensor's bytes equal llama-quantize's from the same float32 values.

Tokenizer: byte-level BPE only (tokenizer.ggml.model "gpt2"); the pre-tokenizer name llama.cpp
needs (tokenizer.ggml.pre) is read off tokenizer.json's pre_tokenizer, and anything we cannot name
is refused rather than written with a pre-tokenizer that would split text differently.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lora_engine.io.atomic import atomic_file, check_file_replaceable, starts_with
from lora_engine.sources.gguf_kquants import BLOCK_BYTES as K_QUANTS
from lora_engine.sources.gguf_kquants import quantize_k
from lora_engine.sources.gguf_layout import (  # noqa: F401  (Planned, tensor_plan: part of this module's API)
    ARCHITECTURES,
    Planned,
    build_tensor,
    tensor_plan,
)
from lora_engine.sources.gguf_metadata import check_family, family_metadata, full_rope, rotary_dim
from lora_engine.sources.gguf_mix import FILE_TYPES, tensor_types

ALIGNMENT = 32
MAGIC = b"GGUF"
GGUF_TYPES = tuple(FILE_TYPES)  # --gguf-type's values: llama.cpp's file types
NORMAL, USER_DEFINED, CONTROL = 1, 4, 3  # llama.cpp token types
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# tokenizer.json Split regexes (before a ByteLevel without regex) -> llama.cpp pre-tokenizer name.
SPLIT_PRE_TOKENIZERS = {_LETTERS + r"\p{N}{1,3}" + _TAIL: "llama-bpe", _LETTERS + r"\p{N}" + _TAIL: "qwen2"}
PRE_TOKENIZERS = ("gpt-2", "smollm", *SPLIT_PRE_TOKENIZERS.values())


class KV:
    """One metadata entry with its GGUF value type (gguf.GGUFValueType name; arrays: ("ARRAY", item type))."""

    def __init__(self, key: str, value, vtype: str, item: str | None = None):
        self.key, self.value, self.vtype, self.item = key, value, vtype, item


# ---- architecture ---------------------------------------------------------------------------------
def check_config(config: dict) -> str:
    """The llama.cpp architecture for a Hugging Face config.json; ValueError for what we would write wrongly."""
    mt = config.get("model_type")
    if mt not in ARCHITECTURES:
        raise ValueError(f"GGUF export: model_type {mt!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    rope = full_rope(config)
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "linear") and not (mt == "gpt_oss" and kind == "yarn"):
        raise ValueError(f"GGUF export: rope scaling {kind!r} is not supported "
                         "(llama.cpp needs a rope_freqs tensor we do not write); only plain or linear RoPE")
    if mt in ("llama", "mistral", "qwen3") and (config.get("attention_bias") or config.get("mlp_bias")):
        raise ValueError(f"GGUF export: a {mt} model with attention_bias/mlp_bias is not supported; "
                         "llama.cpp's loaders and transformers' GGUF reader do not agree on those biases")
    check_family(config)
    return ARCHITECTURES[mt]


def architecture_metadata(config: dict, name: str, gguf_type: str) -> list[KV]:
    arch = check_config(config)
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    rope = full_rope(config)
    kv = [
        KV("general.architecture", arch, "STRING"),
        KV("general.name", name, "STRING"),
        KV("general.file_type", _file_type(gguf_type), "UINT32"),
        KV(f"{arch}.vocab_size", config["vocab_size"], "UINT32"),
        KV(f"{arch}.context_length", config.get("max_position_embeddings", 2048), "UINT32"),
        KV(f"{arch}.embedding_length", hidden, "UINT32"),
        KV(f"{arch}.block_count", config["num_hidden_layers"], "UINT32"),
        KV(f"{arch}.feed_forward_length", config.get("intermediate_size") or config["moe_intermediate_size"], "UINT32"),
        KV(f"{arch}.attention.head_count", heads, "UINT32"),
        KV(f"{arch}.attention.head_count_kv", config.get("num_key_value_heads") or heads, "UINT32"),
        KV(f"{arch}.rope.freq_base", float(rope["rope_theta"]), "FLOAT32"),
        KV(f"{arch}.rope.dimension_count", rotary_dim(config, head_dim), "UINT32"),
        KV(f"{arch}.attention.layer_norm_rms_epsilon", float(config.get("rms_norm_eps", 1e-6)), "FLOAT32"),
    ]
    if head_dim != hidden // heads:
        kv += [KV(f"{arch}.attention.key_length", head_dim, "UINT32"),
               KV(f"{arch}.attention.value_length", head_dim, "UINT32")]
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        kv += [KV(f"{arch}.rope.scaling.type", kind, "STRING"),
               KV(f"{arch}.rope.scaling.factor", float(rope["factor"]), "FLOAT32")]
    if kind == "yarn":
        kv.append(KV(f"{arch}.rope.scaling.original_context_length",
                     int(rope.get("original_max_position_embeddings", 4096)), "UINT32"))
    kv += [KV(f"{arch}.{key}", *rest) for key, *rest in family_metadata(config)]
    if FILE_TYPES[gguf_type][1].startswith("Q"):
        kv.append(KV("general.quantization_version", 2, "UINT32"))  # GGML_QNT_VERSION
    return kv


def _file_type(gguf_type: str) -> int:
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"GGUF export: type {gguf_type!r} is not supported; supported: {', '.join(GGUF_TYPES)}")
    return int(gguf.LlamaFileType[FILE_TYPES[gguf_type][0]])


# ---- tokenizer ------------------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def pre_tokenizer_name(pre: dict | None, where) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for a byte-level tokenizer.json pre_tokenizer."""
    def byte_level(p, regex):
        return (p.get("type") == "ByteLevel" and p.get("use_regex", True) == regex
                and not p.get("add_prefix_space", False))

    pre = pre or {}
    if byte_level(pre, True):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2:
        first, second = steps
        if first == {"type": "Digits", "individual_digits": True} and byte_level(second, True):
            return "smollm"
        if (first.get("type") == "Split" and first.get("behavior") == "Isolated" and not first.get("invert")
                and byte_level(second, False)):
            name = SPLIT_PRE_TOKENIZERS.get((first.get("pattern") or {}).get("Regex"))
            if name:
                return name
    raise ValueError(f"{where}: the pre_tokenizer {json.dumps(pre)[:300]} is none of llama.cpp's we can name "
                     f"({', '.join(PRE_TOKENIZERS)}); writing another name would make llama.cpp split text "
                     "differently from training")


def _added_around(processor: dict | None, where) -> tuple[str | None, str | None]:
    """(token put before, token put after) the text by tokenizer.json's post_processor."""
    if not processor or processor.get("type") == "ByteLevel":
        return None, None
    if processor.get("type") == "Sequence":
        found = [_added_around(p, where) for p in processor.get("processors", [])]
        return next((f[0] for f in found if f[0]), None), next((f[1] for f in found if f[1]), None)
    if processor.get("type") != "TemplateProcessing":
        raise ValueError(f"{where}: post_processor {processor.get('type')!r} is not supported; "
                         "supported: TemplateProcessing, ByteLevel")
    single = processor.get("single") or []
    first = single[0].get("SpecialToken", {}).get("id") if single else None
    last = single[-1].get("SpecialToken", {}).get("id") if len(single) > 1 else None
    return first, last


def tokenizer_metadata(folder: str | os.PathLike, vocab_size: int, fallback_ids: dict | None = None) -> list[KV]:
    """tokenizer.ggml.* and tokenizer.chat_template from a Hugging Face tokenizer folder.

    The vocabulary is padded to `vocab_size` (the embedding's rows) with "[PAD{id}]" tokens, as
    llama.cpp's converter pads it. fallback_ids: config.json's bos/eos/pad_token_id when
    tokenizer_config.json names no such token."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"GGUF export: {folder} has no tokenizer.json; a GGUF file carries its tokenizer, "
                                "so export from a folder saved with a fast tokenizer (tokenizer.save_pretrained)")
    tj = read_json(path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style BPE (byte_fallback)" if model.get("byte_fallback") else repr(model.get("type"))
        raise ValueError(f"{path}: a {kind} tokenizer is not supported for GGUF export; only byte-level BPE "
                         "(llama.cpp's 'gpt2' vocabularies: Llama 3, Qwen2, SmolLM, GPT-2)")
    pre = pre_tokenizer_name(tj.get("pre_tokenizer"), path)
    tokens: list[str | None] = [None] * vocab_size
    types = [NORMAL] * vocab_size
    too_big = []
    for t, i in model.get("vocab", {}).items():
        if i >= vocab_size:
            too_big.append((t, i))
        else:
            tokens[i] = t
    for a in tj.get("added_tokens") or []:
        if a["id"] >= vocab_size:
            too_big.append((a["content"], a["id"]))
        else:
            tokens[a["id"]], types[a["id"]] = a["content"], CONTROL if a.get("special") else USER_DEFINED
    if too_big:
        raise ValueError(f"{path}: {len(too_big)} tokens have ids beyond the model's {vocab_size} embedding rows, "
                         f"e.g. {too_big[0][0]!r} = {too_big[0][1]}; the GGUF vocabulary must fit the embedding")
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    cfg = read_json(folder / "tokenizer_config.json") or {}
    special = read_json(folder / "special_tokens_map.json") or {}

    def token_id(name, fallback_key):
        t = cfg.get(name) or special.get(name)
        t = t.get("content") if isinstance(t, dict) else t
        if t is not None and t not in ids:
            raise ValueError(f"{folder}: {name} {t!r} is not in the vocabulary")
        return ids[t] if t is not None else (fallback_ids or {}).get(fallback_key)

    kv = [KV("tokenizer.ggml.model", "gpt2", "STRING"), KV("tokenizer.ggml.pre", pre, "STRING"),
          KV("tokenizer.ggml.tokens", tokens, "ARRAY", "STRING"),
          KV("tokenizer.ggml.token_type", types, "ARRAY", "INT32"),
          KV("tokenizer.ggml.merges", merges, "ARRAY", "STRING")]
    bos, eos = token_id("bos_token", "bos_token_id"), token_id("eos_token", "eos_token_id")
    before, after = _added_around(tj.get("post_processor"), path)
    for what, tok, wanted in (("before", before, bos), ("after", after, eos)):
        if tok is not None and ids.get(tok) != wanted:
            raise ValueError(f"{path}: the post_processor puts {tok!r} {what} the text, but the "
                             f"{'bos' if what == 'before' else 'eos'} token is id {wanted}; llama.cpp can only add "
                             "the bos/eos token itself")
    for key, value in (("bos_token_id", bos), ("eos_token_id", eos),
                       ("padding_token_id", token_id("pad_token", "pad_token_id")),
                       ("unknown_token_id", token_id("unk_token", "unk_token_id"))):
        if value is not None:
            kv.append(KV(f"tokenizer.ggml.{key}", int(value), "UINT32"))
    kv += [KV("tokenizer.ggml.add_bos_token", before is not None, "BOOL"),
           KV("tokenizer.ggml.add_eos_token", after is not None, "BOOL")]
    template = chat_template(folder)
    if template:
        kv.append(KV("tokenizer.chat_template", template, "STRING"))
    return kv


def chat_template(folder: str | os.PathLike) -> str | None:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json's (its "default" if several)."""
    folder = Path(folder)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    t = (read_json(folder / "tokenizer_config.json") or {}).get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    return t or None


# ---- tensors --------------------------------------------------------------------------------------
def encode_tensor(w: np.ndarray, type_name: str) -> np.ndarray:
    """float32 (rows, cols) or (n,) -> the bytes of ggml type `type_name` (uint8, C order)."""
    import gguf.quants

    w = np.ascontiguousarray(w, dtype=np.float32)
    if type_name == "F32":
        return w.view(np.uint8).reshape(-1)
    if type_name in K_QUANTS:
        return quantize_k(w, type_name).reshape(-1)
    if type_name == "F16":
        out = w.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(w).all():
            raise ValueError(f"values up to {np.abs(w).max():.4g} overflow float16 (max 65504); export as bf16 or f32")
        return out.view(np.uint8).reshape(-1)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name]).reshape(-1)


def _nbytes(shape: tuple[int, ...], type_name: str) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return math.prod(shape) // block * size


# ---- file -----------------------------------------------------------------------------------------
def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: str, value) -> bytes:
    import gguf

    t = gguf.GGUFValueType[vtype]
    if t == gguf.GGUFValueType.STRING:
        return _string(value)
    fmt = {"UINT8": "<B", "INT8": "<b", "UINT16": "<H", "INT16": "<h", "UINT32": "<I", "INT32": "<i",
           "FLOAT32": "<f", "BOOL": "<?", "UINT64": "<Q", "INT64": "<q", "FLOAT64": "<d"}[vtype]
    return struct.pack(fmt, value)


def _kv_bytes(kv: KV) -> bytes:
    import gguf

    out = _string(kv.key) + struct.pack("<I", gguf.GGUFValueType[kv.vtype])
    if kv.vtype != "ARRAY":
        return out + _value(kv.vtype, kv.value)
    out += struct.pack("<IQ", gguf.GGUFValueType[kv.item], len(kv.value))
    if kv.item == "STRING":
        return out + b"".join(_string(s) for s in kv.value)
    np_type = {"INT32": "<i4", "UINT32": "<u4", "FLOAT32": "<f4"}[kv.item]
    return out + np.asarray(kv.value, dtype=np_type).tobytes()


def write_gguf(path: str | os.PathLike, config: dict, shapes: dict[str, tuple[int, ...]],
               tensor: Callable[[str], object], tokenizer_dir: str | os.PathLike, gguf_type: str = "f16",
               name: str | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Write a GGUF file; returns its path.

    config: the model's Hugging Face config.json (dict). shapes: {HF tensor name: shape} of what to
    write (a tied lm_head left out). tensor(hf_name) -> that tensor as float32 (a torch tensor or
    numpy array, HF layout: (out, in)); called once per name, in file order. tokenizer_dir: the folder with
    tokenizer.json, tokenizer_config.json (and chat_template.jinja). Everything is checked before the
    first byte is written; the file appears complete under `path` or not at all.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"GGUF export: {path} is a folder; pass the path of the .gguf file to write")
    check_file_replaceable(path, starts_with(MAGIC), "a GGUF file")
    metadata = architecture_metadata(config, name or path.stem, gguf_type)
    metadata += tokenizer_metadata(tokenizer_dir, config["vocab_size"],
                                   {k: config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    plan = tensor_plan(config, shapes)
    layout = {}
    header = bytearray(MAGIC + struct.pack("<IQQ", 3, len(plan), len(metadata)))
    for kv in metadata:
        header += _kv_bytes(kv)
    offset, fallback = 0, []
    arch = check_config(config)
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    gshapes = {p.name: tuple(int(s) for s in p.shape) for p in plan}
    types = tensor_types(gshapes, gguf_type, config["num_hidden_layers"],
                         n_expert=config.get("num_local_experts") or config.get("num_experts") or 1,
                         llama_70b=config["num_hidden_layers"] == 80 and (
                             arch == "qwen2" or (arch == "llama" and kv_heads != heads)))
    for p in plan:
        g, shape = p.name, gshapes[p.name]
        ttype = "F32" if p.f32 else types[g]
        if ttype == "F16" and FILE_TYPES[gguf_type][1] != "F16" and len(shape) > 1:
            fallback.append(g)
        layout[g] = (shape, ttype)
        header += _string(g) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *reversed(shape))
        header += struct.pack("<IQ", _ggml_type(ttype), offset)
        offset += -(-_nbytes(shape, ttype) // ALIGNMENT) * ALIGNMENT
    if fallback:
        warnings.warn(f"GGUF export: {len(fallback)} tensors ({', '.join(fallback[:4])}) have rows that are not whole "
                      f"blocks of {gguf_type}; written as F16, as llama.cpp does", stacklevel=2)
    header += b"\0" * (-len(header) % ALIGNMENT)
    with atomic_file(path, starts_with(MAGIC), "a GGUF file") as f:
        f.write(header)
        for i, p in enumerate(plan, 1):
            (g, hf), (shape, ttype) = (p.name, p.sources[0]), layout[p.name]
            w = build_tensor(p, tensor, config)
            try:
                data = encode_tensor(w, ttype)
            except ValueError as e:
                raise ValueError(f"GGUF export: tensor {hf} ({g}) as {ttype}: {e}") from None
            f.write(data.tobytes())
            f.write(b"\0" * (-data.nbytes % ALIGNMENT))
            if log:
                log(f"  {i}/{len(plan)} {g} {ttype} {shape}")
    return path


def _ggml_type(type_name: str) -> int:
    import gguf

    return int(gguf.GGMLQuantizationType[type_name])
