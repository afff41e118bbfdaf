"""GGUF (llama.cpp) -> Hugging Face folder, for Llama-architecture files with a byte-level BPE vocabulary.

One idea over ~480 lines: reading a GGUF file, its checks included, into a Hugging Face folder.

    python -m lora_engine.convert FILE.gguf OUT_DIR [--force]

Writes config.json, model.safetensors (float32), tokenizer.json, tokenizer_config.json,
special_tokens_map.json and generation_config.json.

The file layout (GGUF v2/v3, little-endian): magic "GGUF", uint32 version, uint64 tensor count,
uint64 key/value count, the key/values, the tensor table (name, dims fastest-first, ggml type,
offset), then the tensor data aligned to `general.alignment` (default 32). We parse the header
ourselves: it is small, and this way every corruption is reported with the file name and byte
offset (gguf.GGUFReader also takes ~9 s to build its field objects for a 49k-token vocabulary).
The blocks are dequantized with the gguf package (gguf.quants.dequantize); the result is
bit-identical to transformers' own GGUF dequantizer (tests/test_embedded.py checks every tensor).

llama.cpp stores the rows of the Q and K projections permuted for its interleaved RoPE; we undo
it so the weights fit Hugging Face's rotate-half RoPE (docs/embedded_model.md). The vocabulary's
pre-tokenizer follows `tokenizer.ggml.pre` the way llama.cpp does (tokenizer.py: byte_level_bpe). The
names and the permutation are shared with the writer (sources/gguf_layout.py).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import re
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_engine.cli import logs_to, option, parse, user_input
from lora_engine.io.atomic import Owned, atomic_dir, write_bytes
from lora_engine.io.safetensors import CheckpointError
from lora_engine.sources.gguf_layout import TENSOR_NAMES, unpermute_rows

logger = logging.getLogger(__name__)

# GGUF metadata value types -> struct format (scalars); 8 = string, 9 = array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8"}
# ggml types we dequantize (all through gguf.quants): F32, F16, BF16 and the classic/k-quant blocks.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


class GGUFError(CheckpointError):
    """A GGUF file is corrupted, or holds something we do not convert; the message names the file."""


class GGUFFile:
    """The header of a GGUF file (metadata and tensor table) and zero-copy access to tensor bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist; pass the path of a .gguf file")
        size = self.path.stat().st_size
        if size < 24:
            raise GGUFError(f"{self.path} is not a GGUF file: only {size} bytes")
        with open(self.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._pos = 0
        try:
            self._parse_header(size)
        except GGUFError:
            self._mm.close()
            raise
        except (struct.error, UnicodeDecodeError, OverflowError, MemoryError, ValueError) as e:
            self._mm.close()
            raise GGUFError(
                f"{self.path} is truncated or corrupted: the GGUF header breaks off near byte {self._pos} ({e})"
            ) from e

    def _parse_header(self, size: int) -> None:
        if self._mm[:4] != b"GGUF":
            raise GGUFError(f"{self.path} is not a GGUF file: it starts with {bytes(self._mm[:4])!r}, not b'GGUF'")
        self._pos = 4
        version = self._read("<I")
        if version not in (2, 3):
            hint = " (a big-endian file?)" if version > 0xFFFF else ""
            raise GGUFError(f"{self.path}: GGUF version {version} is not supported{hint}; supported: 2, 3")
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        if n_tensors > size or n_kv > size:
            raise GGUFError(f"{self.path} is corrupted: header claims {n_tensors} tensors and {n_kv} metadata keys")
        self.metadata: dict = {}
        for _ in range(n_kv):
            key = self._string()
            if key in self.metadata:
                raise GGUFError(f"{self.path} is corrupted: metadata key {key!r} appears twice")
            self.metadata[key] = self._value(self._read("<I"), key)
        self.tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}  # name -> (dims fastest-first, type, offset)
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._read("<I")
            if n_dims > 8:
                raise GGUFError(f"{self.path} is corrupted: tensor {name!r} claims {n_dims} dimensions")
            dims = tuple(self._read("<Q") for _ in range(n_dims))
            if name in self.tensors:
                raise GGUFError(f"{self.path} is corrupted: tensor {name!r} appears twice in the tensor table")
            self.tensors[name] = (dims, self._read("<I"), self._read("<Q"))
        align = self.metadata.get("general.alignment", 32)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0:
            raise GGUFError(f"{self.path} is corrupted: general.alignment is {align!r}")
        self.data_start = (self._pos + align - 1) // align * align
        for name in self.tensors:
            begin, end = self.byte_range(name)
            if self.data_start + end > size:
                raise GGUFError(
                    f"{self.path} is truncated: tensor {name!r} needs bytes {self.data_start + begin}.."
                    f"{self.data_start + end} but the file has {size}"
                )

    def _read(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self._mm, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._read("<Q")
        if self._pos + n > len(self._mm):
            raise GGUFError(f"{self.path} is truncated: a string of {n} bytes at byte {self._pos} runs past the end")
        s = self._mm[self._pos : self._pos + n].decode("utf-8")
        self._pos += n
        return s

    def _value(self, vtype: int, key: str):
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])
        if vtype == 8:
            return self._string()
        if vtype == 9:
            itype, n = self._read("<I"), self._read("<Q")
            if itype == 8:
                return [self._string() for _ in range(n)]
            if itype not in _NP:
                raise GGUFError(f"{self.path} is corrupted: metadata {key!r} is an array of unknown type {itype}")
            if self._pos + n * int(_NP[itype][-1]) > len(self._mm):
                raise GGUFError(f"{self.path} is truncated: metadata {key!r} ({n} items) runs past the end")
            arr = np.frombuffer(self._mm, dtype=_NP[itype], count=n, offset=self._pos)
            self._pos += arr.nbytes
            return arr.tolist()
        raise GGUFError(f"{self.path} is corrupted: metadata {key!r} has unknown value type {vtype}")

    def type_name(self, name: str) -> str:
        import gguf

        ggml_type = self.tensors[name][1]
        try:
            return gguf.GGMLQuantizationType(ggml_type).name
        except ValueError:
            return f"unknown type {ggml_type}"

    def byte_range(self, name: str) -> tuple[int, int]:
        """(begin, end) of a tensor's bytes, relative to the data section."""
        import gguf

        dims, ggml_type, offset = self.tensors[name]
        try:
            block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise GGUFError(f"{self.path}: tensor {name!r} has unknown ggml type {ggml_type}") from None
        if dims and dims[0] % block:
            raise GGUFError(f"{self.path}: tensor {name!r} rows of {dims[0]} are not whole blocks of {block}")
        return offset, offset + math.prod(dims) // block * nbytes

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a float32 array in row-major order (shape = dims reversed)."""
        import gguf.quants

        type_name = self.type_name(name)
        if type_name not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{self.path}: tensor {name!r} is stored as {type_name}, which we do not dequantize; "
                f"supported: {', '.join(SUPPORTED_TYPES)}"
            )
        dims, ggml_type, _ = self.tensors[name]
        begin, end = self.byte_range(name)
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=end - begin, offset=self.data_start + begin)
        rows = math.prod(dims[1:])
        w = gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType(ggml_type))
        # A copy: F32 tensors come back as views of the memory map, which must not outlive close().
        return np.array(w, dtype=np.float32).reshape(tuple(reversed(dims)))

    def close(self) -> None:
        self._mm.close()


def _f32(x) -> float:
    # GGUF stores float32; keep its shortest decimal (1e-05, not 9.999999747378752e-06): the same
    # number once PyTorch adds it to a float32 tensor, and what the original config.json said.
    return float(str(np.float32(x)))


def hf_config(g: GGUFFile, name_or_path: str | None = None) -> dict:
    """config.json for a Llama GGUF file; raises GGUFError for anything we would convert wrongly, metadata of the
    wrong type or out of range included."""
    m, where = g.metadata, g.path
    arch = m.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{where}: architecture {arch!r} is not supported; supported: llama")

    def need(key):
        if f"llama.{key}" not in m:
            raise GGUFError(f"{where}: metadata llama.{key} is missing; the file is incomplete")
        v = m[f"llama.{key}"]
        if isinstance(v, list):
            raise GGUFError(f"{where}: llama.{key} varies per layer ({v[:4]}...), which is not supported")
        return v

    def count(key, default=None, low=1):
        """An integer setting, present or defaulted, checked: a count of 0 heads would divide by zero."""
        v = need(key) if default is None else m.get(f"llama.{key}", default)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise GGUFError(f"{where}: metadata llama.{key} must be an integer >= {low}, got {v!r:.60}")
        return v

    def number(key, default=None):
        v = need(key) if default is None else m.get(f"llama.{key}", default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise GGUFError(f"{where}: metadata llama.{key} must be a positive number, got {v!r:.60}")
        return v

    heads, hidden = count("attention.head_count"), count("embedding_length")
    kv = count("attention.head_count_kv", heads)
    if heads % kv:
        raise GGUFError(f"{where}: {heads} attention heads do not split into groups of {kv} key/value heads")
    if "llama.attention.key_length" not in m and hidden % heads:
        raise GGUFError(f"{where}: embedding_length {hidden} is not a multiple of {heads} heads")
    head_dim = count("attention.key_length", hidden // heads)
    if head_dim % 2:
        raise GGUFError(f"{where}: head_dim {head_dim} is odd; RoPE rotates pairs of dimensions")
    if count("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"{where}: partial rotary embeddings (llama.rope.dimension_count "
                        f"{m['llama.rope.dimension_count']} < head_dim {head_dim}) are not supported")
    scaling = m.get("llama.rope.scaling.type", "none")
    if scaling != "none" or "rope_freqs.weight" in g.tensors:
        raise GGUFError(f"{where}: rope scaling ({scaling!r:.40}, rope_freqs) is not supported; only plain RoPE")
    if m.get("llama.expert_count", 0):
        raise GGUFError(f"{where}: mixture-of-experts files (llama.expert_count) are not supported")
    for key in ("bos", "eos", "padding", "unknown"):
        v = m.get(f"tokenizer.ggml.{key}_token_id")
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise GGUFError(f"{where}: metadata tokenizer.ggml.{key}_token_id must be an integer, got {v!r:.60}")
    tokens = m.get("tokenizer.ggml.tokens") or []
    if not isinstance(tokens, list):
        raise GGUFError(f"{where}: metadata tokenizer.ggml.tokens must be an array of strings")
    theta = _f32(number("rope.freq_base", 10000.0))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": count("vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": count("feed_forward_length"),
        "num_hidden_layers": count("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": count("context_length", 2048),
        "rms_norm_eps": _f32(number("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": m.get("tokenizer.ggml.padding_token_id"),
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    if name_or_path:
        cfg["_name_or_path"] = name_or_path
    return cfg


def tensor_plan(g: GGUFFile, cfg: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """[(gguf name, HF name, HF shape)] sorted by HF name; every tensor checked against the config."""
    L, D, F_, V = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_out, kv_out = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {
        "model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D),
        "q_proj": (q_out, D), "k_proj": (kv_out, D), "v_proj": (kv_out, D), "o_proj": (D, q_out),
        "gate_proj": (F_, D), "up_proj": (F_, D), "down_proj": (D, F_),
        "input_layernorm": (D,), "post_attention_layernorm": (D,),
    }
    patterns = [(re.compile("^" + re.escape(k).replace(r"\{\}", r"(\d+)") + "$"), v) for k, v in TENSOR_NAMES.items()]
    plan, problems, seen = [], [], set()
    for name, (dims, _, _) in g.tensors.items():
        hf = next((v.format(*mt.groups()) for p, v in patterns if (mt := p.match(name))), None)
        if hf is None:
            problems.append(f"tensor {name!r} has no Llama equivalent we convert (biases, rope_freqs, ...)")
            continue
        layer = re.search(r"layers\.(\d+)\.", hf)
        if layer and int(layer.group(1)) >= L:
            problems.append(f"tensor {name!r} belongs to layer {layer.group(1)} but block_count is {L}")
            continue
        seen.add(hf)  # present, even if unusable: report it once, not also as missing
        if g.type_name(name) not in SUPPORTED_TYPES:
            problems.append(f"tensor {name!r} is stored as {g.type_name(name)}, which we do not dequantize "
                            f"(supported: {', '.join(SUPPORTED_TYPES)})")
            continue
        want = shapes.get(hf) or shapes[hf.split(".")[-2]]
        got = tuple(reversed(dims))  # GGUF lists dims fastest-first
        if got != want:
            problems.append(f"tensor {name!r} has shape {got}, the config implies {want} for {hf}")
            continue
        plan.append((name, hf, want))
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        v.format(i) for i in range(L) for k, v in TENSOR_NAMES.items() if "{}" in k
    }
    if not cfg["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    missing = sorted(expected - seen)
    if missing:
        problems.append(f"{len(missing)} tensors missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if problems:
        raise GGUFError(f"{g.path} does not hold a Llama model we can convert:\n  - " + "\n  - ".join(problems))
    return sorted(plan, key=lambda t: t[1])


def write_safetensors(g: GGUFFile, cfg: dict, plan, path: Path,
                      progress: Callable[[int, int], None] | None = None) -> None:
    """Stream every tensor of `plan` into one float32 safetensors file: one tensor in memory at a time.

    progress(done, total), when given, is called after each tensor."""
    import torch

    from lora_engine.io.safetensors import write_safetensors as write_streamed

    source = {hf: name for name, hf, _ in plan}
    done = []

    def dequantized(hf: str) -> torch.Tensor:
        w = g.dequantize(source[hf])
        if hf.endswith("q_proj.weight"):
            w = unpermute_rows(w, cfg["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            w = unpermute_rows(w, cfg["num_key_value_heads"])
        done.append(hf)
        if progress is not None:
            progress(len(done), len(plan))
        return torch.from_numpy(np.ascontiguousarray(w, dtype="<f4"))

    layout = {hf: (torch.float32, shape) for _, hf, shape in plan}
    write_streamed(path, layout, dequantized, metadata={"format": "pt", "source": g.path.name})


def build_tokenizer(g: GGUFFile):
    """A `tokenizers.Tokenizer` (byte-level BPE) from the GGUF vocabulary, merges and token types."""
    from lora_engine.sources.bpe import BYTE_LEVEL_PRE_TOKENIZERS, byte_level_bpe

    m, where = g.metadata, g.path
    kind, pre = m.get("tokenizer.ggml.model"), m.get("tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2":
        raise GGUFError(f"{where}: tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE)")
    if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
        raise GGUFError(
            f"{where}: pre-tokenizer {pre!r} is not supported; supported: {', '.join(BYTE_LEVEL_PRE_TOKENIZERS)}"
        )
    tokens, merges = m.get("tokenizer.ggml.tokens"), m.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise GGUFError(f"{where}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    types = m.get("tokenizer.ggml.token_type")
    for key, v, kind_ in (("tokens", tokens, str), ("merges", merges, str), ("token_type", types or [], int)):
        if not isinstance(v, list) or not all(isinstance(x, kind_) and not isinstance(x, bool) for x in v):
            raise GGUFError(f"{where}: metadata tokenizer.ggml.{key} must be an array of {kind_.__name__}")
    if not isinstance(m.get("tokenizer.chat_template", ""), str):
        raise GGUFError(f"{where}: metadata tokenizer.chat_template must be a string")
    try:
        return byte_level_bpe(
            tokens, merges, types, pre,
            bos_id=m.get("tokenizer.ggml.bos_token_id"), eos_id=m.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(m.get("tokenizer.ggml.add_bos_token")), add_eos=bool(m.get("tokenizer.ggml.add_eos_token")),
        )
    except ValueError as e:
        raise GGUFError(f"{where}: {e}") from e


def tokenizer_files(g: GGUFFile, cfg: dict) -> dict[str, dict]:
    m, tokens = g.metadata, g.metadata["tokenizer.ggml.tokens"]

    def token(key):
        i = m.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    special = {k: token(key) for k, key in (("bos_token", "bos"), ("eos_token", "eos"),
                                             ("unk_token", "unknown"), ("pad_token", "padding"))}
    special = {k: v for k, v in special.items() if v is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(m.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(m.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
    }
    if "tokenizer.chat_template" in m:
        config["chat_template"] = m["tokenizer.chat_template"]
    generation = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
    return {"tokenizer_config.json": config, "special_tokens_map.json": special, "generation_config.json": generation}


def convert_gguf(gguf_path, out_dir, name_or_path: str | None = None, verbose: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Convert a Llama GGUF file into a Hugging Face folder `out_dir` (created; must be empty).

    Weights are float32 with HF names; `lm_head.weight` only when the file has `output.weight`.
    verbose: log the start and the time taken (INFO); progress(done, total): called after each tensor.
    Raises ValueError naming the file for corrupted files and for anything we do not support.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; convert into a new or empty folder")
    log = logger.info if verbose else (lambda msg: None)
    start = time.perf_counter()
    g = GGUFFile(gguf_path)
    try:
        cfg = hf_config(g, name_or_path)
        plan = tensor_plan(g, cfg)
        tok = build_tokenizer(g)  # before the weights: a vocabulary we cannot handle fails fast
        out.mkdir(parents=True, exist_ok=True)
        log(f"lora_engine: converting {g.path.name} ({len(plan)} tensors) into {out}")
        write_safetensors(g, cfg, plan, out / "model.safetensors", progress)
    finally:
        g.close()
    write_bytes(out / "tokenizer.json", tok.to_str().encode())
    for fname, content in tokenizer_files(g, cfg).items():
        write_bytes(out / fname, json.dumps(content, indent=2, ensure_ascii=False).encode())
    write_bytes(out / "config.json", json.dumps(cfg, indent=2).encode())  # last: marks the folder complete
    log(f"lora_engine: converted in {time.perf_counter() - start:.1f} s")
    return out


@dataclass
class ConvertArgs:
    """The command line of `python -m lora_engine.convert`."""

    gguf: str = option(help="a Llama GGUF file", positional=True)
    out_dir: str = option(help="the Hugging Face folder to create", positional=True)
    force: bool = option(False, "replace OUT_DIR if it exists and holds an earlier conversion (only its files)")

    def __post_init__(self):
        out = Path(self.out_dir)
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} exists and is a file")
        if out.is_dir() and any(out.iterdir()) and not self.force:
            raise ValueError(f"{out} exists and is not empty; pass --force to replace it")


# What convert_gguf writes: with --force, a folder holding only these is replaced; anything else is refused.
CONVERTED = Owned("a converted model folder", ("config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json", "special_tokens_map.json",
                                               "generation_config.json"), marker="config.json")


@logs_to("stderr")
def main(argv=None) -> None:
    a, _ = parse(ConvertArgs, argv, "python -m lora_engine.convert", __doc__.splitlines()[0])

    def counter(done: int, total: int) -> None:  # a tensor count redrawn in place, on a terminal only
        print(f"\r  {done}/{total} tensors", end="" if done < total else "\n", file=sys.stderr, flush=True)

    out = Path(a.out_dir)
    # Convert beside OUT_DIR and rename into place: an interrupted run leaves OUT_DIR as it was.
    # convert_gguf's ValueErrors are documented as "this file is corrupted or unsupported".
    with user_input(""), atomic_dir(out, CONVERTED) as tmp:
        convert_gguf(a.gguf, tmp, name_or_path=str(out), progress=counter if sys.stderr.isatty() else None)
    print(out)
