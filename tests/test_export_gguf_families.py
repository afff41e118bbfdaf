"""GGUF export of the families beyond Llama (sources/gguf_layout.py), run by llama.cpp itself.

Oracle: llama-cpp-python's bundled llama.cpp loads each file and evaluates a token sequence longer than the
sliding window; its logits must equal our decoder's (LoRA merged) to a relative bound
max |diff| / max |logit|. The KV cache is kept in F32 (type_k = type_v = 0): llama.cpp's default F16 cache
rounds K and V (3e-4 measured on Llama), which is llama.cpp's choice at run time, not the file's.

Bounds, each ~3-10x above what was measured on these tiny models (family -> measured):
  f32   2e-5: the same fp32 arithmetic summed in another order (phi3, smollm3, olmo2, qwen3_5: ~4e-7; the
        MoE families and gpt-oss: <= 3e-6)
  gemma 1e-3: ggml's CPU GELU rounds its input to fp16 and reads an fp16 table (relative 2^-11 per
        activation); measured 2.9e-4 / 3.8e-4 (gemma2 / gemma3), 1e-4 against our model with its GELU so
        rounded
  f16   1e-2 added: the weights rounded to f16, and llama.cpp rounds the activations to f16 too for an F16
        matmul (ggml's vec_dot_f16); measured 6e-4 (smollm3) to 4.2e-3 (qwen3_moe). Qwen3.5-MoE 2e-2: one
        token of 23 at 1.05e-2, the others <= 3.4e-3, as when a router's near-tie flips under the rounding

Quantized types are not compared here: these tiny MoE models are so sensitive to rounding that our own model
with its weights in bf16 moves 0.9 (qwen3_moe) from fp32; tests/test_export_gguf.py bounds each type.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_model
from lora_engine.deploy.gguf import save_gguf
from lora_engine.lora.layers import lora_layers
from lora_engine.sources import gguf_write
from tests import test_families, test_gptoss, test_moe_families, test_qwen35, test_qwen35_moe
from tests.conftest import require_oracle
from tests.test_export_gguf import VOCAB, add_tokenizer

llama_cpp = require_oracle("llama_cpp")
import gguf  # noqa: E402  (a core dependency)

# Each family's test config (tests/test_families.py, test_moe_families.py, test_gptoss.py) with what llama.cpp's
# architecture can express: the query scale it assumes, its RoPE-less layer schedule, no dense MoE layers, ...
OVERRIDES = {
    "gemma2": dict(query_pre_attn_scalar=16),  # = head_dim, the scale llama.cpp uses below 27B
    "gemma3_text": dict(query_pre_attn_scalar=16),
    "phi3": dict(sliding_window=None),  # llama.cpp disables Phi's window (test_phi3_window_warns)
    "smollm3": dict(use_sliding_window=False, no_rope_layers=None),  # NoPE on every 4th layer, as llama.cpp
    "olmo2": {},
    "qwen3_moe": dict(mlp_only_layers=[]),
    "mixtral": {},
    "olmoe": dict(num_key_value_heads=4),  # llama.cpp's olmoe k norm has as many heads as q
    # transformers' YaRN with truncate true, as llama.cpp computes it (truncate false: test_warnings)
    "gpt_oss": dict(rope_parameters={**test_gptoss._BASE["rope_parameters"], "truncate": True}),
    "qwen3_5_text": dict(linear_value_head_dim=8),  # llama.cpp's qwen35: value heads as wide as key heads
    "qwen3_5_moe_text": dict(linear_value_head_dim=8),
}
ARCH = {"gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "smollm3": "smollm3", "olmo2": "olmo2",
        "qwen3_moe": "qwen3moe", "mixtral": "llama", "olmoe": "olmoe", "gpt_oss": "gpt-oss",
        "qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe"}
BOUND = {"gemma2": 1e-3, "gemma3_text": 1e-3}
FAMILIES = tuple(OVERRIDES)
IDS = [int(x) for x in np.random.RandomState(0).randint(3, VOCAB, 23)]  # longer than every test window


def make_family(family: str, folder):
    over = {"vocab_size": VOCAB, **OVERRIDES[family]}
    if family == "gpt_oss":
        test_gptoss.make_hf(folder, **over)
    elif family == "qwen3_5_text":  # 2 key heads, 4 value heads: the value-head reorder is exercised
        test_qwen35.make_hf(folder, **over)
    elif family == "qwen3_5_moe_text":  # the same DeltaNet, experts and a sigmoid-gated shared expert
        test_qwen35_moe.make_hf(folder, **over)
    elif family in test_moe_families.CONFIGS:
        test_moe_families.make_hf(family, folder, **over)
    else:
        test_families.make_hf(family, folder, **over)
    return add_tokenizer(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            # not "phi3" in the folder name: llama.cpp gives a model named phi3/phi-3 SentencePiece token attributes
            made[family] = make_family(family, tmp_path_factory.mktemp(f"tiny_{family.replace('phi', 'p')}"))
        return made[family]
    return get


def with_lora(folder):
    model = load_model(folder)
    torch.manual_seed(0)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj")), verbose=False)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(std=0.2)
    return model


def llama_cpp_logits(path, ids):
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1,
                          type_k=0, type_v=0, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()


def export(model, path, gguf_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gpt-oss's YaRN note (test_warnings), F16 fallbacks of odd rows
        return save_gguf(model, path, gguf_type, verbose=False, modelfile=False)


@pytest.mark.parametrize("gguf_type", ["f32", "f16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_our_gguf_as_our_model(tiny, tmp_path, family, gguf_type):
    model = with_lora(tiny(family))
    path = export(model, tmp_path / "model.gguf", gguf_type)
    theirs = llama_cpp_logits(path, IDS)
    with torch.no_grad():
        ours = model(torch.tensor([IDS]))[0].float().numpy()
    bound = BOUND.get(family, 2e-5) + (0.0 if gguf_type == "f32" else 2e-2 if family == "qwen3_5_moe_text" else 1e-2)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() <= bound


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_names_and_metadata_are_llama_cpps(tiny, tmp_path, family):
    folder = tiny(family)
    path = export(load_model(folder), tmp_path / "m.gguf", "f32")
    r = gguf.GGUFReader(path)
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == ARCH[family])
    layers = load_model(folder).config.num_hidden_layers
    known = {gguf.TENSOR_NAMES[t].format(bid=i) for t in gguf.MODEL_TENSORS[arch] for i in range(layers)}
    assert {t.name.removesuffix(".weight").removesuffix(".bias") for t in r.tensors} <= known  # ssm_a: no suffix
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.")}
    a = ARCH[family]
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in r.tensors}
    assert f["general.architecture"] == a and f[f"{a}.block_count"] == layers
    if family == "gemma2":
        assert f["gemma2.attn_logit_softcapping"] == 5.0 and f["gemma2.final_logit_softcapping"] == 3.0
        assert f["gemma2.attention.sliding_window"] == test_families.WINDOW and "output.weight" not in f
    if family == "gemma3_text":  # layer_types sliding, full, ...: every 2nd layer full
        assert f["gemma3.attention.sliding_window_pattern"] == 2 and f["gemma3.rope.freq_base_swa"] == 10_000.0
        assert f["gemma3.rope.freq_base"] == 1_000_000.0 and f["gemma3.rope.scaling.type"] == "linear"
    if family in ("qwen3_moe", "mixtral", "olmoe", "gpt_oss", "qwen3_5_moe_text"):
        assert f[f"{a}.expert_count"] == (5 if family in ("mixtral", "gpt_oss") else 6)
        assert f[f"{a}.expert_used_count"] == 2
    if family == "qwen3_5_moe_text":
        assert f["qwen35moe.expert_shared_feed_forward_length"] == 40 and "blk.0.ffn_gate_inp_shexp.weight" in shapes
    if family == "phi3":  # fused as llama.cpp stores them: q, k, v rows and gate, up rows
        assert shapes["blk.0.attn_qkv.weight"] == (64 + 2 * 32, 64) and shapes["blk.0.ffn_up.weight"] == (224, 64)
    if family == "qwen3_5_text":  # 3 DeltaNet layers, then full attention; partial RoPE (head_dim 32 x 0.25)
        assert f["qwen35.full_attention_interval"] == 4 and f["qwen35.rope.dimension_count"] == 8
        assert f["qwen35.ssm.group_count"] == 2 and f["qwen35.ssm.time_step_rank"] == 4
        assert shapes["blk.0.ssm_conv1d.weight"] == (16 + 16 + 32, 4) and "blk.3.attn_q.weight" in shapes
    if family == "qwen3_moe":
        assert shapes["blk.0.ffn_gate_exps.weight"] == (6, 16, 32) and shapes["blk.0.ffn_down_exps.weight"] == (6, 32, 16)


def test_gemma_norms_are_stored_as_one_plus_w(tiny, tmp_path):
    folder = tiny("gemma3_text")
    model = load_model(folder)
    path = export(model, tmp_path / "m.gguf", "f32")
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    sd = model.state_dict()
    for g, hf in [("blk.1.attn_q_norm.weight", "model.layers.1.self_attn.q_norm.weight"),
                  ("blk.0.post_ffw_norm.weight", "model.layers.0.post_feedforward_layernorm.weight"),
                  ("output_norm.weight", "model.norm.weight")]:
        np.testing.assert_array_equal(tensors[g], sd[hf].numpy() + 1)


def test_warnings(tmp_path):
    """What llama.cpp computes differently and no metadata can say: gpt-oss's YaRN truncate false (its real
    config: measured 1.3e-4 relative on the tiny model) and Phi-3's window."""
    test_gptoss.make_hf(tmp_path / "oss", vocab_size=VOCAB)
    add_tokenizer(tmp_path / "oss")
    with pytest.warns(UserWarning, match="YaRN truncate false; llama.cpp rounds"):
        save_gguf(load_model(tmp_path / "oss"), tmp_path / "g.gguf", "f32", verbose=False, modelfile=False)
    windowed = tmp_path / "windowed"
    test_families.make_hf("phi3", windowed, vocab_size=VOCAB)  # sliding_window 8
    add_tokenizer(windowed)
    with pytest.warns(UserWarning, match="llama.cpp runs phi3 without its sliding window.*past 8 tokens"):
        save_gguf(load_model(windowed), tmp_path / "p.gguf", "f32", verbose=False, modelfile=False)


