"""`train --objective dpo`: preference records read and checked, a real DPO run on the tiny model (loss from
ln 2 down, held-out reward accuracy up, metrics and run.json), the embedded default pairs, and the errors."""

import io
import json
import math

import pytest

from lora_engine.data import preference
from lora_engine.data.check import check
from lora_engine.data.formats import DataError, Record
from lora_engine.train.command import main
from lora_engine.train.config import TrainConfig
from tests.test_train_support import FakeTokenizer, write_jsonl


def pref_records(n: int, chat: bool = True) -> list[dict]:
    """Prompts answered right (chosen) or with a refusal (rejected): a preference a small model learns fast."""
    out = []
    for i in range(n):
        q = f"What is {i} plus {i}?"
        out.append({"prompt": [{"role": "user", "content": q}] if chat else q,
                    "chosen": f"It is {2 * i}.", "rejected": "No idea, sorry." + " Ask me later." * (i % 3)})
    return out


def _rec(d, where="f.jsonl:1"):
    return Record(d, where)


def test_pair_labels_cover_the_response_only():
    tok = FakeTokenizer()
    for chat in (True, False):
        p = preference.pair_from_record(_rec(pref_records(3, chat)[2]), tok)
        for side, text in ((p.chosen, "It is 4."), (p.rejected, "No idea, sorry. Ask me later. Ask me later.")):
            trained = tok.decode([t for t, lab in zip(side.input_ids, side.labels) if lab != -100])
            # chat: the assistant content and its <|im_end|>\n, as SFT trains it; text: the completion + EOS
            assert trained == (text + "<|im_end|>\n" if chat else text + "<|im_end|>")
        n_prompt = next(i for i, lab in enumerate(p.chosen.labels) if lab != -100)
        assert p.chosen.input_ids[:n_prompt] == p.rejected.input_ids[:n_prompt]  # the shared prompt


def test_a_multi_turn_prompt_trains_only_the_final_response():
    tok = FakeTokenizer()
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Sum 1+1?"}]
    p = preference.pair_from_record(_rec({"prompt": msgs, "chosen": [{"role": "assistant", "content": "2"}],
                                          "rejected": "3"}), tok)
    assert tok.decode([t for t, lab in zip(p.chosen.input_ids, p.chosen.labels) if lab != -100]) == "2<|im_end|>\n"
    assert tok.decode([t for t, lab in zip(p.rejected.input_ids, p.rejected.labels) if lab != -100]) == "3<|im_end|>\n"


@pytest.mark.parametrize("record, match", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, r"f\.jsonl:1: 'chosen' and 'rejected' are identical"),
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, r"f\.jsonl:1: 'chosen' is empty"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": ""}]},
     r"f\.jsonl:1: rejected\[0\]\.content is empty; a preference pair needs a prompt and two non-empty responses"),
    ({"prompt": [{"role": "user", "content": None}], "chosen": "a", "rejected": "b"},
     r"f\.jsonl:1: prompt\[0\]\.content is empty; a preference pair needs"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"},
     r"f\.jsonl:1: 'prompt' must be a string or a non-empty list of \{role, content\} messages, got int"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a non-empty list .* got list"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, "'prompt' must be .* got nothing"),
    ({"prompt": [1], "chosen": "a", "rejected": "b"}, r"f\.jsonl:1: prompt\[0\] must have 'role' and 'content', got 1"),
    ({"prompt": [{"role": 5, "content": "q"}], "chosen": "a", "rejected": "b"},
     r"f\.jsonl:1: prompt\[0\]\.role must be a string such as 'user' or 'assistant', got int"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": 7}], "rejected": "b"},
     r"f\.jsonl:1: chosen\[0\]\.content must be a string, got int"),
    ({"prompt": "q", "chosen": "a", "rejected": [{"role": "assistant", "content": ["a"]}]},
     r"rejected\[0\]\.content must be a string, got list"),
    ({"prompt": "q", "chosen": "a", "rejected": ["x"]}, r"rejected\[0\] must have 'role' and 'content', got 'x'"),
    ({"prompt": "q", "chosen": "a", "rejected": []}, "'rejected' must be a non-empty list of"),
    ({"prompt": "q", "chosen": {"text": "a"}, "rejected": "b"}, "'chosen' must be a non-empty string or a list .* got dict"),
    ({"prompt": "q", "chosen": None, "rejected": "b"}, "'chosen' must be .* got nothing"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, r"f\.jsonl:1: 'prompt' is empty"),
    ({"prompt": "q", "chosen": "a"}, r"missing \['rejected'\]"),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "'chosen' must be a non-empty string or a list"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "plain-text prompt"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "must end with an assistant message"),
])
def test_bad_preference_records_are_errors_naming_the_record(record, match):
    with pytest.raises(DataError, match=match):
        preference.pair_from_record(_rec(record), FakeTokenizer())


