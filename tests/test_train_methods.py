"""Training methods from the command line and the Python path: DoRA, LoRA+ parameter groups,
modules_to_save (trainable embeddings / head)."""

import json
import math

import pytest
from safetensors import safe_open

from lora_engine.loading import load_model
from lora_engine.lora.adapter import load_adapter
from lora_engine.lora.layers import lora_layers
from lora_engine.train.command import main
from tests.test_train_support import chat_records, save_tokenizer_files, tiny_model_folder, write_jsonl


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tokenizer_files(tiny_model_folder(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_records(40))


def _train(folder, data, out, *flags):
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "2", "--batch-size", "4",
               "--r", "4", "--max-length", "96", "--no-general-eval", "--no-plot", "--lr", "1e-2", *flags])
    assert rc == 0
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    return out / "adapter"


def test_cli_dora(folder, data, tmp_path):
    adapter = _train(folder, data, tmp_path / "d", "--use-dora", "--target-modules", "q_proj,v_proj")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        keys = f.keys()
    mags = [k for k in keys if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == 2 * 2  # 2 layers x (q_proj, v_proj)
    model = load_adapter(load_model(folder), adapter, verbose=False)
    moved = [(m.lora_magnitude_vector - m.dense_weight().norm(dim=1)).abs().max() for _, m in lora_layers(model)]
    assert min(moved) > 0  # two steps at lr 1e-2 trained every magnitude
