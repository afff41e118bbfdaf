"""GRPO's loss and gradients equal TRL's: trl's own GRPOTrainer._compute_loss (and its per-token log-probs, through
its fused LM head on a transformers + PEFT model) against ours on the same tiny model, prompts, completions,
advantages and old log-probs, for every loss type, GSPO's sequence-level ratio and the KL term.

The trainer is not constructed (that needs a dataset, accelerate and reward models): _compute_loss is
called unbound on an object that has the attributes it reads, the settings TRL's config would give.
The prompts are of one length: TRL left-pads prompts and lets transformers number the positions from
the padding's start, ours are right-padded and number from each row's first token; with prompts of
one length the two agree (completions still differ in length, so the masks matter).

Tolerance: both sides compute in fp32 on the CPU with the same weights; they differ in summation
order only (our chunked head, PEFT's separate LoRA matmuls, TRL's fused head), a few fp32 ulps of
values of order 1 through two layers: rtol 1e-4 on gradients as the DPO parity test uses, 1e-5 on
the loss.
"""

import types
from collections import defaultdict
from contextlib import nullcontext

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_model, save_adapter
from lora_engine.lora.layers import adapters_disabled, lora_layers
from lora_engine.train.grpo import LossSettings, advantages, policy_loss
from lora_engine.train.grpo_logps import completion_logps
from tests.conftest import require_oracle

peft = require_oracle("peft")
transformers = require_oracle("transformers")
trl = require_oracle("trl")

B, P, C, MAX_LEN, TEMP = 6, 5, 7, 9, 0.7


def _rollout(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, 96, (B, P), generator=g)
    completion_ids = torch.randint(3, 96, (B, C), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    completion_ids = completion_ids * completion_mask  # padding id 0 after each completion
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, float("nan"), 1.0])
    return prompt_ids, completion_ids, completion_mask, rewards


class _Accelerator:
    num_processes = 1
    is_main_process = True

    def autocast(self):
        return nullcontext()

    def reduce(self, x, reduction="sum"):
        return x

    def gather(self, x):
        return x

    gather_for_metrics = gather


def _trl_trainer(loss_type, beta, level, eps_high, grad_accum):
    from trl.trainer.grpo_trainer import GRPOTrainer

    t = types.SimpleNamespace(
        top_entropy_quantile=1.0, aux_loss_enabled=False, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=0.2, epsilon_high=eps_high,
        use_vllm=False, vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=grad_accum, max_completion_length=MAX_LEN, accelerator=_Accelerator(),
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=grad_accum))
    t._get_per_token_logps_and_entropies = types.MethodType(GRPOTrainer._get_per_token_logps_and_entropies, t)
    t._compute_loss = types.MethodType(GRPOTrainer._compute_loss, t)
    return t


