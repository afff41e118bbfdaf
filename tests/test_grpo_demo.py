"""The embedded GRPO task (`train --objective grpo` with no --data), the repetition_penalty reward and the cap on
held-out prompts. The run here is the CI-sized one: a step or two on the tiny model, the embedded prompts."""

import json
import math

import pytest

from lora_engine.data.embedded_grpo import HELD_OUT, SETTINGS, arithmetic_records
from lora_engine.data.formats import Record
from lora_engine.data.prepare import DataSpec, prepare_data, prompt_row
from lora_engine.train import rewards as R
from lora_engine.train.command import main
from lora_engine.train.config import TrainConfig
from lora_engine.train.grpo import LossSettings
from lora_engine.train.grpo_step import HELD_OUT_LIMIT, GRPOStep, PromptBatcher, Sampling
from tests.test_train_support import FakeTokenizer, tiny_lora_model


def test_the_embedded_task_is_built_from_the_seed_with_correct_answers_and_a_disjoint_held_out_part():
    train, held = arithmetic_records(0)
    assert len(held) == HELD_OUT and len(train) + len(held) == 18 * 18
    again, _ = arithmetic_records(0)
    other, _ = arithmetic_records(1)
    assert [r.data for r in again] == [r.data for r in train] and [r.data for r in other] != [r.data for r in train]
    questions = {r.data["prompt"][-1]["content"] for r in train}
    assert not questions & {r.data["prompt"][-1]["content"] for r in held}
    for r in train + held:
        q = r.data["prompt"][-1]["content"]  # "What is a + b?"
        a, b = q.removeprefix("What is ").removesuffix("?").split(" + ")
        assert int(r.data["answer"]) == int(a) + int(b)


def test_grpo_without_data_takes_the_task_settings_where_a_flag_is_left_at_its_default():
    cfg = TrainConfig(objective="grpo")
    assert {k: getattr(cfg, k) for k in SETTINGS} == SETTINGS
    assert TrainConfig(objective="grpo", max_steps=3, reward="exact_match").max_steps == 3
    assert TrainConfig(objective="grpo", reward="think_format").reward == "think_format"
    assert TrainConfig(objective="grpo", data="p.jsonl", reward="exact_match").max_steps == 120  # --data: unchanged
    assert TrainConfig().max_steps == 120 and TrainConfig(objective="dpo").max_completion_length == 256
    with pytest.raises(ValueError, match="--objective grpo with --data needs --reward"):
        TrainConfig(objective="grpo", data="p.jsonl")


def test_the_embedded_rows_render_as_chat_and_carry_the_answer():
    tok = FakeTokenizer()
    data = prepare_data(DataSpec(objective="grpo", seed=0), tok)
    assert len(data.train) == 18 * 18 - HELD_OUT and len(data.val) == HELD_OUT and data.files == []
    row = data.val[0]
    text = "".join(chr(i) for i in row.input_ids)
    assert text.endswith("assistant\n") and "Reply with the number only." in text and "What is" in text
    assert set(row.fields) == {"answer"}
    # greedy "The answer is 21." earns numeric_match only; "21" both: the reward the task's runs sum
    rewards = R.load_rewards(SETTINGS["reward"])
    per = R.score(rewards, [row.prompt] * 2, ["The answer is 21.", "21"], {"answer": ["21", "21"]})
    assert R.weighted_sum(per, rewards).tolist() == [1.0, 2.0]


def test_a_few_steps_of_the_embedded_task_run_and_record_the_held_out_reward(folder, tmp_path):
    rc = main(["--model", str(folder), "--out", str(tmp_path / "run"), "--objective", "grpo", "--max-steps", "2",
               "--batch-size", "2", "--num-generations", "2", "--max-completion-length", "4", "--r", "4",
               "--no-general-eval", "--no-plot"])
    assert rc == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["reward"] == SETTINGS["reward"] and run["config"]["data"] is None
    for when in ("before", "after"):
        got = run["eval"][when]["reward"]
        assert got["prompts"] == HELD_OUT and set(got["per_function"]) == {"exact_match", "numeric_match"}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["reward"]) and "rewards/exact_match/mean" in r for r in rows)


def test_repetition_penalty_is_minus_the_share_of_repeated_word_trigrams():
    comps = ["one two three four", "a b c a b c", "the the the the the", "two words", ""]
    got = R.repetition_penalty(None, comps)
    # 3-grams: 2 distinct of 2; (abc bca cab abc): 1 repeat of 4; 3 the-the-the: 2 repeats of 3; too short: 0
    assert got == [0.0, -0.25, pytest.approx(-2 / 3), 0.0, 0.0]
    assert R.repetition_penalty(None, [[{"role": "assistant", "content": "x y z x y z"}]]) == [-0.25]
    assert R.load_rewards("repetition_penalty")[0].fn is R.repetition_penalty
    # a record's field named like a keyword does not change it
    assert R.repetition_penalty(None, ["a b c a b c"], ngram=[2]) == [-0.25]


def test_the_held_out_reward_scores_at_most_the_limit_of_prompts(folder):
    tok = FakeTokenizer()
    rows = [prompt_row(Record({"prompt": f"What is {i}?", "answer": str(i)}, f"f:{i}"), tok, 64) for i in range(5)]
    step = GRPOStep(tok, R.load_rewards("exact_match"), Sampling(2, 3, 1.0), LossSettings(),
                    PromptBatcher(rows, 2, 0))
    model = tiny_lora_model(folder)
    capped = step.held_out_reward(model, rows, batch_size=2, limit=3)
    assert (capped["prompts"], capped["held_out"]) == (3, 5)
    seen = []  # which prompts were scored: evenly spaced through the held-out rows, not the first three
    step.rewards = [R.Reward("r", lambda prompts, completions, **_: seen.extend(prompts) or [0.0] * len(prompts))]
    step.held_out_reward(model, rows, batch_size=2, limit=3)
    assert seen == ["What is 0?", "What is 1?", "What is 3?"]
    assert step.held_out_reward(model, rows, batch_size=2)["prompts"] == 5 <= HELD_OUT_LIMIT