_TYPES = ["sliding_attention", "full_attention"] * 2


@pytest.mark.parametrize("config, match", [
    (dict(model_type="gemma2", tie_word_embeddings=False), "gemma2 model with an untied lm_head .* reuses token_embd"),
    (dict(model_type="gemma2", query_pre_attn_scalar=24), "query_pre_attn_scalar 24 != head_dim 16"),
    (dict(model_type="gemma3_text", layer_types=["full_attention", *_TYPES[1:]], sliding_window=8),
     "gemma3_text model with layer_types .* every n-th layer full"),
    (dict(model_type="gemma3_text", final_logit_softcapping=30.0), "final_logit_softcapping 30.0 .* no soft-capping"),
    (dict(model_type="smollm3", no_rope_layers=[1, 0, 1, 0]), "skips RoPE on every 4th layer exactly"),
    (dict(model_type="smollm3", layer_types=_TYPES, sliding_window=8), "smollm3 model with a sliding window in use"),
    (dict(model_type="mistral", layer_types=["sliding_attention"] * 4, sliding_window=8),
     "mistral model with a sliding window in use .* llama.cpp's 'llama' attends to every position"),
    (dict(model_type="qwen3_moe", mlp_only_layers=[1]), "qwen3_moe model with dense layers .* every layer's MLP"),
    (dict(model_type="olmoe", num_key_value_heads=2), "olmoe model with 2 key/value heads for 4 query heads"),
    (dict(model_type="gpt_oss", swiglu_limit=5.0), "gpt_oss model with swiglu_limit/swiglu_alpha other than"),
    (dict(model_type="phi3", rope_scaling={"rope_type": "longrope"}), "rope scaling 'longrope' is not supported"),
    (dict(model_type="qwen3_5_text", linear_key_head_dim=8, linear_value_head_dim=12),
     "linear_value_head_dim 12 != linear_key_head_dim 8 .* 'qwen35' sizes the DeltaNet's value heads"),
    (dict(model_type="qwen3_5_text", layer_types=["linear_attention", "full_attention"] * 2),
     "qwen3_5_text model with layer_types .* every 4-th layer full attention"),
])
def test_refusals_name_the_family_and_why(config, match):
    base = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16, num_hidden_layers=4,
                query_pre_attn_scalar=16)
    with pytest.raises(ValueError, match=match):
        gguf_write.check_config({**base, **config})