def _models(base, tmp_path):
    ours = apply_lora(load_model(base), LoraConfig(r=4, target_modules=("q_proj", "v_proj", "up_proj")),
                      verbose=False)
    with torch.no_grad():
        for _, m in lora_layers(ours):
            m.lora_B.normal_(std=0.1)
    save_adapter(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trl.trainer.utils.add_fused_lm_head(hf, temperature=TEMP, outputs=("log_probs", "entropy"))
    theirs = peft.PeftModel.from_pretrained(hf, tmp_path, is_trainable=True)
    return ours.eval(), theirs.eval()


def _ours_logps(model, prompt_ids, completion_ids, completion_mask):
    ids = torch.cat([prompt_ids, completion_ids], 1)
    attn = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    return completion_logps(model, ids, attn, torch.full((B,), P), completion_mask, TEMP, chunk=5)


CASES = [("grpo", 0.0, "token", 0.2), ("dr_grpo", 0.0, "token", 0.2), ("dapo", 0.0, "token", 0.28),
         ("bnpo", 0.0, "token", 0.2), ("grpo", 0.0, "sequence", 0.2), ("dapo", 0.04, "token", 0.28),
         ("grpo", 0.1, "sequence", 0.2)]


@pytest.mark.parametrize("loss_type, beta, level, eps_high", CASES)
@pytest.mark.parametrize("old", [False, True])
def test_loss_and_gradients_equal_trl(base, tmp_path, loss_type, beta, level, eps_high, old):
    ours, theirs = _models(base, tmp_path)
    prompt_ids, completion_ids, completion_mask, rewards = _rollout()
    adv, _ = advantages(rewards, group=3, scale_rewards="group")
    settings = LossSettings(loss_type, beta, 0.2, eps_high, level, MAX_LEN)
    grad_accum = 2
    trainer = _trl_trainer(loss_type, beta, level, eps_high, grad_accum)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": adv,
              # dapo's denominator: the step's completion tokens (here this micro-batch's and as many again)
              "num_items_in_batch": completion_mask.sum() * grad_accum}
    with torch.no_grad():
        lp0 = _ours_logps(ours, prompt_ids, completion_ids, completion_mask)
    old_lp = None
    if old:  # a rollout drawn by an earlier policy: ratios away from 1, some clipped on each side
        g = torch.Generator().manual_seed(3)
        # rows of positive advantage made likelier than when drawn, rows of negative less: both clip sides
        shift = torch.tensor([-0.5, 0.5, 0.0, 0.0, 0.0, 0.5])[:, None]
        old_lp = lp0 + 0.4 * torch.randn(lp0.shape, generator=g) + shift
        inputs["old_per_token_logps"] = old_lp * completion_mask
        old_lp = inputs["old_per_token_logps"]
    ref = None
    if beta:
        with torch.no_grad(), adapters_disabled(ours):
            ref = _ours_logps(ours, prompt_ids, completion_ids, completion_mask)
        with torch.no_grad(), theirs.disable_adapter():
            ids = torch.cat([prompt_ids, completion_ids], 1)
            trl_ref = trainer._get_per_token_logps_and_entropies(
                theirs, ids, torch.cat([inputs["prompt_mask"], completion_mask], 1), C)[0]
        torch.testing.assert_close(ref * completion_mask, trl_ref * completion_mask, rtol=1e-5, atol=1e-5)
        inputs["ref_per_token_logps"] = trl_ref

    expect = trainer._compute_loss(theirs, inputs)
    expect.backward()
    lp = _ours_logps(ours, prompt_ids, completion_ids, completion_mask)
    parts = policy_loss(lp, old_lp, ref, adv, completion_mask, settings, grad_accum,
                        step_tokens=float(completion_mask.sum() * grad_accum))
    parts.loss.backward()
    torch.testing.assert_close(parts.loss, expect, rtol=1e-5, atol=1e-6)
    params = dict(theirs.named_parameters())
    # At ratio 1 the loss value is ~0 (advantages sum to zero in a group); its gradient is not.
    assert max(float(m.lora_B.grad.abs().max()) for _, m in lora_layers(ours)) > 1e-4
    for path, m in lora_layers(ours):
        for name in ("lora_A", "lora_B"):
            key = f"base_model.model.{path}.{name}.default.weight"
            torch.testing.assert_close(getattr(m, name).grad, params[key].grad, rtol=1e-4, atol=1e-6)
    metrics = trainer._metrics["train"]
    if beta:
        assert parts.kl_sum / float(completion_mask.sum()) == pytest.approx(metrics["kl"][0], rel=1e-4, abs=1e-7)
    for k in ("low", "high", "region"):
        assert parts.clipped[k] / parts.count == pytest.approx(metrics[f"clip_ratio/{k}_mean"][0], abs=1e-6)
    if old:
        assert metrics["clip_ratio/region_mean"][0] > 0  # clipping took part


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    from trl.trainer.utils import nanstd

    r = torch.tensor([1.0, 0.0, 0.5, 2.0, float("nan"), 1.0, 3.0, 3.0, 3.0])
    got, zero = advantages(r, 3, scale)
    mean = torch.nanmean(r.view(-1, 3), dim=1).repeat_interleave(3)
    std = nanstd(r).expand_as(r) if scale == "batch" else nanstd(r.view(-1, 3), dim=1).repeat_interleave(3)
    want = r - mean
    if scale != "none":
        want = want / (std + 1e-4)
    torch.testing.assert_close(got, torch.nan_to_num(want, nan=0.0))
    assert got[6:].abs().max() == 0  # a group whose rewards are all equal teaches nothing
    assert zero.tolist() == torch.isclose(std, torch.zeros_like(std)).tolist()
