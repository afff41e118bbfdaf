"""The model against transformers: logits with and without padding, greedy generation, loss."""

import pytest
import torch

from lora_engine import load_model
from tests.conftest import tol
from tests.hf_models import FAMILIES, make_hf_model


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    # llama is also saved sharded, and with tied embeddings, to cover both loading paths.
    sharded = request.param == "llama"
    hf = make_hf_model(request.param, folder, tie=request.param == "qwen2", shard_size="100KB" if sharded else None)
    if sharded:
        assert (folder / "model.safetensors.index.json").is_file()
    return hf, load_model(folder)


def test_logits_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 23))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))


def test_logits_match_with_padding(pair):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0   # left padding
    mask[1, -4:] = 0  # right padding
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    keep = mask.bool()
    torch.testing.assert_close(got[keep], ref[keep], **tol("logits_fp32"))


def test_greedy_generation_matches(pair):
    from lora_engine.models.generate import decode

    hf, ours = pair
    prompt = torch.randint(0, hf.config.vocab_size, (1, 7))
    hf.generation_config.eos_token_id = None  # no early stop: compare all 32 tokens
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                          do_sample=False, pad_token_id=0)[0, 7:].tolist()
    assert len(ref) == 32
    got = decode(ours, [prompt[0].tolist()], 32).tokens[0]
    if got != ref:
        # Only acceptable reason: a near-tie between the top two logits where the sequences diverge.
        i = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt[0].tolist() + ref[:i]])).logits[0, -1]
        top2 = logits.topk(2).values
        assert (top2[0] - top2[1]).abs() < 1e-4, f"generation diverged at step {i}: {got} vs {ref}"


def test_loss_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 19))
    labels = ids.clone()
    labels[0, :6] = -100
    with torch.no_grad():
        ref = hf(ids, labels=labels).loss
        got = ours.loss(ids, labels)
        got_sum = ours.loss(ids, labels, reduction="sum")
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    n = int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(got_sum / n, ref, **tol("logits_fp32"))


def test_loss_gradients_match_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (2, 11))
    hf.zero_grad()
    ours.zero_grad()
    hf(ids, labels=ids).loss.backward()
    ours.loss(ids, ids).backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_loss_with_right_padding_matches_transformers(pair, monkeypatch):
    # Right-padded rows whose padding carries no label (what data/pipeline.py batches): the loss drops
    # the mask for plain causal attention (models/decoder.py:_padding_unlabelled), and the loss and
    # every gradient still equal transformers' under the mask.
    from lora_engine import dispatch
    from lora_engine.models.decoder import _padding_unlabelled

    hf, ours = pair
    ids = torch.randint(0, hf.config.vocab_size, (3, 15))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    assert _padding_unlabelled(mask, labels)
    assert not _padding_unlabelled(mask.flip(1), labels.flip(1))  # left padding keeps its mask
    assert not _padding_unlabelled(mask, ids)                     # a counted padding position keeps it
    masks = []
    real = dispatch.attention
    monkeypatch.setattr(dispatch, "attention",
                        lambda q, k, v, c, s, m=None, **kw: masks.append(m) or real(q, k, v, c, s, m, **kw))
    hf.zero_grad()
    ours.zero_grad()
    ref = hf(ids, attention_mask=mask, labels=labels).loss
    got = ours.loss(ids, labels, attention_mask=mask)
    assert masks and all(m is None for m in masks)
    torch.testing.assert_close(got, ref, **tol("logits_fp32"))
    ref.backward()
    got.backward()
    theirs = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    masks.clear()
    ours.loss(ids, ids, attention_mask=mask)  # padding counted: the mask is kept
    assert masks and all(m is not None for m in masks)
