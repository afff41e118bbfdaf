"""GGUF export (sources/gguf_write.py, deploy/gguf.py) and QLoRA merges (deploy/qlora.py).

Oracles: transformers' own GGUF reader (from_pretrained(folder, gguf_file=...)), our GGUF reader
(sources/gguf.py), the gguf package's key and tensor-name lists, and for QLoRA our NF4 dequantizer.

Quantized types: the exact oracle is our merged model with its weight matrices passed through the
same type (gguf.quants quantize + dequantize); transformers' logits from the file must equal its
logits to fp32 tolerance. Separately, the error of each type against the unrounded fp32 model is
bounded by what it was measured to be on these tiny models (max |diff| / max |logit|), with ~3x room:
f32 1e-4 (the issue's bound; measured 4e-7), f16 3e-3 (7e-4), bf16 2e-2 (4e-3), q8_0 5e-2 (1.5e-2),
q4_0 / q4_1 0.6 (0.27 / 0.19: 4 bits with one scale per 32 weights of a random matrix).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from lora_engine.deploy.gguf import modelfile_text, save_gguf
from lora_engine.export import main
from lora_engine.io.atomic import OutputError
from lora_engine.io.safetensors import read_safetensors_header, read_tensor
from lora_engine.loading import load_model
from lora_engine.lora.adapter import save_adapter
from lora_engine.lora.layers import LoraConfig, apply_lora, lora_layers, merge_lora
from lora_engine.models.tokenizer import Tokenizer
from lora_engine.sources import gguf_write
from lora_engine.sources.gguf import GGUFFile, build_tokenizer, convert_gguf
from lora_engine.sources.gguf_layout import unpermute_rows
from lora_engine.sources.gguf_mix import tensor_types
from tests.conftest import require_oracle, tol
from tests.hf_models import make_hf_model

transformers = require_oracle("transformers")  # its GGUF reader is the oracle
import gguf  # noqa: E402  (a core dependency: the reader and the writer use it)

VOCAB = 320  # byte-level BPE needs its 256 byte tokens, plus specials and a few merges
ERROR_BOUND = {"f32": 1e-4, "f16": 3e-3, "bf16": 2e-2, "q8_0": 5e-2, "q4_0": 0.6, "q4_1": 0.6, "q6_k": 0.6}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["the quick brown fox", "  lazy dogs jump\n\nover <|im_start|>user\nhi<|im_end|>", "ünïcödé 😀 x"]


def add_tokenizer(folder, pre_tokenizer=None):
    """A byte-level BPE tokenizer of VOCAB tokens with ChatML specials, saved as transformers saves one."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizer or pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """family -> a tiny random checkpoint folder with a tokenizer (built once per module)."""
    made = {}

    def get(family):
        if family not in made:
            folder = tmp_path_factory.mktemp(f"tiny_{family}")
            # transformers' GGUF reader ignores qwen3's attention.key_length and assumes its default
            # head_dim 128, so the qwen3 model uses 128 (llama.cpp reads the key; we write it).
            extra = {"head_dim": 128} if family == "qwen3" else {}
            make_hf_model(family, folder, vocab_size=VOCAB, **extra)
            made[family] = add_tokenizer(folder)
        return made[family]
    return get


def with_lora(folder, seed=0):
    model = load_model(folder)
    torch.manual_seed(seed)  # before apply_lora: lora_A is drawn there
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "down_proj")),
               verbose=False)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(std=0.2)
    return model


def rounded_merged(folder, gguf_type, seed=0):
    """Our model with the LoRA merged and each weight matrix rounded through the type its GGUF tensor gets
    (the file type's per-tensor mix), decoded by gguf-py's dequantizer."""
    model = with_lora(folder, seed)
    merge_lora(model)
    cfg = json.loads((folder / "config.json").read_text())
    params = dict(model.named_parameters())
    plan = gguf_write.tensor_plan(cfg, {n: tuple(p.shape) for n, p in params.items() if "lora_" not in n})
    types = tensor_types({p.name: tuple(p.shape) for p in plan}, gguf_type, cfg["num_hidden_layers"])
    with torch.no_grad():
        for g, hf in ((p.name, p.sources[0]) for p in plan):  # a tied head is one parameter
            p = params[hf]
            t = types[g]
            if p.ndim == 2 and t != "F32":
                w = p.detach().float().numpy()
                q = gguf_write.encode_tensor(w, t)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q.reshape(w.shape[0], -1),
                                                                gguf.GGMLQuantizationType[t]).reshape(w.shape)))
    return model


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()


def hf_from_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.mark.parametrize("family, gguf_type", [
    ("llama", "f32"), ("mistral", "f32"), ("qwen2", "f32"), ("qwen3", "f32"),
    ("llama", "f16"), ("llama", "bf16"), ("llama", "q8_0"), ("llama", "q4_0"), ("llama", "q4_1"), ("llama", "q6_k"),
    ("qwen2", "f16"), ("qwen2", "q8_0"), ("qwen3", "q4_0"),
])
def test_transformers_reads_our_gguf_as_our_merged_model(tiny, tmp_path, family, gguf_type):
    folder = tiny(family)
    model = with_lora(folder)
    path = save_gguf(model, tmp_path / "model.gguf", gguf_type, verbose=False)
    ids = torch.randint(0, VOCAB, (2, 13))
    theirs = logits(hf_from_gguf(path), ids)
    torch.testing.assert_close(theirs, logits(rounded_merged(folder, gguf_type), ids), **tol("logits_fp32"))
    ours = logits(model, ids)
    assert (theirs - ours).abs().max() / ours.abs().max() <= ERROR_BOUND[gguf_type]


@pytest.mark.parametrize("family, gguf_type", [("llama", "f32"), ("llama", "q8_0"), ("qwen2", "bf16"),
                                               ("qwen3", "f16")])
def test_our_reader_gets_back_the_same_tensors(tiny, tmp_path, family, gguf_type):
    folder = tiny(family)
    path = save_gguf(with_lora(folder), tmp_path / "model.gguf", gguf_type, verbose=False)
    want = {k: v.float() for k, v in rounded_merged(folder, gguf_type).state_dict().items()
            if not k.endswith(("lora_A", "lora_B"))}
    g = GGUFFile(path)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        got = {}
        for name in g.tensors:
            w = g.dequantize(name)
            kind = name.split(".")[-2]
            if family == "llama" and kind in ("attn_q", "attn_k"):
                w = unpermute_rows(w, cfg["num_attention_heads"] if kind == "attn_q" else cfg["num_key_value_heads"])
            got[name] = w
    finally:
        g.close()
    plan = [(p.name, p.sources[0]) for p in gguf_write.tensor_plan({"model_type": family},
                                                                    {k: tuple(v.shape) for k, v in want.items()})]
    assert sorted(got) == sorted(g for g, _ in plan)
    for g_name, hf in plan:
        assert torch.equal(torch.from_numpy(got[g_name]), want[hf]), hf
    if family == "llama":  # and the whole converter, config and tokenizer included
        out = convert_gguf(path, tmp_path / "back", verbose=False)
        back = load_model(out)
        ids = torch.randint(0, VOCAB, (1, 9))
        torch.testing.assert_close(logits(back, ids), logits(rounded_merged(folder, gguf_type), ids),
                                   **tol("logits_fp32"))


def test_metadata_names_and_tokenizer(tiny, tmp_path):
    folder = tiny("qwen2")
    with pytest.warns(UserWarning, match="2 tensors .*ffn_down.* not whole blocks of q8_0; written as F16"):
        path = save_gguf(with_lora(folder), tmp_path / "m.gguf", "q8_0", verbose=False)
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "qwen2" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f["qwen2.block_count"] == 2 and f["qwen2.attention.head_count_kv"] == 2
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.chat_template"] == CHATML
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == VOCAB and tokens[f["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert types[tokens.index("<|im_start|>")] == 3 and tokens[-1] == f"[PAD{VOCAB - 1}]" and types[-1] == 4
    assert f["tokenizer.ggml.merges"][0].count(" ") == 1
    arch = gguf.MODEL_ARCH.QWEN2
    known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[arch] for i in range(2)}
    assert {t.name.rsplit(".", 1)[0] for t in r.tensors} <= known
    # Rows of 112 (ffn_down's input) are not whole Q8_0 blocks of 32: F16, as llama.cpp falls back.
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert {n for n, t in types.items() if t == "F16"} == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert {t for n, t in types.items() if n.endswith(("norm.weight", ".bias"))} == {"F32"}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tensor_names_are_llama_cpps(family, tiny, tmp_path):
    path = save_gguf(with_lora(tiny(family)), tmp_path / "m.gguf", "f16", verbose=False)
    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen3": gguf.MODEL_ARCH.QWEN3}[family]
    known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[arch] for i in range(2)}
    names = {t.name.rsplit(".", 1)[0] for t in gguf.GGUFReader(path).tensors}
    assert names <= known and "output" in names  # untied head written


def test_tokenizer_from_our_gguf_encodes_like_ours(tiny, tmp_path):
    folder = tiny("llama")
    path = save_gguf(with_lora(folder), tmp_path / "m.gguf", "f16", verbose=False)
    ours = Tokenizer(folder)
    g = GGUFFile(path)
    try:
        back = build_tokenizer(g)
    finally:
        g.close()
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        assert back.encode(text, add_special_tokens=False).ids == ours.encode(text), text
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text), text


def test_embedded_model(embedded_dir, tmp_path):
    """SmolLM2 (smollm pre-tokenizer, tied embeddings, 49k vocabulary) through q8_0 and back."""
    model = load_model(embedded_dir)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")), verbose=False)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(std=0.02)
    path = save_gguf(model, tmp_path / "smol.gguf", "q8_0", verbose=False)
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2], [504, 3458, 28, 29, 30, 31, 32, 33]])
    merge_lora(model)
    ref = model
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2 and "lora_" not in name:
                q = gguf.quants.quantize(p.detach().float().numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)))
    torch.testing.assert_close(logits(hf_from_gguf(path), ids), logits(ref, ids), **tol("logits_fp32"))
    g = GGUFFile(path)
    try:
        assert g.metadata["tokenizer.ggml.pre"] == "smollm" and "output.weight" not in g.tensors
        back = build_tokenizer(g)
    finally:
        g.close()
    ours = Tokenizer(embedded_dir)
    for text in TEXTS + [" 12 34  56", "٣٤٥ digits"]:  # the digit split transformers' converter drops
        assert back.encode(text, add_special_tokens=False).ids == ours.encode(text), text
    modelfile = (tmp_path / "smol.Modelfile").read_text()
    assert "FROM ./smol.gguf" in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile


# ---- Modelfile --------------------------------------------------------------------------------------
def test_modelfile_templates():
    chatml = modelfile_text("m.gguf", CHATML, "<|im_end|>")
    assert chatml.splitlines()[1] == "FROM ./m.gguf"
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>' in chatml
    assert chatml.count("PARAMETER stop") == 2
    llama3 = modelfile_text("m.gguf", "{{ '<|start_header_id|>' + m.role }}", "<|eot_id|>")
    assert "<|end_header_id|>\n\n{{ .Content }}<|eot_id|>" in llama3 and 'stop "<|eot_id|>"' in llama3
    other = modelfile_text("m.gguf", "{{ messages[0].content }}", "</s>")
    assert "TEMPLATE" not in other.replace("No TEMPLATE", "") and 'PARAMETER stop "</s>"' in other


def test_unknown_template_warns(tmp_path):
    folder = tmp_path / "plain"
    make_hf_model("llama", folder, vocab_size=VOCAB)
    add_tokenizer(folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.warns(UserWarning, match="no TEMPLATE"):
        save_gguf(load_model(folder), tmp_path / "m.gguf", "f16", verbose=False)
    assert "# No TEMPLATE" in (tmp_path / "m.Modelfile").read_text()


# ---- refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("config, match", [
    ({"model_type": "gemma"}, "model_type 'gemma' is not supported; supported: llama, mistral, qwen2, qwen3"),
    ({"model_type": "llama", "rope_scaling": {"rope_type": "llama3"}}, "rope scaling 'llama3' is not supported"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias/mlp_bias is not supported"),
])
def test_refused_architectures(config, match):
    with pytest.raises(ValueError, match=match):
        gguf_write.check_config(config)


def test_refused_llama3_rope_model(tmp_path):
    make_hf_model("llama3", tmp_path / "l3", vocab_size=VOCAB)
    add_tokenizer(tmp_path / "l3")
    with pytest.raises(ValueError, match="rope scaling 'llama3'"):
        save_gguf(load_model(tmp_path / "l3"), tmp_path / "m.gguf", verbose=False)
    assert not (tmp_path / "m.gguf").exists()


def _edit_tokenizer(folder, edit):
    p = folder / "tokenizer.json"
    tj = json.loads(p.read_text())
    edit(tj)
    p.write_text(json.dumps(tj))


@pytest.mark.parametrize("edit, match", [
    (lambda tj: tj["model"].update(byte_fallback=True), "SentencePiece-style BPE"),
    (lambda tj: tj.update(model={"type": "Unigram", "vocab": []}), "'Unigram' tokenizer is not supported"),
    (lambda tj: tj.update(pre_tokenizer={"type": "Metaspace"}), "none of llama.cpp's we can name"),
    (lambda tj: tj["model"]["vocab"].update({"zzzz": VOCAB + 5}), "beyond the model's 320 embedding rows"),
    (lambda tj: tj.update(post_processor={"type": "BertProcessing"}), "post_processor 'BertProcessing'"),
])
def test_refused_tokenizers(tiny, tmp_path, edit, match):
    folder = tmp_path / "tok"
    folder.mkdir()
    for f in tiny("llama").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _edit_tokenizer(folder, edit)
    with pytest.raises(ValueError, match=match):
        save_gguf(load_model(folder), tmp_path / "m.gguf", verbose=False)
    assert not (tmp_path / "m.gguf").exists()


def test_refused_without_tokenizer_and_bad_type(tmp_path):
    make_hf_model("llama", tmp_path / "bare", vocab_size=VOCAB)
    model = load_model(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        save_gguf(model, tmp_path / "m.gguf", verbose=False)
    with pytest.raises(ValueError, match="gguf_type 'q2_k' is not supported"):
        save_gguf(model, tmp_path / "m.gguf", "q2_k", verbose=False)
    with pytest.raises(SystemExit):  # the config's check, reported by argparse
        main(["--model", str(tmp_path / "bare"), "--gguf", str(tmp_path / "m.gguf"), "--gguf-type", "q2_k"])


def test_known_split_pre_tokenizers():
    steps = lambda regex: {"type": "Sequence", "pretokenizers": [  # noqa: E731
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    for regex, name in gguf_write.SPLIT_PRE_TOKENIZERS.items():
        assert gguf_write.pre_tokenizer_name(steps(regex), "t") == name
    with pytest.raises(ValueError, match="none of llama.cpp's"):
        gguf_write.pre_tokenizer_name(steps(r"\w+"), "t")


def test_f16_overflow_is_refused(tiny, tmp_path):
    model = load_model(tiny("llama"))
    with torch.no_grad():
        model.get_submodule("model.layers.0.mlp.up_proj").weight[0, 0] = 1e6
    with pytest.raises(ValueError, match="overflow float16.*bf16 or f32"):
        save_gguf(model, tmp_path / "m.gguf", "f16", verbose=False)
    assert list(tmp_path.iterdir()) == []


# ---- atomicity --------------------------------------------------------------------------------------
def test_interrupted_export_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    model = with_lora(tiny("llama"))
    target = tmp_path / "m.gguf"
    target.write_bytes(b"GGUF an earlier export")
    calls = []
    real = gguf_write.encode_tensor

    def dying(w, t):
        calls.append(t)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(w, t)

    monkeypatch.setattr(gguf_write, "encode_tensor", dying)
    with pytest.raises(KeyboardInterrupt):
        save_gguf(model, target, "q8_0", verbose=False)
    assert target.read_bytes() == b"GGUF an earlier export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_a_file_that_is_not_ours_is_never_overwritten(tiny, tmp_path):
    model = with_lora(tiny("llama"))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(OutputError, match="metrics.jsonl exists and its content is not that: it is not a GGUF file "
                                          "this command writes, so it is not replaced"):
        save_gguf(model, tmp_path / "metrics.jsonl", "f32", verbose=False)
    (tmp_path / "m.Modelfile").write_text("FROM llama3\n# my own\n")
    with pytest.raises(OutputError, match="m.Modelfile exists and its content is not that: it is not a Modelfile"):
        save_gguf(model, tmp_path / "m.gguf", "f32", verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "metrics.jsonl"]  # nothing written
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    (tmp_path / "m.Modelfile").unlink()
    save_gguf(model, tmp_path / "m.gguf", "f32", verbose=False)
    save_gguf(model, tmp_path / "m.gguf", "f32", verbose=False)  # our own GGUF file and Modelfile are replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.Modelfile", "m.gguf", "metrics.jsonl"]


# ---- the command line and QLoRA merges ----------------------------------------------------------------
def test_cli_writes_gguf_and_folder(tiny, tmp_path):
    folder = tiny("llama")
    save_adapter(with_lora(folder), tmp_path / "adapter")
    main(["--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--gguf", str(tmp_path / "g" / "m.gguf"),
          "--gguf-type", "f32", "--out", str(tmp_path / "hf")])
    ids = torch.randint(0, VOCAB, (1, 7))
    want = logits(merge_lora(with_lora(folder)), ids)
    torch.testing.assert_close(logits(hf_from_gguf(tmp_path / "g" / "m.gguf"), ids), want, **tol("logits_fp32"))
    torch.testing.assert_close(logits(load_model(tmp_path / "hf"), ids), want, **tol("logits_fp32"))
    assert (tmp_path / "g" / "m.Modelfile").is_file()


@pytest.mark.parametrize("argv, match", [
    (["--out", "o", "--merge-into", "dequantized", "--base", "x"], "two different merges; pick one"),
    (["--out", "o", "--base", "x"], "--base merges a QLoRA adapter: pass --adapter"),
    ([], "--out or --gguf is required"),
])
def test_cli_refusals(tiny, argv, match, capsys):
    with pytest.raises(SystemExit):  # argparse's usage error, the config's message in it
        main(["--model", str(tiny("llama")), *argv])
    assert match in capsys.readouterr().err


@pytest.fixture(scope="module")
def qlora(tmp_path_factory):
    """A 16-bit base, its NF4 checkpoint, and an adapter trained (random B) over the NF4 weights."""
    from lora_engine.quant.checkpoint import save_quantized

    root = tmp_path_factory.mktemp("qlora")
    make_hf_model("llama", root / "base16", vocab_size=VOCAB)
    base16 = add_tokenizer(root / "base16")
    nf4 = load_model(base16, quantize="nf4", verbose=False)
    save_quantized(nf4, root / "nf4")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (base16 / f).exists():
            (root / "nf4" / f).write_bytes((base16 / f).read_bytes())
    apply_lora(nf4, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "o_proj", "up_proj")), verbose=False)
    with torch.no_grad():
        for _, m in lora_layers(nf4):
            m.lora_B.normal_(std=0.2)
    save_adapter(nf4, root / "run" / "adapter")
    return root, nf4


def _read(folder):
    header, start = read_safetensors_header(folder / "model.safetensors")
    return {k: read_tensor(folder / "model.safetensors", v, start) for k, v in header.items()}


def test_merge_into_dequantized_is_what_training_saw(qlora, tmp_path):
    from lora_engine.quant.nf4 import dequantize

    root, nf4 = qlora
    for model in (root / "base16", root / "nf4"):  # quantized on load, or an NF4 checkpoint as stored
        out = tmp_path / model.name
        main(["--model", str(model), "--adapter", str(root / "run" / "adapter"), "--merge-into", "dequantized",
              "--out", str(out), "--dtype", "float32"])
        got = _read(out)
        for path, m in lora_layers(nf4):
            want = dequantize(m.weight, torch.float32) + m.delta_weight()
            assert torch.equal(got[f"{path}.weight"], want), path
        assert torch.equal(got["model.layers.0.mlp.down_proj.weight"],
                           dequantize(nf4.get_submodule("model.layers.0.mlp.down_proj").weight, torch.float32))


def test_merge_into_base16(qlora, tmp_path):
    root, nf4 = qlora
    main(["--model", str(root / "nf4"), "--adapter", str(root / "run" / "adapter"), "--base", str(root / "base16"),
          "--out", str(tmp_path / "out"), "--gguf", str(tmp_path / "m.gguf"), "--gguf-type", "f32"])
    got, w16 = _read(tmp_path / "out"), _read(root / "base16")
    for path, m in lora_layers(nf4):
        assert torch.equal(got[f"{path}.weight"], w16[f"{path}.weight"].float() + m.delta_weight()), path
    g = GGUFFile(tmp_path / "m.gguf")
    try:
        assert np.array_equal(g.dequantize("blk.1.ffn_up.weight"), got["model.layers.1.mlp.up_proj.weight"].numpy())
    finally:
        g.close()


def test_base16_refusals(qlora, tmp_path):
    from lora_engine.cli import CliError

    root, _ = qlora
    adapter = root / "run" / "adapter"
    make_hf_model("llama", tmp_path / "other", vocab_size=VOCAB, seed=1)
    with pytest.raises(CliError, match="does not give --model .* NF4 bytes"):
        main(["--model", str(root / "nf4"), "--adapter", str(adapter), "--base", str(tmp_path / "other"),
              "--out", str(tmp_path / "o1")])
    make_hf_model("llama", tmp_path / "wider", vocab_size=VOCAB, intermediate_size=128)
    with pytest.raises(CliError, match="architecture differs .*intermediate_size 128 vs 112"):
        main(["--model", str(root / "nf4"), "--adapter", str(adapter), "--base", str(tmp_path / "wider"),
              "--out", str(tmp_path / "o2")])
    run = root / "run" / "run.json"
    try:  # the adapter's run recorded other base files
        run.write_text(json.dumps({"base_model": {"sha256": {"/x/model.safetensors": "0" * 64}}}))
        with pytest.raises(CliError, match="neither --base .* nor --model"):
            main(["--model", str(root / "nf4"), "--adapter", str(adapter), "--base", str(root / "base16"),
                  "--out", str(tmp_path / "o3")])
        run.write_text(json.dumps({"config": {"quantize": "none"}}))
        with pytest.raises(CliError, match="trained on full precision"):
            main(["--model", str(root / "base16"), "--adapter", str(adapter), "--merge-into", "dequantized",
                  "--out", str(tmp_path / "o4")])
    finally:
        run.unlink()
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_base16_accepted_by_recorded_hash(qlora, tmp_path):
    from lora_engine.deploy.qlora import _hashes

    root, _ = qlora
    run = root / "run" / "run.json"
    try:
        run.write_text(json.dumps({"base_model": {"sha256": {f"/train/{k}": v
                                                             for k, v in _hashes(root / "base16").items()}}}))
        main(["--model", str(root / "nf4"), "--adapter", str(root / "run" / "adapter"), "--base",
              str(root / "base16"), "--out", str(tmp_path / "out")])
    finally:
        run.unlink()
    assert (tmp_path / "out" / "config.json").is_file()


def test_nf4_model_is_refused_for_gguf(qlora, tmp_path):
    from lora_engine.cli import CliError

    root, _ = qlora
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CliError, match="NF4 weights; GGUF export needs full precision"):
            main(["--model", str(root / "nf4"), "--adapter", str(root / "run" / "adapter"),
                  "--gguf", str(tmp_path / "m.gguf")])
    assert not (tmp_path / "m.gguf").exists()
