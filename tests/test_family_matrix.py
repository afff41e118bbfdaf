"""Every family beyond Llama through the features the Llama tests cover: `--finetune full` (the saved folder
read by transformers), DoRA against PEFT's DoRA (refused by name on expert parameters), DPO, checkpoint and
resume, and the merged export read by transformers. Tiny random models from tests/families_fixtures.py with
the train tests' tokenizer; what other modules already cover is left to them (tests/test_moe_export.py:
merged export of qwen3_moe and mixtral; tests/test_qwen35_train.py: DPO and full fine-tuning of qwen3_5)."""

import json
import math

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_adapter, load_model
from lora_engine.export import save_model
from lora_engine.io.safetensors import read_safetensors_header
from lora_engine.lora.experts import MOE_TARGETS, PEFT_EXPERT_NAMES
from lora_engine.train.command import main
from tests.conftest import require_oracle, tol
from tests.families_fixtures import FAMILIES, MOE, make_family
from tests.test_dpo_train import pref_records
from tests.test_train_support import VOCAB, chat_records, save_tokenizer_files, write_jsonl

# Projections of each family's attention and MLP as PEFT names them (phi3's fused ones as its checkpoint does).
_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_MLP = ["gate_proj", "up_proj", "down_proj"]
_DELTANET = ["in_proj_qkv", "in_proj_z", "out_proj"]
MODULES = {f: _ATTN + _MLP for f in FAMILIES} | {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "qwen3_5_text": _ATTN + _MLP + _DELTANET,
    "qwen3_5_moe_text": _ATTN + _DELTANET,
    "mixtral": _ATTN, "olmoe": _ATTN, "gpt_oss": _ATTN,  # no dense MLP
}
# PEFT's DoRA targets for the step test. Phi-3: the unfused modules only; a fused qkv_proj trains one A for
# q, k and v where our split parts train one each (lora/fused.py), so only the forward of a fused adapter
# equals PEFT's (tests/test_families_adapter.py). MoE: attention, as PEFT maps an expert MLP name onto its
# ParamWrapper, which has no DoRA (the refusal test below).
DORA = MODULES | {"phi3": ["o_proj", "down_proj"], "qwen3_moe": _ATTN}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, folder): a tiny random checkpoint with the train tests' tokenizer (vocab 128)."""
    require_oracle("transformers")
    folder = tmp_path_factory.mktemp(request.param)
    make_family(request.param, folder, vocab_size=VOCAB)
    save_tokenizer_files(folder)
    return request.param, folder


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("chat") / "chat.jsonl", chat_records(16))


def _lora_flags(family):
    """--target-modules (and the experts on an MoE model) as the train command takes them."""
    # fewer modules, a faster run; where gate_proj names the experts' fused gate_up_proj, up_proj must stay
    drop = ("k_proj",) if family in PEFT_EXPERT_NAMES else ("k_proj", "up_proj")
    flags = ["--target-modules", ",".join(m for m in MODULES[family] if m not in drop)]
    return flags + (["--target-parameters", ",".join(MOE_TARGETS)] if family in MOE else [])


def _train(folder, out, *flags):
    rc = main(["--model", str(folder), "--out", str(out), "--batch-size", "4", "--max-length", "64",
               "--no-general-eval", "--no-plot", "--warmup-steps", "0", "--eval-every", "0", *flags])
    assert rc == 0
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _ids(seed=3):
    return torch.randint(3, VOCAB, (2, 19), generator=torch.Generator().manual_seed(seed))  # 19 > the window (8)


def test_full_finetuning_writes_a_folder_transformers_reads(family, chat, tmp_path):
    tf = require_oracle("transformers")
    name, folder = family
    rows = _train(folder, tmp_path / "run", "--finetune", "full", "--data", str(chat), "--max-steps", "3",
                  "--lr", "1e-3")
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    saved = tmp_path / "run" / "model"
    ours, base = load_model(saved), load_model(folder)
    moved = [n for n, p in ours.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert len(moved) == len(list(ours.parameters())), "a weight was not trained or not written"
    if name == "phi3":  # written fused again, as the family's checkpoints are
        keys = read_safetensors_header(next(saved.glob("*.safetensors")))[0]
        assert "model.layers.0.self_attn.qkv_proj.weight" in keys and "model.layers.0.mlp.gate_up_proj.weight" in keys
    theirs = tf.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(_ids()), theirs(_ids()).logits, **tol("logits_fp32"))


