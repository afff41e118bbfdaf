"""GGUF exports against llama.cpp itself (llama-cpp-python, which vendors and compiles llama.cpp).

- Bytes and type mix: for each quantized export type, llama.cpp's quantizer (llama_model_quantize,
  what llama-quantize runs) turns our f32 (or f16) export into that file type; our direct export of
  the same type must hold the same tensors with the same ggml types and the same bytes. The models
  are shaped so the mix shows: 8 layers (llama.cpp's "more bits" layers 0, 3, 6, 7) and 30 (SmolLM2's
  count), rows of 256 (K-quants apply) with a tied embedding, and rows of 64 / 112 (the shape fallbacks).
- K-quant bytes on awkward inputs (all-zero and constant blocks, heavy tails, one huge value)
  against ggml_quantize_chunk from the same library.
- Loading: every export type loads in llama.cpp; its tokens equal ours, its logits equal our model's
  with each matrix rounded through the file's types (gguf-py decodes them), within a bound per type,
  and greedy decoding equals ours for the lossless types. llama.cpp runs with an F32 KV cache, flash
  attention off and one thread; its quantized matmuls also round the activations (to Q8_0 / Q8_K
  blocks), which is what the bounds below allow for: measured max |diff| / max |logit|, with ~3x room.

llama-cpp-python is a test extra that scripts/setup.sh builds; it is imported plainly, so a broken
build fails these tests instead of skipping them.
"""

from __future__ import annotations

import ctypes

import gguf
import llama_cpp
import llama_cpp._ggml
import numpy as np
import pytest
import torch

from lora_engine.deploy.gguf import save_gguf
from lora_engine.lora.layers import merge_lora
from lora_engine.models.tokenizer import Tokenizer
from lora_engine.sources.gguf_kquants import quantize_k
from lora_engine.sources.gguf_mix import FILE_TYPES
from tests.hf_models import make_hf_model
from tests.test_export_gguf import TEXTS, VOCAB, add_tokenizer, logits, rounded_merged, with_lora

QUANTIZED = ["q8_0", "q4_0", "q4_1", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]
# max |llama.cpp logits - ours rounded through the same types| / max |ours| on the wide model, measured
# (f32 4.5e-7, f16 7e-4, bf16 5.8e-3, q8_0 2.2e-2, the 4-6 bit types 1.4e-2 to 2.2e-2), with ~3x room. Beyond
# f32 llama.cpp rounds the activations too (to f16 / bf16 / Q8_0 / Q8_K); a wrongly decoded weight would
# show as the distance to the unrounded model, 0.09 (q6_k) to 0.27 (q4_0).
LOGIT_BOUND = {"f32": 1e-4, "f16": 3e-3, "bf16": 2e-2, "q8_0": 6e-2, "q4_0": 6e-2, "q4_1": 6e-2,
               "q4_k_s": 6e-2, "q4_k_m": 6e-2, "q5_k_s": 6e-2, "q5_k_m": 6e-2, "q6_k": 6e-2}