def test_gemma_27b_query_scale_is_accepted():
    """llama.cpp knows Gemma 2 27B by its 46 layers and scales queries by (hidden / heads)^-1/2 = 144^-1/2."""
    cfg = dict(model_type="gemma2", hidden_size=4608, num_attention_heads=32, head_dim=128, num_hidden_layers=46,
               query_pre_attn_scalar=144)
    assert gguf_write.check_config(cfg) == "gemma2"
    with pytest.raises(ValueError, match="query_pre_attn_scalar 144 != head_dim 128"):
        gguf_write.check_config({**cfg, "num_hidden_layers": 42})


def test_qwen35_multimodal_checkpoint_writes_its_text_model(tmp_path):
    """The released Qwen3.5 layout (Qwen3_5ForConditionalGeneration, with MTP heads): the text model is written,
    the vision tower and MTP heads (carried, not part of the decoder) are named in a warning."""
    tf = require_oracle("transformers")
    torch.manual_seed(0)
    text = {**test_qwen35._TINY, **OVERRIDES["qwen3_5_text"], "vocab_size": VOCAB}
    hf = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=text, vision_config=test_qwen35._VISION))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name and "language_model" in name:
                p.copy_(0.2 * torch.randn_like(p) + (1.0 if "linear_attn.norm" in name else 0.0))
    hf.save_pretrained(tmp_path / "mm")
    test_qwen35._add_mtp(tmp_path / "mm")
    model = load_model(add_tokenizer(tmp_path / "mm"))
    with pytest.warns(UserWarning, match=r"tensors carried from the checkpoint \(model.visual.*not in the GGUF"):
        path = save_gguf(model, tmp_path / "m.gguf", "f32", verbose=False, modelfile=False)
    with torch.no_grad():
        ours = model(torch.tensor([IDS]))[0].float().numpy()
    theirs = llama_cpp_logits(path, IDS)
    assert np.abs(theirs - ours).max() / np.abs(ours).max() <= 2e-5