def test_dora_step_equals_peft(family, tmp_path):
    """PEFT's DoRA adapter (B drawn non-zero) loaded into ours; one SGD step on each; the logits after it equal."""
    tf, peft = require_oracle("transformers"), require_oracle("peft")
    name, folder = family
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=DORA[name]))
    torch.manual_seed(4)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path / "peft")
    ours = load_adapter(load_model(folder), tmp_path / "peft", verbose=False)
    labels = _ids(5)
    for model, logits in ((ours, lambda m, x: m(x)), (theirs, lambda m, x: m(input_ids=x).logits)):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        out = logits(model, labels)
        torch.nn.functional.cross_entropy(out[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)).backward()
        opt.step()
    with torch.no_grad():
        got, want = ours.eval()(_ids()), theirs.eval()(input_ids=_ids()).logits
    assert not torch.allclose(want, tf.AutoModelForCausalLM.from_pretrained(folder)(_ids()).logits, atol=1e-3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MOE)
def test_dora_on_expert_parameters_is_refused_by_name(name, tmp_path):
    require_oracle("transformers")
    make_family(name, tmp_path)
    with pytest.raises(ValueError, match=r"LoRA on expert parameters \(target_parameters\) supports neither use_dora"):
        apply_lora(load_model(tmp_path), LoraConfig(r=2, use_dora=True, target_modules=["q_proj"],
                                                    target_parameters=list(MOE_TARGETS)), verbose=False)


def test_dpo_run_starts_at_log2_and_learns(family, tmp_path):
    name, folder = family
    if name == "qwen3_5_text":
        pytest.skip("tests/test_qwen35_train.py::test_a_short_dpo_run_moves_the_loss runs it")
    data = write_jsonl(tmp_path / "pairs.jsonl", pref_records(16))
    # every pair in each step's batch (16), so the loss is of the same pairs each step and must go down
    rows = _train(folder, tmp_path / "run", "--objective", "dpo", "--data", str(data), "--max-steps", "3", "--r", "4",
                  "--lr", "5e-3", "--batch-size", "16", *_lora_flags(name))
    assert len(rows) == 3 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(family, chat, tmp_path):
    name, folder = family
    flags = ("--data", str(chat), "--max-steps", "4", "--lr", "1e-2", "--r", "4", "--save-every", "2",
             *_lora_flags(name))
    whole = _train(folder, tmp_path / "whole", *flags)
    resumed = _train(folder, tmp_path / "resumed", *flags, "--resume",
                     str(tmp_path / "whole" / "checkpoints" / "step-00000002"))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in whole]
    a, b = (load_adapter(load_model(folder), tmp_path / run / "adapter", verbose=False) for run in ("whole", "resumed"))
    for (n, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_merged_export_is_the_family_layout_transformers_reads(family, tmp_path):
    tf = require_oracle("transformers")
    name, folder = family
    if name in ("qwen3_moe", "mixtral"):
        pytest.skip("tests/test_moe_export.py::test_merged_export_reloads_with_the_adapted_logits covers it")
    ours = apply_lora(load_model(folder), LoraConfig(r=2, lora_alpha=4, target_modules=MODULES[name],
                                                     target_parameters=list(MOE_TARGETS) if name in MOE else []),
                      verbose=False)
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.2)
        want = ours(_ids())
    out = save_model(ours, tmp_path / "merged", merge=True)
    keys = read_safetensors_header(next(out.glob("*.safetensors")))[0]
    assert set(keys) == set(read_safetensors_header(next(folder.glob("*.safetensors")))[0])  # the family's own layout
    theirs = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(want, load_model(folder)(_ids()), atol=1e-3)  # the adapters show
        torch.testing.assert_close(theirs(_ids()).logits, want, **tol("logits_fp32"))


def test_phi3_fused_names_target_their_parts(tmp_path):
    """PEFT's targets for Phi-3 name the checkpoint's fused modules; our decoder keeps the parts apart."""
    require_oracle("transformers")
    make_family("phi3", tmp_path)
    fused = apply_lora(load_model(tmp_path), LoraConfig(r=2, target_modules=["qkv_proj", "gate_up_proj"]),
                       verbose=False)
    split = apply_lora(load_model(tmp_path), LoraConfig(r=2, target_modules=["q_proj", "k_proj", "v_proj", "gate_proj",
                                                                             "up_proj"]), verbose=False)
    assert [n for n, _ in fused.named_parameters() if "lora_" in n] == \
        [n for n, _ in split.named_parameters() if "lora_" in n]
