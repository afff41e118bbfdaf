"""--dpo-loss sigmoid and ipo equal TRL's: trl's own DPOTrainer._compute_loss (loss_type "sigmoid" and "ipo") against
our dpo_loss on the same per-token log-probabilities, loss and gradients; --dpo-loss simpo equals TRL's
CPOTrainer (loss_type "simpo", cpo_alpha 0: SimPO without the NLL term) and --dpo-loss orpo TRL's ORPOTrainer (its
odds-ratio loss and chosen NLL, combined as its get_batch_loss_metrics does) on the same logits.

The trainer is not constructed (that needs a model, a dataset and accelerate): _compute_loss is called unbound on
an object that has the attributes DPOConfig would give, with a stand-in for the model that returns given
per-token log-probs (what TRL's fused LM head returns) and precomputed reference log-probs. Our side's sequence
log-probs (sequence_logps) are checked against transformers in test_dpo.py; this file checks the loss function.
The rows' responses differ in length, so IPO's length normalisation is exercised. Both sides sum the same fp32
values in the same order, up to the sum over a row's tokens: rtol 1e-6.
"""

import types
from collections import defaultdict

import pytest
import torch

from lora_engine.train.config import TrainConfig
from lora_engine.train.dpo import dpo_loss
from tests.conftest import require_oracle

trl = require_oracle("trl")


def _trl_loss(loss_type, beta, per_token, mask, ref_c, ref_r):
    from trl.trainer.dpo_trainer import DPOTrainer

    def model(**kw):
        n = per_token.shape[0]
        zeros = torch.zeros_like(per_token)
        return types.SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros(n, per_token.shape[1], dtype=torch.bool))

    acc = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    t = types.SimpleNamespace(model=types.SimpleNamespace(training=True), accelerator=acc, aux_loss_enabled=False,
                              ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                              loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False,
                              _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                              _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.ones_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    return DPOTrainer._compute_loss(t, model, inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_gradients_equal_trl(loss_type, beta):
    g = torch.Generator().manual_seed(0)
    B, T = 3, 9
    prompt, lengths = 2, [4, 7, 2, 6, 3, 5]  # chosen rows, then rejected rows (TRL's batch order)
    mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, prompt:prompt + n] = 1
    shift = mask[:, 1:]
    logps = (-torch.rand(2 * B, T - 1, generator=g) * 3).requires_grad_()
    ref = (logps.detach() * shift).sum(1) + torch.randn(2 * B, generator=g)  # a policy away from its reference
    theirs = _trl_loss(loss_type, beta, logps * shift, mask, ref[:B], ref[B:])
    (grad_theirs,) = torch.autograd.grad(theirs, logps)
    seq = (logps * shift).sum(1)
    n = shift.sum(1)  # response tokens per row: what IPO divides by
    assert torch.equal(n, mask.sum(1))
    ours = dpo_loss(seq[:B], seq[B:], ref[:B], ref[B:], beta, loss_type, n[:B], n[B:])
    (grad_ours,) = torch.autograd.grad(ours.loss, logps)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-6, atol=1e-9)
    margin = beta * ((seq - ref)[:B] - (seq - ref)[B:])
    assert ours.reward_margin == pytest.approx(float(margin.mean()), rel=1e-6)


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (0.5, 1.2)])
def test_simpo_loss_and_gradients_equal_trl_cpo(beta, gamma):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    g = torch.Generator().manual_seed(1)
    B, T, V = 3, 10, 17
    logits = torch.randn(2 * B, T, V, generator=g).requires_grad_()
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    for i, n in enumerate([3, 6, 2, 5, 8, 4]):  # the prompt's positions carry no label
        labels[i, :T - n] = -100
    t = types.SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                              accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    avg = CPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    losses, chosen, rejected = CPOTrainer.cpo_loss(t, avg[:B], avg[B:])
    theirs = losses.mean()
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    seq = CPOTrainer.get_batch_logps(logits, labels)  # sums: what sequence_logps gives (test_dpo.py)
    n = (labels[:, 1:] != -100).sum(1)
    ours = dpo_loss(seq[:B], seq[B:], None, None, beta, "simpo", n[:B], n[B:], simpo_gamma=gamma)
    (grad_ours,) = torch.autograd.grad(ours.loss, logits)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-9)
    assert ours.reward_margin == pytest.approx(float((chosen - rejected).mean()), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_loss_and_gradients_equal_trl(beta):
    from torch import nn
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    g = torch.Generator().manual_seed(2)
    B, T, V = 3, 10, 17
    logits = (torch.randn(2 * B, T, V, generator=g) * 2).requires_grad_()
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    for i, n in enumerate([3, 6, 1, 5, 8, 4]):
        labels[i, :T - n] = -100
    t = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    avg = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    losses, chosen, rejected, _, _ = ORPOTrainer.odds_ratio_loss(t, avg[:B], avg[B:])
    # ORPOTrainer.concatenated_forward's NLL: cross entropy over the chosen rows' labelled tokens, then
    # get_batch_loss_metrics' loss = policy_nll_loss - losses.mean()
    nll = nn.CrossEntropyLoss()(logits[:B, :-1].reshape(-1, V), labels[:B, 1:].reshape(-1))
    theirs = nll - losses.mean()
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    seq = ORPOTrainer.get_batch_logps(logits, labels)
    n = (labels[:, 1:] != -100).sum(1)
    ours = dpo_loss(seq[:B], seq[B:], None, None, beta, "orpo", n[:B], n[B:])
    (grad_ours,) = torch.autograd.grad(ours.loss, logits)
    torch.testing.assert_close(ours.loss, theirs, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-5, atol=1e-8)
    assert ours.reward_margin == pytest.approx(float((chosen - rejected).mean()), rel=1e-5)


def test_dpo_loss_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="--dpo-loss must be one of sigmoid, ipo, simpo, orpo, got 'hinge'"):
        dpo_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="loss_type 'ipo' needs chosen_tokens and rejected_tokens"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type 'simpo' needs chosen_tokens and rejected_tokens"):
        dpo_loss(x, x, None, None, loss_type="simpo")
    with pytest.raises(ValueError, match="--dpo-loss must be sigmoid, ipo, simpo or orpo, got 'kto'"):
        TrainConfig(objective="dpo", dpo_loss="kto")
