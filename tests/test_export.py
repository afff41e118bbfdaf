"""save_model and `python -m lora_engine.export` against plain transformers (no PEFT at load time)."""

import json
import os

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_model, merge_lora, save_adapter, save_model
from lora_engine.cli import parse_size, run_cli
from lora_engine.export import main
from lora_engine.io.atomic import OutputError
from lora_engine.lora.layers import lora_layers
from lora_engine.models.decoder import CausalLM
from tests.conftest import make_run_folder, require_oracle, tiny_config, tol
from tests.hf_models import make_hf_model

transformers = require_oracle("transformers")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny qwen2 checkpoint (q/k/v biases, tied embeddings) with a tokenizer file to carry over."""
    folder = tmp_path_factory.mktemp("qwen2")
    make_hf_model("qwen2", folder, tie=True)
    (folder / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    return folder


def _with_lora(base):
    model = load_model(base)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj", "down_proj")),
               verbose=False)
    with torch.no_grad():
        for _, m in lora_layers(model):
            m.lora_B.normal_(std=0.2)
    return model


def _hf_logits(folder, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def _ids():
    return torch.randint(0, 96, (2, 11))


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_merged_export_loads_in_transformers(base, tmp_path, shard):
    model = _with_lora(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = {"max_shard_size": shard} if shard else {}
    save_model(model, tmp_path / "out", merge=True, **kw)
    # The model in memory is untouched by the export.
    assert not any(m.merged for _, m in lora_layers(model))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "tokenizer_config.json" in files and "generation_config.json" in files
    if shard:
        index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
        assert all((tmp_path / "out" / s).stat().st_size <= 20_000 + 16 * 1024 for s in shards)  # + header
    else:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(_hf_logits(tmp_path / "out", ids), ours, **tol("logits_fp32"))


def test_export_without_merge_writes_base_and_warns(base, tmp_path):
    model = _with_lora(base)
    with pytest.warns(UserWarning, match=r"base weights only; the LoRA of 6 layers .*save_adapter"):
        save_model(model, tmp_path / "out")
    ids = _ids()
    torch.testing.assert_close(_hf_logits(tmp_path / "out", ids), _hf_logits(base, ids), rtol=0, atol=0)


def test_merged_in_memory(base, tmp_path):
    model = _with_lora(base)
    save_model(model, tmp_path / "fly", merge=True)
    merge_lora(model)
    with pytest.raises(ValueError, match="merged into the weights in memory.*call unmerge_lora"):
        save_model(model, tmp_path / "base")
    save_model(model, tmp_path / "mem", merge=True)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "fly" / name).read_bytes() == (tmp_path / "mem" / name).read_bytes()


def test_bf16_export_via_command_line(base, tmp_path, capsys):
    model = _with_lora(base)
    save_adapter(model, tmp_path / "adapter")
    main(["--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "out"),
          "--dtype", "bfloat16", "--max-shard-size", "30KB"])
    assert "wrote" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["model_type"] == "qwen2"
    exported = load_model(tmp_path / "out")
    assert exported.lm_head.weight.dtype == torch.bfloat16
    # Each merged weight is W + s*B@A computed in fp32 and rounded once to bf16.
    for path, m in lora_layers(model):
        want = (m.weight.float() + m.delta_weight()).to(torch.bfloat16)
        assert torch.equal(exported.get_submodule(path).weight, want), path


def test_command_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path)])
    assert "--model is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "x", "--out", str(tmp_path), "--dtype", "int8"])
    assert "--dtype must be one of fp32, bf16, fp16 (or float32, bfloat16, float16, f32, f16), got 'int8'" \
        in capsys.readouterr().err


def test_model_without_original_config(tmp_path):
    # A model built in code has no config.json to keep: one is written from ModelConfig.
    cfg = tiny_config(wide=True, rope_theta=5000.0)
    model = CausalLM(cfg).eval()
    save_model(model, tmp_path / "out")
    ids = _ids()
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(_hf_logits(tmp_path / "out", ids), ours, **tol("logits_fp32"))


def test_existing_folders(base, tmp_path):
    model = load_model(base)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="data holds notes.txt, no config.json: it is not a model folder .*not "
                                          "replaced; choose another output path, or remove it yourself"):
        save_model(model, tmp_path / "data")
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"
    save_model(model, tmp_path / "out", max_shard_size="20KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    save_model(model, tmp_path / "out")  # an earlier export (shards and all) is replaced as a whole
    assert not list((tmp_path / "out").glob("model-*")) and (tmp_path / "out" / "model.safetensors").is_file()
    (tmp_path / "out" / "stale.safetensors").write_text("someone else's")
    with pytest.raises(OutputError, match="out holds stale.safetensors: it is not a model folder"):
        save_model(model, tmp_path / "out")
    assert (tmp_path / "out" / "stale.safetensors").read_text() == "someone else's"
    with pytest.raises(OutputError, match="is the folder the model was loaded from; .*replace the base model"):
        save_model(model, base)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask  # not mkdtemp's owner-only 0700
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_export_onto_a_run_folder_is_refused_and_deletes_nothing(base, tmp_path, capsys):
    save_adapter(_with_lora(base), tmp_path / "adapter")
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    before = make_run_folder(run)
    rc = run_cli(main, ["--model", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --out: {run} holds adapter/, checkpoints/, metrics.jsonl, run.json: it is not a "
                          "model folder this command writes")
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]  # and nothing was written beside it


@pytest.mark.parametrize("bad", [0, -5, "5XB", "", "0MB", True])
def test_bad_shard_size(bad):
    with pytest.raises(ValueError, match="max_shard_size .* is not a size; write a positive byte count"):
        parse_size(bad, "max_shard_size")


def test_bad_dtype(base, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        save_model(load_model(base), tmp_path / "out", dtype="int8")


def test_shard_size_units():
    assert parse_size("2KB") == 2000 and parse_size("2KiB") == 2048 and parse_size("1.5GB") == 1_500_000_000


def test_a_reader_finishes_an_export_that_a_kill_left_half_swapped(base, tmp_path):
    save_model(load_model(base), tmp_path / "out")
    os.rename(tmp_path / "out", tmp_path / ".out.lora_engine-new")  # killed after the new folder was complete
    assert load_model(tmp_path / "out").config.model_type == "qwen2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