LOSSLESS = ("f32",)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> folder: "wide" (rows of 256, tied embedding, 8 layers), "narrow" (rows of 64 / 112, untied) and
    "deep" (SmolLM2's 30 layers, rows of 64 but ffn_down's of 256), "seventy" (80 layers with grouped KV heads,
    which llama.cpp takes for Llama-70B and gives attn_v more bits)."""
    root = tmp_path_factory.mktemp("llama_cpp_models")
    make_hf_model("llama", root / "wide", vocab_size=VOCAB, hidden_size=256, intermediate_size=256,
                  num_hidden_layers=8, tie=True)
    make_hf_model("llama", root / "narrow", vocab_size=VOCAB)
    make_hf_model("llama", root / "deep", vocab_size=VOCAB, intermediate_size=256, num_hidden_layers=30)
    make_hf_model("llama", root / "seventy", vocab_size=VOCAB, num_hidden_layers=80)  # llama.cpp's "70B" type
    return {name: add_tokenizer(root / name) for name in ("wide", "narrow", "deep", "seventy")}


def llama_quantize(src, dst, gguf_type: str):
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 1
    params.ftype = int(gguf.LlamaFileType[FILE_TYPES[gguf_type][0]])
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize failed ({rc}) on {src}"
    return dst


def tensors(path) -> dict[str, tuple[str, bytes]]:
    return {t.name: (t.tensor_type.name, t.data.tobytes()) for t in gguf.GGUFReader(path).tensors}


def assert_same_tensors(ours, theirs):
    a, b = tensors(ours), tensors(theirs)
    assert sorted(a) == sorted(b)
    assert {n: t for n, (t, _) in a.items()} == {n: t for n, (t, _) in b.items()}  # the type mix
    differ = [n for n in a if a[n][1] != b[n][1]]
    assert not differ, f"{len(differ)}/{len(a)} tensors differ from llama.cpp's bytes: {differ[:5]}"


@pytest.mark.parametrize("name, gguf_type", [*[(n, t) for n in ("wide", "narrow") for t in QUANTIZED],
                                             *[("deep", t) for t in QUANTIZED if "_k" in t],
                                             ("seventy", "q4_k_m"), ("seventy", "q4_k_s")])
def test_bytes_and_types_equal_llama_quantize(models, tmp_path, name, gguf_type):
    model = with_lora(models[name])
    f32 = save_gguf(model, tmp_path / "f32.gguf", "f32", modelfile=False, verbose=False)
    ours = save_gguf(model, tmp_path / "ours.gguf", gguf_type, modelfile=False, verbose=False)
    assert_same_tensors(ours, llama_quantize(f32, tmp_path / "theirs.gguf", gguf_type))


def test_from_f16_input(models, tmp_path):
    """An f16 checkpoint: llama-quantize from our f16 file equals our direct export (the values are the same)."""
    model = merge_lora(with_lora(models["wide"]))  # merged first: the f16 values are what both files start from
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    f16 = save_gguf(model, tmp_path / "f16.gguf", "f16", modelfile=False, verbose=False)
    ours = save_gguf(model, tmp_path / "ours.gguf", "q4_k_m", modelfile=False, verbose=False)
    assert_same_tensors(ours, llama_quantize(f16, tmp_path / "theirs.gguf", "q4_k_m"))


def ggml_quantize(w: np.ndarray, type_name: str) -> np.ndarray:
    lib = llama_cpp._ggml.libggml
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    t = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[t]
    w = np.ascontiguousarray(w, np.float32)
    out = np.zeros(w.size // block * size, np.uint8)
    lib.ggml_quantize_chunk(int(t), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None)
    return out


def awkward_blocks(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((24, 512)) * 0.02).astype(np.float32)
    w[0] = 0                                    # all zero
    w[1] = 0.25                                 # constant positive (min clamps to 0)
    w[2] = -0.25                                # constant negative (max == min)
    w[3, ::7] = 1.0                             # sparse
    w[4] = np.linspace(-3, 5, 512)              # a ramp
    w[5, :128] = 1e4                            # one huge sub-range
    w[6, 16:32] = 0                             # one zero Q6_K sub-block
    w[7] = np.abs(w[7])                         # all positive
    w[8:12] = rng.standard_t(2, (4, 512)) * 0.05  # heavy tails
    w[12:16] = (rng.standard_normal((4, 512)) * 1e-7)  # tiny: fp16 scales underflow
    w[16:] = w[16:].astype(np.float16).astype(np.float32)  # values an f16 checkpoint holds
    return w


@pytest.mark.parametrize("type_name", ["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("seed", [0, 1])
def test_kquant_bytes_equal_ggml(type_name, seed):
    w = awkward_blocks(seed)
    want = ggml_quantize(w, type_name).reshape(w.shape[0], -1)
    got = quantize_k(w, type_name)
    assert got.shape == want.shape
    assert [i for i in range(len(w)) if not np.array_equal(got[i], want[i])] == []


def llama(path, **kw):
    return llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, n_threads_batch=1, logits_all=True, flash_attn=False,
                           type_k=0, type_v=0, verbose=False, **kw)  # type 0: GGML_TYPE_F32 for the KV cache


@pytest.mark.parametrize("gguf_type", ["f32", "f16", "bf16", *QUANTIZED])
def test_every_type_loads_in_llama_cpp(models, tmp_path, gguf_type):
    folder = models["wide"]
    path = save_gguf(with_lora(folder), tmp_path / "m.gguf", gguf_type, verbose=False)
    llm = llama(path)
    tok = Tokenizer(folder)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), text
    ids = tok.encode("the quick brown fox jumps over the lazy dog")
    llm.reset()
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32))
    ref = rounded_merged(folder, gguf_type)
    ours = logits(ref, torch.tensor([ids]))[0]
    assert (theirs - ours).abs().max() / ours.abs().max() <= LOGIT_BOUND[gguf_type]
    if gguf_type in LOSSLESS:  # greedy decoding: the same tokens
        llm.reset()
        llm.eval(ids[:4])
        seq = list(ids[:4])
        for _ in range(8):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            assert nxt == int(logits(ref, torch.tensor([seq]))[0, -1].argmax()), seq
            seq.append(nxt)
            llm.eval([nxt])
