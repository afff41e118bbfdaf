"""GGUF -> Hugging Face conversion on small GGUF files written here with gguf-py's writer (as
llama.cpp's converter writes them: Q/K rows permuted, dims fastest-first), plus every error path."""

import json
import os
import re

import numpy as np
import pytest
import torch

from lora_engine import load_model, load_tokenizer
from lora_engine.sources.bpe import byte_alphabet
from lora_engine.sources.gguf import convert_gguf, main
from tests import embedded_fixture
from tests.conftest import tol
from tests.hf_models import make_hf_model

embedded_gguf = embedded_fixture.embedded_gguf

F32, F16, Q8_0, Q4_0, Q4_1, I8 = "F32", "F16", "Q8_0", "Q4_0", "Q4_1", "I8"
GGUF_NAMES = {  # HF suffix -> GGUF name
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    layer, rest = re.match(r"model\.layers\.(\d+)\.(.*)\.weight", hf).groups()
    return f"blk.{layer}.{GGUF_NAMES[rest]}.weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows (HF rotate-half -> interleaved RoPE)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny_vocab():
    """96 tokens: 3 control tokens, printable ASCII in GPT-2's byte alphabet, and two merges."""
    alphabet = byte_alphabet()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [alphabet[b] for b in range(0x20, 0x7B)] + ["Ġt", "he"]
    return tokens, [3, 3, 3] + [1] * (len(tokens) - 3), ["Ġ t", "h e"]


def write_gguf(path, state, cfg, *, arch="llama", types=None, drop=(), extra=None, meta=None, tok_meta=None):
    """Write `state` (HF names, fp32 tensors) as a GGUF file. types: {HF name substring: ggml type name}."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    kvs = {
        "block_count": cfg.num_hidden_layers, "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size, "feed_forward_length": cfg.intermediate_size,
        "attention.head_count": heads, "attention.head_count_kv": kv,
        "rope.dimension_count": cfg.hidden_size // heads, "vocab_size": cfg.vocab_size,
    }
    for k, v in {**kvs, **(meta or {})}.items():
        (w.add_string if isinstance(v, str) else w.add_uint32)(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.rope.freq_base", 10000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    tokens, token_types, merges = tiny_vocab()
    tm = {"model": "gpt2", "pre": "smollm", **(tok_meta or {})}
    w.add_tokenizer_model(tm["model"])
    w.add_tokenizer_pre(tm["pre"])
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(bool(tm.get("add_bos", False)))
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for hf, t in state.items():
        if hf in drop:
            continue
        a = t.detach().float().numpy()
        if "q_proj" in hf:
            a = llama_cpp_permute(a, heads)
        elif "k_proj" in hf:
            a = llama_cpp_permute(a, kv)
        kind = next((v for k, v in (types or {}).items() if k in hf), F32)
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == I8:
            w.add_tensor(gguf_name(hf), a.astype(np.int8))
        elif kind == F16:
            w.add_tensor(gguf_name(hf), a.astype(np.float16))
        elif kind == F32:
            w.add_tensor(gguf_name(hf), a)
        else:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    hf = make_hf_model("llama", folder, tie=request.param)
    state = {k: v for k, v in hf.state_dict().items() if not (request.param and k == "lm_head.weight")}
    return hf, state, write_gguf(folder / "tiny.gguf", state, hf.config)


def test_f32_round_trip_is_exact_and_logits_match(tiny, tmp_path):
    hf, state, path = tiny
    out = convert_gguf(path, tmp_path / "out", name_or_path="tiny", verbose=False)
    from safetensors.torch import load_file

    got = load_file(out / "model.safetensors")
    assert set(got) == set(state)
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == ("lm_head.weight" not in state)
    assert (cfg["num_key_value_heads"], cfg["head_dim"], cfg["_name_or_path"]) == (2, 16, "tiny")
    ids = torch.randint(3, hf.config.vocab_size, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids), hf(ids).logits, **tol("logits_fp32"))


def test_quantized_and_half_tensors(tiny, tmp_path):
    """F16 is exact after rounding; Q8_0/Q4_0/Q4_1 are within one quantization step of the original, which
    a wrong row permutation or a transposed dimension would exceed by far."""
    hf, state, _ = tiny
    types = {"embed_tokens": Q8_0, "q_proj": Q4_0, "k_proj": Q8_0, "v_proj": Q4_1, "o_proj": Q8_0,
             "gate_proj": Q4_1, "up_proj": Q4_0, "down_proj": F16}
    path = write_gguf(tmp_path / "q.gguf", state, hf.config, types=types)
    from safetensors.torch import load_file

    got = load_file(convert_gguf(path, tmp_path / "out", verbose=False) / "model.safetensors")
    for k, v in state.items():
        kind = next((t for s, t in types.items() if s in k), F32)
        if kind in (F32, F16):
            assert torch.equal(got[k], v.half().float() if kind == F16 else v), k
        else:
            step = v.abs().amax() / (127 if kind == Q8_0 else 7.5)
            assert (got[k] - v).abs().max() <= step, (k, kind)


def test_tokenizer_from_gguf(tmp_path, tiny):
    hf, state, _ = tiny
    path = write_gguf(tmp_path / "t.gguf", state, hf.config, tok_meta={"add_bos": True})
    tok = load_tokenizer(convert_gguf(path, tmp_path / "out", verbose=False))
    ids = tok.encode("<|im_start|>the 12")
    assert ids[0] == 1 and tok.decode(ids) == "<|im_start|>the 12"
    assert [tok.id_to_token(i) for i in ids[1:]] == ["t", "he", "Ġ", "1", "2"]  # digits split, merges applied
    assert tok.encode("the", add_special_tokens=True)[0] == 1  # the file asks for BOS
    assert tok.decode(ids, skip_special_tokens=True) == "the 12"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x<|im_end|>"
    assert (tok.bos_token_id, tok.eos_token_ids, tok.pad_token_id) == (1, [2], 2)


# ---- errors --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tiny):
    return tiny[2]


def _raises(path, match, tmp_path):
    with pytest.raises(ValueError, match="(?s)" + re.escape(str(path)) + ".*" + match):
        convert_gguf(path, tmp_path / "never", verbose=False)
    assert not (tmp_path / "never").exists()  # nothing written before the checks pass


def test_corrupted_files_name_the_file_and_the_reason(good, tmp_path):
    data = good.read_bytes()
    cases = {
        "random.gguf": (os.urandom(4096), r"is not a GGUF file: it starts with"),
        "empty.gguf": (b"", "is not a GGUF file: only 0 bytes"),
        "header.gguf": (data[:700], "truncated or corrupted: the GGUF header breaks off near byte"),
        "data.gguf": (data[:-100], r"is truncated: tensor '.*' needs bytes"),
        "version.gguf": (data[:4] + (99).to_bytes(4, "little") + data[8:], "GGUF version 99 is not supported"),
    }
    for name, (blob, match) in cases.items():
        (tmp_path / name).write_bytes(blob)
        _raises(tmp_path / name, match, tmp_path)


def test_real_file_with_truncated_header(embedded_gguf, tmp_path):
    bad = tmp_path / "smollm-head.gguf"
    with open(embedded_gguf, "rb") as f:
        bad.write_bytes(f.read(100_000))  # breaks off inside the vocabulary
    _raises(bad, "truncated", tmp_path)


@pytest.mark.parametrize("case, match", [
    ({"arch": "qwen2"}, "architecture 'qwen2' is not supported; supported: llama"),
    ({"tok_meta": {"model": "llama"}}, "tokenizer model 'llama' is not supported; supported: gpt2"),
    ({"tok_meta": {"pre": "llama-bpe"}}, "pre-tokenizer 'llama-bpe' is not supported; supported: smollm, gpt-2"),
    ({"meta": {"rope.scaling.type": "linear"}}, "rope scaling \\('linear'"),
    ({"types": {"input_layernorm": I8}}, "'blk.0.attn_norm.weight' is stored as I8, which we do not dequantize"),
    ({"drop": ("model.layers.1.mlp.up_proj.weight",)}, "1 tensors missing: model.layers.1.mlp.up_proj.weight"),
    ({"extra": {"blk.0.attn_q.bias": np.zeros(64, np.float32)}}, "'blk.0.attn_q.bias' has no Llama equivalent"),
    ({"meta": {"feed_forward_length": 100}}, r"'blk.0.ffn_gate.weight' has shape \(112, 64\), the config implies"),
])
def test_unsupported_or_inconsistent_files(tiny, tmp_path, case, match):
    hf, state, _ = tiny
    path = write_gguf(tmp_path / "x.gguf", state, hf.config, **case)
    _raises(path, match, tmp_path)


def test_output_folder_rules(good, tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file .*missing.gguf does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "o", verbose=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="full is not empty"):
        convert_gguf(good, tmp_path / "full", verbose=False)


def test_cli(good, tmp_path, capsys):
    out = tmp_path / "model"
    main([str(good), str(out)])
    assert (out / "config.json").is_file() and load_tokenizer(out).vocab_size == 96
    (out / "marker").write_text("old")
    with pytest.raises(SystemExit):
        main([str(good), str(out)])
    assert "is not empty; pass --force to replace it" in capsys.readouterr().err
    # --force replaces an earlier conversion, never a folder holding anything convert does not write.
    with pytest.raises(ValueError, match="model holds marker: it is not a converted model folder this command "
                                         "writes, so it is not replaced; choose another output path, or remove it"):
        main([str(good), str(out), "--force"])
    assert (out / "marker").read_text() == "old"
    (out / "marker").unlink()
    (out / "config.json").write_text('{"mine": 1}')
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(ValueError, match="bad.gguf"):
        main([str(bad), str(out), "--force"])
    assert (out / "config.json").read_text() == '{"mine": 1}'  # a failed run leaves OUT_DIR as it was
    main([str(good), str(out), "--force"])
    assert json.loads((out / "config.json").read_text()) != {"mine": 1} and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "model"]  # no temp folders left


@pytest.mark.parametrize("meta, match", [
    ({"attention.head_count": 0}, r"llama.attention.head_count must be an integer >= 1, got 0"),
    ({"block_count": "two"}, r"llama.block_count must be an integer >= 1, got 'two'"),
    ({"attention.head_count_kv": 3}, "4 attention heads do not split into groups of 3"),
])
def test_metadata_of_the_wrong_type_or_range(tiny, tmp_path, meta, match):
    from lora_engine.io.safetensors import CheckpointError

    hf, state, _ = tiny
    path = write_gguf(tmp_path / "x.gguf", state, hf.config, meta=meta)
    with pytest.raises(CheckpointError, match=match):  # GGUFError: the commands report it with exit 2
        convert_gguf(path, tmp_path / "never", verbose=False)


def test_duplicate_tensor_names_are_refused(tiny, tmp_path):
    hf, state, _ = tiny
    path = write_gguf(tmp_path / "x.gguf", state, hf.config)
    data = bytearray(path.read_bytes())
    first = gguf_name("model.layers.0.self_attn.q_proj.weight")
    second = gguf_name("model.layers.0.self_attn.k_proj.weight")
    assert len(first) == len(second)  # renaming in place keeps the file well-formed
    data = data.replace(second.encode(), first.encode(), 1)
    path.write_bytes(bytes(data))
    _raises(path, f"tensor '{first}' appears twice", tmp_path)
