"""config.json at its boundary: every defect a file can carry is one CheckpointError naming the file and the
field (never a KeyError, ZeroDivisionError or AttributeError from deep inside), and a config that does
not describe its checkpoint's weights is refused from the safetensors headers, before anything is built
or allocated. The fuzzing of the same boundary is tests/test_config_fuzz.py."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_engine import CheckpointError, load_model
from lora_engine.models.builder import build_model, open_checkpoint
from lora_engine.models.config import LIMITS, ModelConfig

ROOT = Path(__file__).resolve().parents[1]
# The tiny llama of tests/hf_models.py, as transformers writes it (without needing transformers here).
BASE = {"model_type": "llama", "vocab_size": 96, "hidden_size": 64, "intermediate_size": 112,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "dtype": "float32"}


def _written(tmp_path, cfg) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _without(key):
    return {k: v for k, v in BASE.items() if k != key}


@pytest.mark.parametrize("cfg, match", [
    (_without("hidden_size"), r"hidden_size missing"),
    ({**BASE, "vocab_size": None}, r"vocab_size missing"),
    ({**BASE, "num_attention_heads": 0}, r"num_attention_heads must be positive, got 0"),
    ({**BASE, "num_key_value_heads": 0}, r"num_key_value_heads must be positive, got 0"),
    ({**BASE, "num_attention_heads": 5}, r"hidden_size 64 is not a multiple of num_attention_heads 5"),
    ({**BASE, "num_attention_heads": 6, "num_key_value_heads": 4, "head_dim": 16},
     r"num_attention_heads \(6\) must be a multiple of num_key_value_heads \(4\)"),
    ({**BASE, "vocab_size": -96}, r"vocab_size must be positive, got -96"),
    ({**BASE, "intermediate_size": 112.0}, r"intermediate_size must be a whole number, got 112.0"),
    ({**BASE, "intermediate_size": 112.5}, r"intermediate_size must be a whole number, got 112.5"),
    ({**BASE, "num_hidden_layers": True}, r"num_hidden_layers must be a whole number, got True"),
    ({**BASE, "hidden_size": "64"}, r"hidden_size must be a whole number, got '64'"),
    ({**BASE, "head_dim": [16]}, r"head_dim must be a whole number, got \[16\]"),
    ({**BASE, "head_dim": 15}, r"head_dim must be even"),
    ({**BASE, "num_hidden_layers": 10**7}, r"num_hidden_layers is 10,000,000, more than the 1,024 this engine"),
    ({**BASE, "vocab_size": 10**12}, r"vocab_size is 1,000,000,000,000, more than"),
    ({**BASE, "max_position_embeddings": 2**40}, r"max_position_embeddings is 1,099,511,627,776, more than"),
    ({**BASE, "rms_norm_eps": "tiny"}, r"rms_norm_eps must be a positive number, got 'tiny'"),
    ({**BASE, "rms_norm_eps": float("nan")}, r"rms_norm_eps must be a positive number, got nan"),
    ({**BASE, "rope_theta": -1}, r"rope_theta must be a number above 1, got -1"),
    ({**BASE, "rope_theta": 1e-300}, r"rope_theta must be a number above 1, got 1e-300"),
    ({**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 1e-300, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     r"rope scaling factor must be at least 1, got 1e-300"),
    ({**BASE, "rope_parameters": [["rope_theta", 5.0]]}, r"rope_parameters must be a JSON object, got an array"),
    ({**BASE, "rope_scaling": "linear"}, r"rope_scaling must be a JSON object, got a string"),
    ({**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     r"rope scaling low_freq_factor must be a positive number, got 0"),
    ({**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     r"high_freq_factor > low_freq_factor"),
    ({**BASE, "tie_word_embeddings": "false"}, r"tie_word_embeddings must be true or false, got 'false'"),
    ({**BASE, "model_type": "mistral", "sliding_window": "4096", "use_sliding_window": True},
     r"sliding_window must be a whole number, got '4096'"),
    ({**BASE, "dtype": 16}, r"dtype 16 is not a dtype name"),
])
def test_config_defects_name_the_file_and_field(tmp_path, cfg, match):
    path = _written(tmp_path, cfg)
    with pytest.raises(CheckpointError, match=match) as e:
        ModelConfig.from_hf(path)
    assert str(e.value).startswith(f"{path}: "), e.value


@pytest.mark.parametrize("text, match", [
    ('[{"model_type": "llama"}]', r"holds one JSON object .* not an array"),
    ('"llama"', r"holds one JSON object .* not a string 'llama'"),
    ("null", r"holds one JSON object .* not null"),
    ("{oops", r"is not valid JSON"),
    ("[" * 100_000, r"is not valid JSON"),
])
def test_config_that_is_not_an_object(tmp_path, text, match):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(CheckpointError, match=match):
        ModelConfig.from_hf(path)


def test_config_not_utf8(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"model_type": "llama\xe9"}')
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        ModelConfig.from_hf(path)


def test_huge_config_file_is_not_read(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.truncate(64 * 2**20)  # sparse: 64 MiB on paper
    with pytest.raises(CheckpointError, match="67,108,864 bytes is not a config.json"):
        ModelConfig.from_hf(path)


def test_a_sound_config_still_reads(tmp_path):
    c = ModelConfig.from_hf(_written(tmp_path, {**BASE, "num_key_value_heads": None, "head_dim": None,
                                                 "rope_theta": None, "attention_bias": None}))
    assert (c.num_key_value_heads, c.head_dim, c.rope_theta, c.qkv_bias) == (4, 16, 10000.0, False)
    assert c.max_position_embeddings <= LIMITS["max_position_embeddings"]


# ---- the config against its checkpoint: refused from the headers, before anything is built ----------
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A real checkpoint of BASE: random weights saved by our own loader's counterpart (no transformers)."""
    folder = tmp_path_factory.mktemp("good")
    (folder / "config.json").write_text(json.dumps(BASE))
    model = build_model(ModelConfig.from_hf(BASE), device="cpu")
    torch.manual_seed(0)
    save_file({k: torch.randn_like(v) for k, v in model.state_dict().items()}, folder / "model.safetensors",
              metadata={"format": "pt"})
    return folder


