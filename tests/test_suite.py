"""Evaluation suites: multiple-choice log-likelihood scoring, generation matching, the embedded general
suite, `eval --suite`, and the suite scores training records for the registry's gate."""

import json
import math

import pytest
import torch

from lora_engine.eval import main as eval_main
from lora_engine.registry.store import general_regression
from lora_engine.train.suite import choice_logprobs, general_suite, read_suite, score_item, score_suite
from tests.test_train_support import FakeTokenizer, chat_records, write_jsonl

TOK = FakeTokenizer()


@pytest.fixture(scope="module")
def model(folder):
    from lora_engine import load_model

    return load_model(folder).eval()


def test_choice_logprobs_equal_one_sequence_at_a_time(model):
    """The padded batch gives each choice what it gets alone: the sum of log p(token | everything before)."""
    ctx, choices = "Question: 2+2?\nAnswer:", ["4", "four hundred and six", "x"]
    got = choice_logprobs(model, TOK, ctx, choices)
    for c, g in zip(choices, got):
        ids = TOK.encode(ctx) + TOK.encode(" " + c)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
        n = len(TOK.encode(ctx))
        want = sum(float(logp[t - 1, ids[t]]) for t in range(n, len(ids)))
        assert g == pytest.approx(want, abs=1e-4)