def test_a_bad_record_in_a_file_is_named_by_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", pref_records(2) + [{"prompt": "q", "chosen": [{"role": "assistant",
                                                                                             "content": 3}],
                                                                 "rejected": "b"}])
    from lora_engine.data.formats import read_records

    with pytest.raises(DataError, match=rf"^{path}:3: chosen\[0\]\.content must be a string, got int$"):
        preference.pairs_from_records(read_records(path), FakeTokenizer())


def test_truncation_that_leaves_no_response_token_drops_the_pair_with_a_warning():
    tok = FakeTokenizer()
    recs = [_rec(r, f"f.jsonl:{i + 1}") for i, r in enumerate(pref_records(3, chat=False))]
    recs.append(_rec({"prompt": "x" * 80, "chosen": "a", "rejected": "b"}, "f.jsonl:4"))
    pairs = preference.pairs_from_records(recs, tok)
    warned = []
    stats = {}
    rows = preference.prepare_pairs(pairs, 40, stats, warned.append)
    assert len(rows) == 3 and stats["dropped_no_targets"] == 1
    assert len(warned) == 1 and "f.jsonl:4" in warned[0] and "--max-length 40" in warned[0]
    with pytest.raises(DataError, match="no preference pair keeps a response token within --max-length 10"):
        preference.prepare_pairs(pairs, 10, {}, warned.append)


def test_data_check_reports_every_problem_of_a_preference_file(tmp_path):
    recs = pref_records(4) + [{"prompt": "q", "chosen": "s", "rejected": "s"}, {"prompt": "q", "chosen": "",
                                                                              "rejected": "b"}]
    path = write_jsonl(tmp_path / "p.jsonl", recs)
    out = io.StringIO()
    res = check(path, FakeTokenizer(), max_length=30, file=out)
    text = out.getvalue()
    assert res["pairs"] == 4 and len(res["problems"]) == 2
    assert f"{path}:5: 'chosen' and 'rejected' are identical" in text and f"{path}:6: 'chosen' is empty" in text
    assert "pairs would be dropped" in text


def test_config_refuses_what_dpo_cannot_do():
    with pytest.raises(ValueError, match="--dpo-beta must be > 0, got 0"):
        TrainConfig(objective="dpo", dpo_beta=0)
    with pytest.raises(ValueError, match="drop --pack"):
        TrainConfig(objective="dpo", pack=True)
    with pytest.raises(ValueError, match="drop --modules-to-save"):
        TrainConfig(objective="dpo", modules_to_save="lm_head")
    with pytest.raises(ValueError, match="second, frozen copy"):
        TrainConfig(objective="dpo", finetune="full")
    TrainConfig(objective="dpo", dpo_loss="simpo", finetune="full")  # SimPO has no reference to keep
    TrainConfig(objective="dpo", dpo_loss="simpo", modules_to_save="lm_head")
    TrainConfig(objective="dpo", dpo_loss="orpo", finetune="full")


def _run(folder, out, *flags):
    rc = main(["--model", str(folder), "--out", str(out), "--batch-size", "4", "--r", "4", "--max-length", "64",
               "--no-general-eval", "--no-plot", "--objective", "dpo", "--warmup-steps", "0", *flags])
    assert rc == 0
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], \
        json.loads((out / "run.json").read_text())