@pytest.fixture
def edited(good, tmp_path):
    def edit(change=None, drop=()):
        folder = tmp_path / "edited"
        shutil.copytree(good, folder, dirs_exist_ok=True)
        _written(folder, {**BASE, **(change or {})})
        if drop:
            tensors = load_file(folder / "model.safetensors")
            for k in drop:
                del tensors[k]
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    return edit


def test_good_checkpoint_loads(good):
    model = load_model(good)
    assert model.config.num_hidden_layers == 2 and model.source_dir == str(good)


@pytest.mark.parametrize("change, drop, match, nf4", [
    ({"num_hidden_layers": 1000}, (), r"num_hidden_layers is 1,000 but the checkpoint holds only 2 \(model\.layers\.0 "
                                      r"to model\.layers\.1\)", True),
    ({"vocab_size": 4_000_000}, (), r"vocab_size 4,000,000 and hidden_size 64 do not fit model\.embed_tokens\.weight, "
                                    r"which is \(96, 64\) in model\.safetensors", True),
    ({"hidden_size": 4096, "num_attention_heads": 64, "num_key_value_heads": 32}, (), r"hidden_size 4,096 do not fit",
     True),
    # the embedding gone too: the size of what config.json describes against what the files hold
    ({"vocab_size": 4_000_000}, ("model.embed_tokens.weight",), r"the model it describes needs 1\.91 GiB", True),
    # NF4 never allocates the MLP's full-precision weights: its loader checks their stored shapes as it reads
    ({"intermediate_size": 2**19}, (), r"the model it describes needs 0\.75 GiB .* config\.json does not describe",
     False),
])
def test_config_not_describing_the_weights_is_refused_before_building(edited, change, drop, match, nf4, monkeypatch):
    folder = edited(change, drop)
    allocated = []
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda self, **kw: allocated.append(self))
    start = time.perf_counter()
    for quantize in (None, "nf4") if nf4 else (None,):
        with pytest.raises(CheckpointError, match=match) as e:
            load_model(folder, quantize=quantize, verbose=False)
        assert str(e.value).startswith(str(folder / "config.json")), e.value
    assert not allocated and time.perf_counter() - start < 10


def test_checkpoint_without_layers(good, edited):
    folder = edited(drop=[k for k in load_file(good / "model.safetensors") if k.startswith("model.layers.")])
    with pytest.raises(CheckpointError, match="num_hidden_layers is 2 but the checkpoint holds none"):
        open_checkpoint(folder)


def test_config_dtype_that_is_not_a_float_dtype(edited):
    with pytest.raises(CheckpointError, match=r"config\.json: dtype 'int8' is not a floating-point .* pass dtype="):
        load_model(edited({"dtype": "int8"}))
    assert load_model(edited({"dtype": "int8"}), dtype="float32").lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("cfg, match", [
    ([BASE], "holds one JSON object"),
    (_without("hidden_size"), "hidden_size missing"),
])
def test_commands_report_a_bad_config_on_one_line(tmp_path, cfg, match):
    """What the commands print: one `error:` line naming the file, exit status 2 (not a traceback)."""
    path = _written(tmp_path, cfg)
    env = dict(os.environ, PYTHONPATH=str(ROOT), LORA_ENGINE_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lora_engine.plan", "--model", str(path), "--device", "cpu"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0] and match in lines[0], lines
