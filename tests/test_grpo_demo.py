"""The embedded GRPO task (`train --objective grpo` with no --data), the repetition_penalty reward and the cap on
held-out prompts. The run here is the CI-sized one: a step or two on the tiny model, the embedded prompts."""

import dataclasses
import json
import math

import pytest

from lora_engine.cli import parse
from lora_engine.data.embedded_grpo import HELD_OUT, SETTINGS, comparison_records
from lora_engine.data.formats import Record
from lora_engine.data.prepare import DataSpec, prepare_data, prompt_row
from lora_engine.train import rewards as R
from lora_engine.train.command import main
from lora_engine.train.config import TrainConfig
from lora_engine.train.grpo import LossSettings
from lora_engine.train.grpo_step import HELD_OUT_LIMIT, GRPOStep, PromptBatcher, Sampling
from tests.test_train_support import FakeTokenizer, tiny_lora_model


def test_the_embedded_task_is_built_from_the_seed_with_correct_answers_and_a_disjoint_held_out_part():
    train, held = comparison_records(0)
    assert len(held) == HELD_OUT and len(train) + len(held) == 18 * 17
    again, _ = comparison_records(0)
    other, _ = comparison_records(1)
    assert [r.data for r in again] == [r.data for r in train] and [r.data for r in other] != [r.data for r in train]
    questions = {r.data["prompt"][-1]["content"] for r in train}
    assert len(questions) == len(train) and not questions & {r.data["prompt"][-1]["content"] for r in held}
    for r in train + held:
        q = r.data["prompt"][-1]["content"]  # "Which is larger, a or b?"
        a, b = q.removeprefix("Which is larger, ").removesuffix("?").split(" or ")
        assert a != b and r.data["answer"] == str(max(int(a), int(b))) and r.data["pattern"] == rf"({a}|{b})\.?"


def test_grpo_without_data_takes_the_task_settings_where_a_flag_is_left_at_its_default():
    cfg = TrainConfig(objective="grpo")
    assert {k: getattr(cfg, k) for k in SETTINGS} == SETTINGS
    assert TrainConfig(objective="grpo", max_steps=3, reward="exact_match").max_steps == 3
    assert TrainConfig(objective="grpo", reward="think_format").reward == "think_format"
    assert TrainConfig(objective="grpo", data="p.jsonl", reward="exact_match").max_steps == 120  # --data: unchanged
    assert TrainConfig().max_steps == 120 and TrainConfig(objective="dpo").max_completion_length == 256
    with pytest.raises(ValueError, match="--objective grpo with --data needs --reward"):
        TrainConfig(objective="grpo", data="p.jsonl")


def test_a_flag_given_with_its_default_value_is_not_replaced_by_the_task_setting(tmp_path):
    # --lr and --max-steps given on the command line, --num-generations in a --config file, each exactly its default
    defaults = TrainConfig(objective="sft")
    toml = tmp_path / "c.toml"
    toml.write_text(f"num_generations = {defaults.num_generations}\n")
    cfg, explicit = parse(TrainConfig, ["--objective", "grpo", "--lr", str(defaults.lr), "--max-steps",
                                        str(defaults.max_steps), "--config", str(toml)])
    assert (cfg.lr, cfg.max_steps, cfg.num_generations) == (defaults.lr, defaults.max_steps, defaults.num_generations)
    assert cfg.lr != SETTINGS["lr"] and cfg.max_steps != SETTINGS["max_steps"]
    assert "num_generations" not in explicit  # (the file's names are not the command line's)
    assert cfg.max_completion_length == SETTINGS["max_completion_length"]  # not given: the task's
    # a copy (setup names --out with dataclasses.replace) keeps every value, the given defaults included
    again = dataclasses.replace(cfg, out=str(tmp_path / "run"))
    assert (again.lr, again.max_steps, again.reward) == (cfg.lr, cfg.max_steps, cfg.reward)
    # nothing given: every task setting applies, from the command line as in code
    assert {k: getattr(parse(TrainConfig, ["--objective", "grpo"])[0], k) for k in SETTINGS} == SETTINGS


def test_the_embedded_rows_render_as_chat_and_carry_the_answer():
    tok = FakeTokenizer()
    data = prepare_data(DataSpec(objective="grpo", seed=0), tok)
    assert len(data.train) == 18 * 17 - HELD_OUT and len(data.val) == HELD_OUT and data.files == []
    row = data.val[0]
    text = "".join(chr(i) for i in row.input_ids)
    assert text.endswith("assistant\n") and "Reply with the number only." in text and "Which is larger, " in text
    assert set(row.fields) == {"answer", "pattern"}
    # "The answer is 12." earns numeric_match only, "7" regex_match only (a number alone, the wrong one), "12"
    rewards = R.load_rewards(SETTINGS["reward"])
    # both, "12 is larger than 7." (the greedy model's form: its last number is the smaller) neither, and a run of
    # digits neither (the pattern takes one of the two numbers: `\d+` was hacked by eight-digit answers)
    comps = ["The answer is 12.", "7", "12", "12 is larger than 7.", "1212"]
    per = R.score(rewards, [row.prompt] * 5, comps, {"answer": ["12"] * 5, "pattern": [r"(7|12)\.?"] * 5})
    assert R.weighted_sum(per, rewards).tolist() == [1.0, 1.0, 2.0, 0.0, 0.0]


def test_regex_match_takes_the_records_pattern_and_names_a_missing_or_broken_one():
    got = R.regex_match(None, ["42", " 42 ", "42.", "<think>x</think> 7", "a"], pattern=[r"\d+"] * 4 + [None])
    assert got == [1.0, 1.0, 0.0, 1.0, None]  # stripped; the whole answer; after </think>; no pattern: None
    rewards = R.load_rewards("regex_match")
    with pytest.raises(R.RewardError, match='--reward regex_match .* needs a "pattern" field'):
        R.score(rewards, ["q"], ["42"], {"answer": ["42"]})
    with pytest.raises(R.RewardError, match=r"--reward regex_match .*pattern '\(' is not a regular expression"):
        R.score(rewards, ["q"], ["42"], {"pattern": ["("]})


def test_a_few_steps_of_the_embedded_task_run_and_record_the_held_out_reward(folder, tmp_path):
    rc = main(["--model", str(folder), "--out", str(tmp_path / "run"), "--objective", "grpo", "--max-steps", "2",
               "--batch-size", "2", "--num-generations", "2", "--max-completion-length", "4", "--r", "4",
               "--no-general-eval", "--no-plot"])
    assert rc == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["config"]["reward"] == SETTINGS["reward"] and run["config"]["data"] is None
    for when in ("before", "after"):
        got = run["eval"][when]["reward"]
        assert got["prompts"] == HELD_OUT and set(got["per_function"]) == {"regex_match", "numeric_match"}
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["reward"]) and "rewards/regex_match/mean" in r for r in rows)


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