def test_a_short_dpo_run_learns_the_preference(folder, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pref_records(32))
    val = write_jsonl(tmp_path / "val.jsonl", pref_records(40)[32:])
    rows, manifest = _run(folder, tmp_path / "run", "--data", str(data), "--val-data", str(val), "--max-steps", "8",
                          "--lr", "1e-2", "--eval-every", "4")
    assert len(rows) == 8 and all({"loss", "reward_margin", "reward_accuracy"} <= set(r) for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: the policy is the reference
    assert rows[0]["reward_margin"] == 0.0 and rows[0]["reward_accuracy"] == 0.0
    assert rows[-1]["loss"] < math.log(2) - 0.05 and rows[-1]["reward_accuracy"] > 0.5
    assert "val_reward_accuracy" in rows[3]
    ev = manifest["eval"]
    before, after = ev["before"]["preference"], ev["after"]["preference"]
    assert before["pairs"] == after["pairs"] == 8
    assert before["loss"] == pytest.approx(math.log(2), abs=1e-6) and before["reward_accuracy"] == 0.0
    assert after["reward_accuracy"] > 0.5 and after["loss"] < math.log(2)
    assert "target" in ev["after"]  # the loss on the chosen responses, before and after
    assert manifest["config"]["objective"] == "dpo" and manifest["config"]["dpo_beta"] == 0.1
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_an_ipo_run_starts_at_its_own_first_loss_and_learns_the_preference(folder, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pref_records(32))
    val = write_jsonl(tmp_path / "val.jsonl", pref_records(40)[32:])
    rows, manifest = _run(folder, tmp_path / "run", "--data", str(data), "--val-data", str(val), "--max-steps", "8",
                          "--lr", "1e-2", "--dpo-loss", "ipo", "--dpo-beta", "0.5")
    assert rows[0]["loss"] == pytest.approx(1 / (4 * 0.5**2), abs=1e-6)  # B = 0: (0 - 1 / (2 beta))**2
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["reward_accuracy"] > 0.5
    before, after = manifest["eval"]["before"]["preference"], manifest["eval"]["after"]["preference"]
    assert before["loss"] == pytest.approx(1.0, abs=1e-6) and after["loss"] < before["loss"]
    assert manifest["config"]["dpo_loss"] == "ipo"


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_a_reference_free_run_needs_no_reference_pass_and_learns_the_preference(folder, tmp_path, monkeypatch, loss):
    from lora_engine.train import dpo

    def no_reference(model):
        raise AssertionError(f"{loss} switched the adapter off for a reference pass")

    monkeypatch.setattr(dpo, "adapters_disabled", no_reference)
    data = write_jsonl(tmp_path / "train.jsonl", pref_records(32))
    val = write_jsonl(tmp_path / "val.jsonl", pref_records(40)[32:])
    rows, manifest = _run(folder, tmp_path / "run", "--data", str(data), "--val-data", str(val), "--max-steps", "8",
                          "--lr", "1e-2", "--dpo-loss", loss, "--dpo-beta", "2", "--simpo-gamma", "0.3")
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["reward_accuracy"] > 0.5
    before, after = manifest["eval"]["before"]["preference"], manifest["eval"]["after"]["preference"]
    assert after["loss"] < before["loss"] and after["reward_margin"] > before["reward_margin"]
    assert manifest["config"]["dpo_loss"] == loss and manifest["config"]["simpo_gamma"] == 0.3


def test_dpo_reads_plain_text_preferences_and_splits_off_validation(folder, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pref_records(20, chat=False))
    rows, manifest = _run(folder, tmp_path / "run", "--data", str(data), "--max-steps", "2", "--val-split", "0.2")
    assert len(rows) == 2 and manifest["eval"]["before"]["preference"]["pairs"] == 4
    assert manifest["data"]["formats"] == {"preference (text)": 20}


def test_a_bad_preference_file_stops_the_run_before_training(folder, tmp_path, capsys):
    data = write_jsonl(tmp_path / "bad.jsonl", pref_records(3) + [{"prompt": "q", "chosen": " ", "rejected": "s"}])
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(tmp_path / "run"), "--objective", "dpo"])
    assert rc == 2
    assert f"{data}:4: 'chosen' is empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_embedded_pairs_take_the_rejected_answer_from_another_conversation():
    from lora_engine.data.embedded import chatterbot_preference_split, chatterbot_split

    train, held = chatterbot_preference_split()
    chats_train, chats_held = chatterbot_split()
    assert len(train) == len(chats_train) and len(held) == len(chats_held)
    for recs in (train, held):
        assert all(r.data["chosen"] != r.data["rejected"] for r in recs)
        assert all(r.data["prompt"][-1]["role"] == "user" for r in recs)
    held_answers = {r.data["chosen"] for r in held}
    assert {r.data["rejected"] for r in held} <= held_answers  # held-out pairs draw from the held-out part only
    first = chats_train[0].data["messages"]
    assert train[0].data["prompt"] == first[:-1] and train[0].data["chosen"] == first[-1]["content"]


def test_dpo_without_data_trains_on_the_embedded_pairs(folder, tmp_path):
    rows, manifest = _run(folder, tmp_path / "run", "--max-steps", "2", "--eval-batch-size", "32", "--max-length", "128")
    assert len(rows) == 2 and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert manifest["data"]["rows"] > 1000
    assert {"before", "after"} <= set(manifest["eval"])
    assert manifest["eval"]["after"]["preference"]["pairs"] >= 35  # of the 42 held-out conversations


def test_an_interrupted_dpo_run_resumes_to_the_same_losses(folder, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", pref_records(24))
    flags = ("--data", str(data), "--max-steps", "4", "--lr", "1e-2", "--eval-every", "0")
    whole, _ = _run(folder, tmp_path / "whole", *flags)
    _run(folder, tmp_path / "cut", *flags, "--stop-after", "2")
    rows, manifest = _run(folder, tmp_path / "cut", "--resume", str(tmp_path / "cut"))
    assert manifest["status"] == "completed"
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in whole], rel=1e-6)
    assert [r["reward_accuracy"] for r in rows] == [r["reward_accuracy"] for r in whole]
