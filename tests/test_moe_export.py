"""Merged export of LoRA on mixture-of-experts weights (export.py with lora/experts.py:merged_deltas): each
expert written as W_e + s B_e A_e in the per-expert layout transformers' save_pretrained writes, reloaded by
transformers and by us with the adapted model's logits. Tiny random fp32 models from tests/test_moe_families.py."""

import pytest
import torch

from lora_engine import load_model
from lora_engine.export import save_model
from lora_engine.io.safetensors import read_safetensors_header
from tests.conftest import require_oracle
from tests.test_moe_adapter import _ours_with_adapter
from tests.test_moe_families import make_hf


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    make_hf(request.param, folder)
    return folder


def test_merged_export_reloads_with_the_adapted_logits(folder, tmp_path):
    tf = require_oracle("transformers")
    ours = _ours_with_adapter(folder)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ours(ids)
        assert not torch.allclose(want, load_model(folder)(ids), atol=1e-4)  # the experts' LoRA shows
    out = save_model(ours, tmp_path / "merged", merge=True)
    # the layout save_pretrained writes: the same keys and shapes as the base folder
    keys = lambda f: {k: v["shape"] for k, v in read_safetensors_header(f / "model.safetensors")[0].items()  # noqa: E731
                      if k != "__metadata__"}
    assert keys(out) == keys(folder)
    hf = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(load_model(out)(ids), want, rtol=1e-4, atol=1e-4)
    # the model in memory keeps its base and its adapter
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), want, rtol=0, atol=0)


def test_merged_expert_equals_w_plus_s_b_a(folder, tmp_path):
    from safetensors.torch import load_file

    ours = _ours_with_adapter(folder)
    out = save_model(ours, tmp_path / "merged", merge=True)
    stored = load_file(out / "model.safetensors")
    experts = ours.model.layers[0].mlp.experts
    a, b, s = experts.factors("down_proj")
    e = experts.down_proj.shape[0] - 1
    want = experts.down_proj[e].detach().double() + s * b[e].double() @ a[e].double()
    key = next(k for k in stored if k.startswith("model.layers.0.") and k.endswith(f"experts.{e}.down_proj.weight")
               or k.endswith(f"layers.0.block_sparse_moe.experts.{e}.w2.weight"))
    torch.testing.assert_close(stored[key].double(), want, rtol=1e-6, atol=1e-6)


def test_adapter_of_expert_lora_alone_round_trips_through_peft(folder, tmp_path):
    """target_parameters without target_modules: saved as PEFT writes it (target_modules null), loaded by
    PEFT onto transformers' model with our logits, and PEFT's own save loaded back by us."""
    import json

    from lora_engine import LoraConfig, apply_lora
    from lora_engine.lora import load_adapter, save_adapter
    from lora_engine.lora.experts import MOE_TARGETS

    peft, tf = require_oracle("peft"), require_oracle("transformers")
    ours = load_model(folder)
    apply_lora(ours, LoraConfig(r=2, lora_alpha=4, target_modules=None, target_parameters=list(MOE_TARGETS)),
               verbose=False)
    assert not [n for n, p in ours.named_parameters() if p.requires_grad and "experts.lora" not in n]
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.2)
    save_adapter(ours, tmp_path / "a")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["target_modules"] is None and sorted(raw["target_parameters"]) == sorted(MOE_TARGETS)
    ids = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, ours(ids), rtol=1e-4, atol=1e-4)
        pm.save_pretrained(tmp_path / "b")
        back = load_adapter(load_model(folder), tmp_path / "b", verbose=False)
        torch.testing.assert_close(back(ids), ours(ids), rtol=0, atol=0)


def test_adapter_naming_neither_modules_nor_parameters_is_refused(folder, tmp_path):
    import json

    from lora_engine.io.safetensors import CheckpointError
    from lora_engine.lora import read_adapter_config

    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "target_modules": None}))
    with pytest.raises(CheckpointError, match="target_modules is missing or null and there are no target_param"):
        read_adapter_config(tmp_path)
