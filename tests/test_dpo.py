"""DPO: the first loss is exactly ln 2, and loss and gradients equal a direct implementation on
transformers + PEFT logits (full log-softmax over the vocabulary, reference = the base model)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lora_engine import LoraConfig, apply_lora, load_model, save_adapter
from lora_engine.lora.layers import adapters_disabled, lora_layers
from lora_engine.train.dpo import dpo_batch_loss, dpo_loss, sequence_logps
from tests.conftest import require_oracle

peft = require_oracle("peft")
transformers = require_oracle("transformers")


def _side(prompts, responses, T):
    """Right-padded (B, T) rows of prompt + response; labels on the response only."""
    B = len(prompts)
    ids, labels, mask = torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -100), torch.zeros(B, T, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        row = torch.cat([p, r])
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
        labels[i, len(p):len(row)] = r
    return ids, labels, mask


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 96, (n,), generator=g) for n in (5, 3, 7)]
    chosen = [torch.randint(0, 96, (n,), generator=g) for n in (4, 6, 2)]
    rejected = [torch.randint(0, 96, (n,), generator=g) for n in (3, 5, 5)]
    b = {}
    for side, resp in (("chosen", chosen), ("rejected", rejected)):
        b[f"{side}_input_ids"], b[f"{side}_labels"], b[f"{side}_attention_mask"] = _side(prompts, resp, 13)
    return b


@pytest.mark.parametrize("dora", [False, True])
def test_first_loss_is_exactly_ln2(base, dora):
    model = apply_lora(load_model(base), LoraConfig(r=4, use_dora=dora), verbose=False)
    res = dpo_batch_loss(model, _batch(), beta=0.1)
    assert res.loss.item() == torch.tensor(math.log(2)).item()
    assert res.reward_margin == 0.0 and res.reward_accuracy == 0.0
    res.loss.backward()  # B = 0: only lora_B gets a gradient, and it does
    assert all(m.lora_B.grad.abs().max() > 0 for _, m in lora_layers(model))


def _direct_logps(logits, labels):
    # (B, T, V) logits, the full log-softmax: what the chunked path must equal
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    t = labels[:, 1:]
    picked = lp.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (t != -100)).sum(dim=1)


@pytest.mark.parametrize("dora", [False, True])
def test_loss_and_gradients_equal_a_direct_implementation_on_transformers(base, tmp_path, dora):
    ours = apply_lora(load_model(base), LoraConfig(r=4, target_modules=("q_proj", "v_proj", "up_proj"),
                                                   use_dora=dora), verbose=False)
    with torch.no_grad():
        for _, m in lora_layers(ours):
            m.lora_B.normal_(std=0.1)
    save_adapter(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path, is_trainable=True).eval()
    ours.eval()
    b, beta = _batch(1), 0.3

    def hf_logps(side):
        return _direct_logps(theirs(b[f"{side}_input_ids"], attention_mask=b[f"{side}_attention_mask"]).logits,
                             b[f"{side}_labels"])

    with torch.no_grad(), theirs.disable_adapter():
        ref = hf_logps("chosen"), hf_logps("rejected")
    pc, pr = hf_logps("chosen"), hf_logps("rejected")
    expect = -F.logsigmoid(beta * ((pc - ref[0]) - (pr - ref[1]))).mean()
    expect.backward()
    got = dpo_batch_loss(ours, b, beta)
    got.loss.backward()
    torch.testing.assert_close(got.loss, expect, rtol=1e-5, atol=1e-6)
    assert abs(expect.item() - math.log(2)) > 1e-3  # the adapter is visible
    margin = beta * ((pc - ref[0]) - (pr - ref[1]))
    assert got.reward_margin == pytest.approx(margin.mean().item(), rel=1e-4, abs=1e-6)
    assert got.reward_accuracy == pytest.approx((margin > 0).float().mean().item())
    params = dict(theirs.named_parameters())
    for path, m in lora_layers(ours):
        for name in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if dora else ()):
            key = f"base_model.model.{path}.{name}.default.weight"
            torch.testing.assert_close(getattr(m, name).grad, params[key].grad, rtol=1e-4, atol=1e-6)


def test_dpo_errors(base):
    model = apply_lora(load_model(base), LoraConfig(r=4), verbose=False)
    b = _batch()
    b["chosen_labels"][1] = -100
    with pytest.raises(ValueError, match="row 1 has no response token"):
        dpo_batch_loss(model, b)
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="--dpo-beta must be > 0, got 0"):
        dpo_loss(x, x, x, x, beta=0)
    saved = apply_lora(load_model(base), LoraConfig(r=4, modules_to_save=("lm_head",)), verbose=False)
    with pytest.raises(ValueError, match="trains modules_to_save"), adapters_disabled(saved):
        pass
    with adapters_disabled(model):  # switched off inside, back on after
        assert all(m.disabled for _, m in lora_layers(model))
    assert not any(m.disabled for _, m in lora_layers(model))


def test_sequence_logps_sums_response_tokens_only(base):
    model = load_model(base).eval()
    b = _batch(2)
    with torch.no_grad():
        got = sequence_logps(model, b["chosen_input_ids"], b["chosen_labels"], b["chosen_attention_mask"])
        ref = _direct_logps(model(b["chosen_input_ids"], b["chosen_attention_mask"]), b["chosen_labels"])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