class _ForwardOnly(torch.nn.Module):
    """The model seen through forward alone (no hidden_states): choice_logprobs_many's other path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids, attention_mask=None):
        return self.inner(ids, attention_mask=attention_mask)


class _SpacelessChoices(FakeTokenizer):
    """" b" encodes as "b": one-character choices are one token, so no choice has a second token."""

    def encode(self, text, *a, **kw):
        return super().encode(text[1:] if text.startswith(" ") else text, *a, **kw)


QUERIES = [("Question: 2+2?\nAnswer:", ["4", "four hundred and six", "x"]), ("a", ["b", "cd"]),
           ("In the beginning God created the heaven", ["and the earth", "x", "yz", "w"]), ("q", ["only one"])]


@pytest.mark.parametrize("batch_tokens", [1, 40, 100_000])  # one query a forward, a few, all in one
@pytest.mark.parametrize("forward_only", [False, True])
@pytest.mark.parametrize("tok, queries", [(TOK, QUERIES), (_SpacelessChoices(), [("ab", ["c", "d"]), ("e", ["f"])])],
                         ids=["choices of many tokens", "one-token choices"])
def test_many_queries_batched_equal_each_sequence_alone(model, monkeypatch, batch_tokens, forward_only, tok, queries):
    """Contexts read once into a KV cache and continued once per choice, several queries in one
    forward, the head only at the positions that predict a choice: each choice still gets the sum of
    log p(token | everything before) that its sequence gets alone."""
    from lora_engine.train import suite

    monkeypatch.setattr(suite, "_BATCH_TOKENS", batch_tokens)
    got = suite.choice_logprobs_many(_ForwardOnly(model) if forward_only else model, tok, queries)
    assert [len(g) for g in got] == [len(c) for _, c in queries]
    for (ctx, choices), lps in zip(queries, got):
        for c, g in zip(choices, lps):
            ids = tok.encode(ctx) + tok.encode(" " + c)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
            n = len(tok.encode(ctx))
            assert g == pytest.approx(sum(float(logp[t - 1, ids[t]]) for t in range(n, len(ids))), abs=1e-4)


def test_score_suite_batches_the_choices_and_scores_as_item_by_item(model, monkeypatch):
    """A suite of multiple-choice and generation items mixed: the points are those of the items scored
    one by one (score_item), whatever the batching."""
    from lora_engine.train import suite

    items = [{"kind": "multiple_choice", "question": f"which {i}?", "choices": ["ab", "cd", "ef"], "answer": i % 3}
             for i in range(5)]
    items.insert(2, {"kind": "generation", "prompt": "Say hi", "expected": "hi", "match": "contains", "chat": False})
    one_by_one = [score_item(model, TOK, it) for it in items]
    for batch_tokens in (1, 10_000):
        monkeypatch.setattr(suite, "_BATCH_TOKENS", batch_tokens)
        got = score_suite(model, TOK, items)
        assert got["correct"] == sum(one_by_one) and got["items"] == 6
        assert got["multiple_choice"] == {"items": 5, "correct": sum(one_by_one[:2] + one_by_one[3:])}


def test_an_empty_context_or_choice_is_refused():
    from lora_engine.train.suite import choice_logprobs_many

    with pytest.raises(ValueError, match="encodes to no tokens: ''"):
        choice_logprobs_many(torch.nn.Linear(1, 1), TOK, [("", ["a"])])
    with pytest.raises(ValueError, match=r"choices that encode to tokens, got \[\]"):
        choice_logprobs_many(torch.nn.Linear(1, 1), TOK, [("q", [])])
    with pytest.raises(ValueError, match=r"choices that encode to tokens, got \['a', ''\]"):
        choice_logprobs_many(torch.nn.Linear(1, 1), _SpacelessChoices(), [("q", ["a", ""])])


def test_multiple_choice_picks_the_likeliest_choice(model):
    ctx = "Question: which?\nAnswer:"
    lp = choice_logprobs(model, TOK, ctx, ["ab", "cd", "ef"])
    best = max(range(3), key=lp.__getitem__)
    for answer in range(3):
        item = {"kind": "multiple_choice", "question": "which?", "choices": ["ab", "cd", "ef"], "answer": answer}
        assert score_item(model, TOK, item) == (answer == best)


class Parrot(torch.nn.Module):
    """Answers `text` and then end of sequence, whatever it is asked: a model whose output is known."""

    def __init__(self, text: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.ids = TOK.encode(text) + [TOK.eos_token_id]

    def new_cache(self, batch, max_len):
        return {"calls": 0}

    def hidden_states(self, x, attention_mask=None, position_ids=None, cache=None):
        h = torch.zeros(x.shape[0], x.shape[1], 128)  # the "hidden state" is the logits already
        h[:, -1, self.ids[min(cache["calls"], len(self.ids) - 1)]] = 1.0
        cache["calls"] += 1
        return h

    def logits(self, h):
        return h


@pytest.mark.parametrize("expected, match, ok", [
    ("Paris", "exact", True), (" Paris ", "exact", True), ("Pari", "exact", False), ("Paris, France", "exact", False),
    ("aris", "contains", True), ("is the", "contains", True), ("Rome", "contains", False),
])
def test_generation_items_match_exactly_or_by_containment(expected, match, ok):
    item = {"kind": "generation", "prompt": "Capital of France?", "expected": expected, "match": match, "chat": True}
    assert score_item(Parrot("Paris\nis the capital"), TOK, item) is ok


def test_generation_items_are_scored_on_the_decoders_greedy_text(model):
    """score_item decodes with models/generate.decode: greedy, up to len(expected) + 16 tokens, ending at eos."""
    from lora_engine.models.generate import decode

    prompt = TOK.encode("Hello there")
    text = TOK.decode(decode(model, [prompt], 3 + 16, stop_ids=TOK.eos_token_ids).text_tokens(0))
    assert len(text.strip()) >= 3, f"the tiny model says too little for the test to tell: {text!r}"
    item = {"kind": "generation", "prompt": "Hello there", "match": "contains", "chat": False}
    assert score_item(model, TOK, item | {"expected": text.strip()[-3:]})  # 3 tokens: the same 19 decoded
    assert not score_item(model, TOK, item | {"expected": text.strip()[-3:] + "\x7f"})


def test_read_suite_and_its_errors(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": "b"},
                                           {"prompt": "Say hi", "expected": "hi", "match": "contains"}])
    items = read_suite(f)
    assert items[0]["answer"] == 1 and items[1] == {"kind": "generation", "prompt": "Say hi", "expected": "hi",
                                                    "match": "contains", "chat": False}
    for record, msg in [({"question": "Q", "choices": ["a"], "answer": 0}, r"s.jsonl:1: a multiple-choice item needs"),
                        ({"question": "Q", "choices": ["a", "b"], "answer": 2}, r"answer 2 is neither an index"),
                        ({"question": "Q", "choices": ["a", "b"], "answer": "c"}, r"answer 'c' is neither"),
                        ({"prompt": "p", "expected": " "}, r"needs a non-empty prompt and expected"),
                        ({"prompt": "p", "expected": "e", "match": "regex"}, r"match 'regex'; use one of exact"),
                        ({"text": "x"}, r"either question/choices/answer .* got keys \['text'\]")]:
        with pytest.raises(ValueError, match=msg):
            read_suite(write_jsonl(tmp_path / "s.jsonl", [record]))
    (tmp_path / "s.jsonl").write_text("\n{not json\n")
    with pytest.raises(ValueError, match=r"s.jsonl:2: not valid JSON"):
        read_suite(tmp_path / "s.jsonl")
    (tmp_path / "s.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="the suite holds no items"):
        read_suite(tmp_path / "s.jsonl")


def test_general_suite_is_fixed_and_well_formed():
    a, b = general_suite(), general_suite()
    assert a == b and len(a) == 100
    assert [it["answer"] for it in a[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]
    for it in a:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4 and len(it["context"].split()) == 12
    # The right answer is the passage's own continuation: its words follow the context in the text.
    from lora_engine.data.embedded import general_text

    first = general_text(n_chars=100 * 160, pieces=100)[0]
    assert first.startswith(a[0]["context"] + " " + a[0]["choices"][a[0]["answer"]])


def test_score_suite_counts_points(model, tmp_path):
    items = read_suite(write_jsonl(tmp_path / "s.jsonl", [
        {"question": "Q?", "choices": ["a", "b"], "answer": a} for a in (0, 1)]))
    res = score_suite(model, TOK, items)
    # The two items ask the same question with opposite answers: exactly one is right.
    assert res == {"score": 50.0, "items": 2, "correct": 1, "multiple_choice": {"items": 2, "correct": 1}}


def test_eval_cli_scores_suites_before_and_after(folder, tmp_path, capsys):
    from lora_engine.lora.adapter import save_adapter
    from tests.test_train_support import tiny_lora_model

    torch.manual_seed(0)
    save_adapter(tiny_lora_model(folder), tmp_path / "adapter")
    suite = write_jsonl(tmp_path / "s.jsonl", [{"question": "Q?", "choices": ["a", "b"], "answer": 0}])
    data = write_jsonl(tmp_path / "val.jsonl", chat_records(4))
    cmp = eval_main(["--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--data", str(data),
                     "--no-general", "--suite", f"{suite},general"])
    out = capsys.readouterr().out
    assert set(cmp["before"]["suite"]) == {str(suite), "general"} and cmp["after"]["suite"]["general"]["items"] == 100
    assert f"suite {suite}: " in out and "suite general: " in out and " points (" in out
    gate = general_regression(cmp)
    assert gate["drop"] == pytest.approx(cmp["before"]["suite"]["general"]["score"]
                                         - cmp["after"]["suite"]["general"]["score"])
    from lora_engine.cli import run_cli

    rc = run_cli(eval_main, ["--model", str(folder), "--suite", str(tmp_path / "none.jsonl")])
    assert rc == 2 and "error: --suite: " in capsys.readouterr().err


def test_training_records_the_general_suite_for_the_gate(folder, tmp_path):
    from lora_engine.train.command import main as train

    data = write_jsonl(tmp_path / "chat.jsonl", chat_records(12))
    rc = train(["--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2",
                "--batch-size", "4", "--r", "4", "--max-length", "96", "--general-tokens", "16", "--no-plot",
                "--save-every", "0", "--eval-every", "0"])
    assert rc == 0
    ev = json.loads((tmp_path / "run/run.json").read_text())["eval"]
    for when in ("before", "after"):
        s = ev[when]["suite"]["general"]
        assert s["items"] == 100 and 0 <= s["score"] <= 100 and math.isfinite(s["score"])
    assert general_regression(ev)["after"] == ev["after"]["suite"]["general"]["score"]
