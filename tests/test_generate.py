"""The decoder (models/generate.py) on tiny random models: a batch decodes as each prompt alone,
transformers' greedy generate agrees, sampling settings, stop ids and strings, log-probabilities,
LoRA and NF4 models, and the settings it refuses."""

import math

import pytest
import torch

from lora_engine import LoraConfig, apply_lora, load_model
from lora_engine.models.generate import MAX_NEW_TOKENS, Completions, check_settings, decode
from tests.hf_models import make_hf_model

# Mixed lengths (left padding), a one-token prompt, and a prompt twice (its prefill shared).
PROMPTS = [[5, 17, 3, 88, 40, 12, 9], [33], [61, 2, 70, 14], [5, 17, 3, 88, 40, 12, 9], [90, 91, 1, 7, 7, 7, 7, 7, 7, 7]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf = make_hf_model("llama", folder)
    hf.generation_config.eos_token_id = None  # no early stop: compare every token
    return hf, load_model(folder).eval(), folder


def _forced_logprobs(model, prompt, new, temperature=1.0):
    """log_softmax(logits / temperature) (fp64) of each token of `new` after `prompt`, one sequence, no cache."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new]))[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(new)[:, None])[:, 0]


def test_a_batch_decodes_each_prompt_as_alone(pair):
    _, model, _ = pair
    """The same tokens, and the same log-probabilities up to the rounding of batched matmuls (positions or
    masks a token off would move them by far more, even where the greedy choice survives)."""
    batch = decode(model, PROMPTS, 20, logprobs=True)
    for p, got, lps in zip(PROMPTS, batch.tokens, batch.logprobs):
        alone = decode(model, [p], 20, logprobs=True)
        assert got == alone.tokens[0] and len(got) == 20
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(alone.logprobs[0]), atol=1e-5, rtol=0)
    assert batch.ended_by == [None] * len(PROMPTS)
    assert decode(model, PROMPTS[:1], 3).logprobs is None


def _near_tie(hf, prefix) -> bool:
    with torch.no_grad():
        top2 = hf(torch.tensor([prefix])).logits[0, -1].topk(2).values
    return bool((top2[0] - top2[1]).abs() < 1e-4)


def test_greedy_equals_transformers_generate_on_a_left_padded_batch(pair):
    hf, model, _ = pair
    prompts = [p for i, p in enumerate(PROMPTS) if i != 3]
    W = max(map(len, prompts))
    ids = torch.tensor([[0] * (W - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (W - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)[:, W:].tolist()
    got = decode(model, prompts, 24).tokens
    for p, g, r in zip(prompts, got, ref):
        if g != r:  # only acceptable reason: a near-tie of the top two logits where the two part
            i = next(j for j, (a, b) in enumerate(zip(g, r)) if a != b)
            assert _near_tie(hf, p + r[:i]), f"diverged at step {i}: {g} vs {r}"


def test_greedy_logprobs_are_the_models(pair):
    _, model, _ = pair
    out = decode(model, PROMPTS[:3], 12, logprobs=True)
    for p, toks, lps in zip(PROMPTS, out.tokens, out.logprobs):
        want = _forced_logprobs(model, p, toks)
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), want, atol=1e-4, rtol=0)
        assert all(lp <= 0 for lp in lps)


def test_sampling_is_seeded_and_its_logprobs_are_the_tempered_models(pair):
    _, model, _ = pair
    kw = dict(temperature=1.5, logprobs=True)
    runs = [decode(model, PROMPTS, 16, generator=torch.Generator().manual_seed(s), **kw) for s in (1, 1, 2)]
    assert runs[0].tokens == runs[1].tokens and runs[0].logprobs == runs[1].logprobs
    assert runs[0].tokens != runs[2].tokens
    # The two copies of one prompt are drawn independently (16 tokens of 96 at temperature 1.5 agreeing: ~never).
    assert runs[0].tokens[0] != runs[0].tokens[3]
    for p, toks, lps in zip(PROMPTS, runs[0].tokens, runs[0].logprobs):
        torch.testing.assert_close(torch.tensor(lps, dtype=torch.float64), _forced_logprobs(model, p, toks, 1.5),
                                   atol=1e-4, rtol=0)


def test_top_k_and_top_p_cut_the_choices(pair):
    _, model, _ = pair
    greedy = decode(model, PROMPTS, 10).tokens
    g = torch.Generator().manual_seed(0)
    assert decode(model, PROMPTS, 10, temperature=5.0, top_k=1, generator=g).tokens == greedy
    assert decode(model, PROMPTS, 10, temperature=5.0, top_p=1e-6, generator=g).tokens == greedy
    out = decode(model, PROMPTS, 10, temperature=5.0, top_k=3, generator=g)
    for p, toks in zip(PROMPTS, out.tokens):
        with torch.no_grad():
            logits = model(torch.tensor([p + toks]))[0, len(p) - 1:-1]
        top3 = logits.topk(3).indices
        assert all(t in top3[i].tolist() for i, t in enumerate(toks))
    assert out.tokens != greedy  # at temperature 5 the top 3 are near even: all 50 tokens greedy is ~impossible


def test_stop_ids_end_their_row_only(pair):
    _, model, _ = pair
    full = decode(model, PROMPTS, 16).tokens
    stop = full[0][5]
    first = {r: toks.index(stop) if stop in toks else None for r, toks in enumerate(full)}
    out = decode(model, PROMPTS, 16, stop_ids=[stop], logprobs=True)
    for r, toks in enumerate(out.tokens):
        i = first[r]
        assert toks == (full[r][:i + 1] if i is not None else full[r])
        assert out.ended_by[r] == (stop if i is not None else None)
        assert len(out.logprobs[r]) == len(toks)
        assert out.text_tokens(r) == (full[r][:i] if i is not None else full[r])


class _Letters:
    """decode: token i -> one letter, so a stop string is a run of tokens."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_end_a_row_at_the_token_that_completes_them(pair):
    _, model, _ = pair
    full = decode(model, PROMPTS, 16).tokens
    text = _Letters().decode(full[2])
    s = text[6:9]
    end = text.index(s) + len(s)  # its first occurrence ends with token end - 1
    out = decode(model, PROMPTS, 16, stop_strings=["zzzzzzzz", s], tokenizer=_Letters())
    assert out.tokens[2] == full[2][:end] and out.ended_by[2] == s
    for r in range(len(PROMPTS)):
        assert out.tokens[r] == full[r][:len(out.tokens[r])]
        assert (out.ended_by[r] == s) == (s in _Letters().decode(out.tokens[r]))


def test_streaming_sees_every_token_in_order(pair):
    _, model, _ = pair
    seen = {r: [] for r in range(len(PROMPTS))}
    out = decode(model, PROMPTS, 8, on_token=lambda r, t: seen[r].append(t))
    assert [seen[r] for r in range(len(PROMPTS))] == out.tokens


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_lora_and_nf4_models_decode_a_batch_as_alone(pair, quantize):
    _, _, folder = pair
    torch.manual_seed(0)
    model = load_model(folder, quantize=quantize)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8), verbose=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)  # B starts at zero: make the adapter change the output
    model.train()
    batch = decode(model, PROMPTS, 12)
    assert model.training  # decode evaluates, then gives the mode back
    assert batch.tokens == [decode(model, [p], 12).tokens[0] for p in PROMPTS]


