"""Data quality: MinHash against exact Jaccard, near-duplicates at and around the threshold, every finding
kind, --dedup, `data check --val`, and the summary a training run stores in run.json."""

import json
import math

import numpy as np
import pytest
import torch

from lora_engine.data import quality as q
from lora_engine.data.check import main as check_main
from lora_engine.data.formats import Record
from lora_engine.train.config import TrainConfig
from lora_engine.train.loop import run
from tests.test_train_support import (
    FakeTokenizer,
    chat_records,
    tiny_lora_model,
    write_jsonl,
)


def recs(rows, name="d.jsonl"):
    return [Record(r, f"{name}:{i + 1}") for i, r in enumerate(rows)]


def pc(prompt, completion):
    return {"prompt": prompt, "completion": completion}


def words_text(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def pair_with_tail_changed(n: int, m: int, prefix: str = "w") -> tuple[str, str]:
    """Two texts of n distinct words that differ in their last m words: with 3-word shingles
    J = (n - 2 - m) / (n - 2 + m) exactly (n - 2 shingles each, n - 2 - m shared)."""
    a = words_text(prefix, n)
    b = a[: n - m] + words_text(prefix + "x", m)
    return " ".join(a), " ".join(b)


# ---- MinHash -------------------------------------------------------------------------------------
def test_minhash_estimate_is_within_its_error_bound_of_the_exact_jaccard():
    """J^ = (equal signature entries) / k; its standard deviation is sqrt(J (1 - J) / k) and Hoeffding gives
    P(|J^ - J| >= eps) <= 2 exp(-2 k eps^2). We allow 4 standard deviations (at k = 256, <= 0.125; the
    probability of a larger error is below 2 exp(-8) = 7e-4 even at J = 1/2), and exactness at J = 0 and 1."""
    h = q.MinHasher(256, seed=0)
    for shift in (0, 5, 20, 40, 60, 80, 100, 150, 200):
        a = {f"s{i}" for i in range(200)}
        b = {f"s{i}" for i in range(shift, 200 + shift)}
        j = q.jaccard(a, b)
        assert j == (200 - min(shift, 200)) / (200 + min(shift, 200))
        est = h.estimate(h.signature(a), h.signature(b))
        assert abs(est - j) <= 4 * math.sqrt(j * (1 - j) / 256), (shift, j, est)
        if j in (0.0, 1.0):
            assert est == j


def test_mulmod_matches_python_integers():
    rng = np.random.default_rng(1)
    a = np.append(rng.integers(1, q._P, 40, dtype=np.uint64), np.uint64(q._P - 1))
    x = np.append(rng.integers(0, 1 << 32, 40, dtype=np.uint64), np.uint64((1 << 32) - 1))
    got = q._mulmod(a[:, None], x[None, :])
    assert [[int(v) for v in row] for row in got] == [[int(ai) * int(xj) % q._P for xj in x] for ai in a]


def test_minhash_is_unbiased_across_seeds():
    """The hash family (a x + b) mod p is only approximately min-wise independent: over 40 seeds the mean
    estimate stays within 4 standard errors of J (a biased family, e.g. without the mod, drifts away)."""
    a = {f"t{i}" for i in range(60)}
    b = {f"t{i}" for i in range(20, 80)}
    j = q.jaccard(a, b)  # 40 / 80 = 0.5
    ests = [q.MinHasher(64, seed=s).estimate(q.MinHasher(64, seed=s).signature(a), q.MinHasher(64, seed=s)
                                             .signature(b)) for s in range(40)]
    assert abs(np.mean(ests) - j) <= 4 * math.sqrt(j * (1 - j) / (64 * 40))


def test_bands_keep_a_pair_at_the_threshold_found():
    for t in (0.5, 0.7, 0.8, 0.9):
        r = q.rows_per_band(t, 256)
        assert (1 - t**r) ** (256 // r) <= q.MISS
        bigger = [x for x in range(r + 1, 257) if 256 % x == 0]
        assert not bigger or (1 - t ** bigger[0]) ** (256 // bigger[0]) > q.MISS  # r is the largest such


def test_shingles_ignore_case_punctuation_and_spacing():
    assert q.shingles("Hello,  World! how are") == q.shingles("hello world how ARE")
    assert q.shingles("one two") == {"one two"}
    assert q.shingles("  ?! ") == set()
    with pytest.raises(ValueError, match="empty"):
        q.MinHasher().signature(set())


def test_near_duplicates_at_and_around_the_threshold():
    """n = 92 words, the last m changed: J = (90 - m) / (90 + m), exactly 0.8 at m = 10 (reported: J >= 0.8)."""
    for m in range(4, 17):
        a, b = pair_with_tail_changed(92, m)
        exact = q.jaccard(q.shingles(a), q.shingles(b))
        assert exact == pytest.approx((90 - m) / (90 + m), abs=1e-15)
        rep = q.analyse(recs([{"text": a}, {"text": b}]))
        near = [f for f in rep.findings if f.kind == "near_duplicate"]
        assert bool(near) == (m <= 10), (m, exact)
        if near:
            assert near[0].where == ["d.jsonl:1", "d.jsonl:2"]
            assert near[0].detail == f"Jaccard {exact:.2f} of 3-word shingles"


def test_every_pair_exactly_at_the_threshold_is_found():
    """30 different vocabularies, each pair at J = 0.8 exactly: LSH misses one with probability < 1e-6."""
    texts = [t for k in range(30) for t in pair_with_tail_changed(92, 10, prefix=f"v{k}_")]
    pairs = q.near_pairs([q.shingles(t) for t in texts], 0.8)
    assert [(i, j) for i, j, _ in pairs] == [(2 * k, 2 * k + 1) for k in range(30)]
    assert all(x == pytest.approx(0.8) for _, _, x in pairs)


def test_threshold_is_checked():
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\], got 1.5"):
        q.near_pairs([{"a"}, {"a"}], 1.5)


# ---- findings ------------------------------------------------------------------------------------
def kinds(rep):
    return {k: [f for f in rep.findings if f.kind == k] for k in q.KINDS}


def test_each_finding_kind():
    filler = [pc(f"Question number {i} about topic {i}?", f"An answer of ordinary length, number {i}, here.")
              for i in range(12)]
    long_answer = " ".join(words_text("long", 3000))
    rows = filler + [
        pc("What is the capital of France?", "Paris is the capital of France."),   # 13
        pc("What is the capital of France?", "Paris is the capital of France."),   # 14: exact copy of 13
        pc("what is the CAPITAL of france", "It is Lyon, I believe."),            # 15: conflicts with 13
        pc("Say nothing.", ""),                                                    # 16: empty
        pc("Agree?", "Yes."),                                                      # 17: 1 word
        pc("Tell me everything.", long_answer),                                    # 18: length outlier
    ]
    rep = q.analyse(recs(rows), val_records=recs([pc("Question number 3 about topic 3?",
                                                      "An answer of ordinary length, number 3, here.")], "v.jsonl"))
    k = kinds(rep)
    assert [f.where for f in k["exact_duplicate"]] == [["d.jsonl:13", "d.jsonl:14"]]
    assert [f.where for f in k["train_val_overlap"]] == [["d.jsonl:4", "v.jsonl:1"]]
    assert [f.where for f in k["conflicting_responses"]] == [["d.jsonl:13", "d.jsonl:15"]]
    assert k["conflicting_responses"][0].detail.startswith("2 different responses to 'what is the capital of")
    assert [(f.where, f.detail) for f in k["short_response"]] == [(["d.jsonl:16"], "empty response"),
                                                                  (["d.jsonl:17"], "1 word(s): 'Yes.'")]
    assert [f.where for f in k["length_outlier"]] == [["d.jsonl:18"]]
    assert k["near_duplicate"] == [] and k["role_sequence"] == []
    s = rep.summary()
    assert s == {"records": 19, "exact_duplicate": 1, "near_duplicate": 0, "train_val_overlap": 1,
                 "short_response": 2, "conflicting_responses": 1, "length_outlier": 1, "role_sequence": 0}
    text = "\n".join(rep.lines())
    assert "exact duplicate: 1\n  d.jsonl:13, d.jsonl:14: 2 identical records" in text


def test_near_duplicate_between_train_and_validation():
    a, b = pair_with_tail_changed(40, 2)
    rep = q.analyse(recs([{"text": a}]), val_records=recs([{"text": b}], "v.jsonl"))
    overlap = kinds(rep)["train_val_overlap"]
    assert [f.where for f in overlap] == [["d.jsonl:1", "v.jsonl:1"]] and "Jaccard 0.90" in overlap[0].detail


def chat(*roles):
    return {"messages": [{"role": r, "content": f"turn {i} by {r}"} for i, r in enumerate(roles)]}


@pytest.mark.parametrize("roles, problem", [
    (("user", "user", "assistant"), "messages[1]: two user messages in a row"),
    (("assistant", "user", "assistant"), "messages[0]: the assistant speaks first"),
    (("system", "assistant"), "messages[1]: the assistant speaks first"),
    (("user", "assistant", "system", "user", "assistant"), "messages[2]: a system message after the first message"),
    (("user", "assistant", "user"), "ends with a user message, which nothing answers"),
    (("user", "robot", "assistant"), "messages[1]: unknown role 'robot' (known: system, user, assistant, tool)"),
    (("user", "tool", "assistant"), "messages[1]: a tool message that does not follow an assistant message"),
])
def test_malformed_role_sequences(roles, problem):
    rep = q.analyse(recs([chat(*roles)]))
    assert [f.detail for f in kinds(rep)["role_sequence"]] == [problem]


def test_well_formed_chats_have_no_role_finding():
    for roles in (("user", "assistant"), ("system", "user", "assistant", "tool", "assistant", "user", "assistant")):
        assert kinds(q.analyse(recs([chat(*roles)])))["role_sequence"] == []
    assert q.role_problems([{"content": "x"}]) == ["messages[0] has no role"]
    assert q.role_problems([]) == ["'messages' is not a non-empty list"]


# ---- dedup ---------------------------------------------------------------------------------------
def test_dedup_drops_exact_near_and_validation_duplicates_in_order():
    a, a_near = pair_with_tail_changed(40, 2)
    v, v_near = pair_with_tail_changed(40, 2, prefix="val")
    rows = [{"text": a}, {"text": "something else entirely"}, {"text": a}, {"text": a_near}, {"text": v_near},
            {"text": "one more, unrelated"}]
    val = recs([{"text": v}], "v.jsonl")
    kept, counts = q.dedup(recs(rows), against=val)
    assert [r.where for r in kept] == ["d.jsonl:1", "d.jsonl:2", "d.jsonl:6"]
    assert counts == {"exact": 1, "near": 1, "val_overlap": 1}
    kept2, counts2 = q.dedup(recs(rows))
    assert [r.where for r in kept2] == ["d.jsonl:1", "d.jsonl:2", "d.jsonl:5", "d.jsonl:6"]
    assert counts2 == {"exact": 1, "near": 1, "val_overlap": 0}
    assert q.analyse(kept).summary()["near_duplicate"] == q.analyse(kept).summary()["exact_duplicate"] == 0


# ---- the command line ----------------------------------------------------------------------------
def test_check_command_reports_quality_and_validation_overlap(folder, tmp_path, capsys):
    a, b = pair_with_tail_changed(30, 1)
    train = write_jsonl(tmp_path / "t.jsonl", [pc("Q one?", a), pc("Q one?", a), pc("Q two?", "Sure.")])
    val = write_jsonl(tmp_path / "v.jsonl", [pc("Q one?", b)])
    check_main(["check", str(train), "--model", str(folder), "--val", str(val), "--max-length", "400"])
    out = capsys.readouterr().out
    assert "data quality (3 records and 1 validation records; near-duplicates: Jaccard >= 0.8" in out
    assert f"exact duplicate: 1\n    {train}:1, {train}:2: 2 identical records" in out
    assert f"train val overlap: 1\n    {train}:1, {val}:1: Jaccard {29 / 31:.2f}" in out  # q one w0..w29: 30 shingles
    assert f"short response: 1\n    {train}:3: 1 word(s): 'Sure.'" in out


def test_check_command_rejects_a_bad_threshold(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        check_main(["check", str(tmp_path / "x.jsonl"), "--near-threshold", "0"])
    assert e.value.code == 2 and "--near-threshold must be in (0, 1], got 0.0" in capsys.readouterr().err


# ---- training: the summary in run.json, --dedup --------------------------------------------------
def test_train_stores_the_summary_and_dedup_drops_duplicates(folder, tmp_path):
    rows = chat_records(20)
    data = write_jsonl(tmp_path / "dup.jsonl", rows + rows)  # every record twice
    tok = FakeTokenizer()
    cfg = dict(model="unused", data=str(data), max_steps=1, batch_size=4, r=4, max_length=96, save_every=0,
               general_eval=False, eval_batch_size=8, plot=False, val_split=0.2)
    manifests = {}
    for dedup in (False, True):
        torch.manual_seed(0)
        out = tmp_path / f"run-{dedup}"
        manifests[dedup] = run(TrainConfig(**cfg, out=str(out), dedup=dedup), tokenizer=tok,
                               model=tiny_lora_model(folder), log=lambda *a: None)
        assert json.loads((out / "run.json").read_text())["data"] == manifests[dedup]["data"]
    plain, deduped = manifests[False]["data"], manifests[True]["data"]
    assert "dedup" not in plain and plain["records"] == 40
    # 40 records, 8 held out: the held-out copies' twins are mostly in the training part
    assert plain["quality"]["train_val_overlap"] > 0 and plain["quality"]["exact_duplicate"] > 0
    assert plain["quality"]["records"] == 40
    assert deduped["dedup"] == {"exact": 20, "near": 0, "val_overlap": 0} and deduped["records"] == 20
    assert deduped["quality"]["train_val_overlap"] == deduped["quality"]["exact_duplicate"] == 0
    assert deduped["quality"]["records"] == 20