def test_max_new_tokens_one_and_no_prompts(pair):
    _, model, _ = pair
    assert [len(t) for t in decode(model, PROMPTS, 1).tokens] == [1] * len(PROMPTS)
    assert decode(model, [], 4, logprobs=True) == Completions([], [], [])
    assert decode(model, [], 4) == Completions([], [], None)


@pytest.mark.parametrize("kw, message", [
    (dict(max_new_tokens=0), r"max_new_tokens must be a whole number in 1\.\.131072, got 0"),
    (dict(max_new_tokens=MAX_NEW_TOKENS + 1), r"max_new_tokens must be a whole number in 1\.\.131072, got 131073"),
    (dict(max_new_tokens=2.0), r"max_new_tokens must be a whole number .* got 2\.0"),
    (dict(temperature=-0.5), r"temperature must be a finite number >= 0 \(0 = greedy\), got -0\.5"),
    (dict(temperature=math.nan), r"temperature must be a finite number >= 0 .* got nan"),
    (dict(temperature=math.inf), r"temperature must be a finite number >= 0 .* got inf"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0\.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1\.5"),
    (dict(top_p=math.nan), r"top_p must be in \(0, 1\], got nan"),
    (dict(top_k=-1), r"top_k must be a whole number >= 0 \(0 = no limit\), got -1"),
])
def test_settings_it_refuses(pair, kw, message):
    _, model, _ = pair
    settings = dict(max_new_tokens=4, temperature=1.0, top_p=1.0, top_k=0) | kw
    with pytest.raises(ValueError, match=message):
        check_settings(**settings)
    n = settings.pop("max_new_tokens")
    with pytest.raises(ValueError, match=message):
        decode(model, PROMPTS, n, **settings)


def test_inputs_it_refuses(pair):
    _, model, _ = pair
    with pytest.raises(ValueError, match="decode: prompt 1 is empty; give at least one token"):
        decode(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="decode: stop_strings need a tokenizer to read the text"):
        decode(model, [[1, 2]], 4, stop_strings=["x"])
