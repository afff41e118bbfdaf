"""`train --objective grpo`: rewards (built-ins, the user's, their errors), prompt rows, the step (a constant reward
moves nothing, sampling repeats from the seed) and short runs on the tiny model writing TRL's metric names."""

import json
import math

import pytest
import torch

from lora_engine.data.formats import DataError, Record
from lora_engine.data.prepare import prompt_row
from lora_engine.train import rewards as R
from lora_engine.train.command import main
from lora_engine.train.config import TrainConfig
from lora_engine.train.grpo import LossSettings
from lora_engine.train.grpo_step import GRPOStep, PromptBatcher, Sampling
from tests.test_train_support import FakeTokenizer, tiny_lora_model, write_jsonl


def prompt_records(n: int, chat: bool = False) -> list[dict]:
    out = []
    for i in range(n):
        q = f"What is {i} plus {i}?"
        out.append({"prompt": [{"role": "user", "content": q}] if chat else q, "answer": str(2 * i)})
    return out


def test_builtin_rewards():
    comps = ["<think>2 and 2</think> 4", "4", "the answer is 5", "<think></think>4"]
    ans = ["4"] * 4
    assert R.exact_match(None, comps, ans) == [1.0, 1.0, 0.0, 1.0]  # the answer is what follows </think>
    assert R.numeric_match(None, comps, ans) == [1.0, 1.0, 0.0, 1.0]
    assert R.numeric_match(None, ["1,000.0 apples"], ["1000"]) == [1.0]
    assert R.think_format(None, comps) == [1.0, 0.0, 0.0, 0.0]
    assert R.length_penalty(None, ["ab", ""]) == [-0.002, 0.0]
    chat = [[{"role": "assistant", "content": "4"}]]
    assert R.exact_match(None, chat, ["4"]) == [1.0]


def test_rewards_sum_nan_aware_and_a_row_no_function_scored_is_nan():
    rw = [R.Reward("a", lambda prompts, completions, **_: [1.0, None, None], 2.0),
          R.Reward("b", lambda prompts, completions, **_: [0.5, 0.25, None], 1.0)]
    per = R.score(rw, ["p"] * 3, ["c"] * 3, {})
    total = R.weighted_sum(per, rw)
    assert total[:2].tolist() == [2.5, 0.25] and math.isnan(total[2])


def _boom(prompts, completions, **_):
    raise KeyError("answer")


@pytest.mark.parametrize("fn, match", [
    (_boom, r"--reward f on the prompts from 'What is 0' \(2 completions\): raised KeyError"),
    (lambda prompts, completions, **_: [1.0], r"--reward f .*: returned 1 values for 2 completions"),
    (lambda prompts, completions, **_: 3.0, r"returned a float for 2 completions"),
    (lambda prompts, completions, **_: [1.0, "x"], r"--reward f on the prompt 'What is 1': returned 'x' for "
                                                   r"completion 1"),
    (lambda prompts, completions, **_: [1.0, math.inf], r"returned inf for completion 1"),
])
def test_a_bad_reward_is_one_error_naming_the_function_and_the_prompt(fn, match):
    with pytest.raises(R.RewardError, match=match):
        R.score([R.Reward("f", fn)], ["What is 0", "What is 1"], ["a", "b"], {})


@pytest.mark.parametrize("specs, weights, match", [
    ("nope", None, r"--reward 'nope': not a built-in \(exact_match"),
    ("no_such_module_x:f", None, "cannot import module 'no_such_module_x'"),
    ("math:no_such", None, "module 'math' has no 'no_such'"),
    ("math:pi", None, "'pi' is a float, not a function"),
    ("exact_match,think_format", "1", r"1 finite weights for 2 rewards"),
    ("exact_match", "x", "not comma-separated numbers"),
    (" , ", None, "needs --reward"),
])
def test_bad_reward_flags(specs, weights, match):
    with pytest.raises(R.RewardError, match=match):
        R.load_rewards(specs, weights)


def test_prompt_rows_render_text_and_chat_and_keep_the_other_fields():
    tok = FakeTokenizer()
    row = prompt_row(Record(prompt_records(2)[1], "f:2"), tok, 64)
    assert tok.decode(row.input_ids) == "What is 1 plus 1?" and row.fields == {"answer": "2"}
    chat = prompt_row(Record(prompt_records(1, chat=True)[0], "f:1"), tok, 8, stats := {})
    assert len(chat.input_ids) == 8 and stats == {"truncated": 1}
    assert tok.decode(chat.input_ids).endswith("sistant\n")  # the assistant's turn is open: the model goes on
    for bad in ({"prompt": ""}, {"answer": 1}, {"prompt": [{"role": "user"}]}):
        with pytest.raises(DataError, match="f:3: 'prompt' must be non-empty text or a list"):
            prompt_row(Record(bad, "f:3"), tok, 8)


def test_config_refuses_what_grpo_cannot_do():
    with pytest.raises(ValueError, match="--objective grpo with --data needs --reward"):
        TrainConfig(objective="grpo", data="prompts.jsonl")
    with pytest.raises(ValueError, match="grpo samples completions for each prompt: drop --pack"):
        TrainConfig(objective="grpo", reward="exact_match", pack=True)
    with pytest.raises(ValueError, match="second, frozen copy"):
        TrainConfig(objective="grpo", reward="exact_match", finetune="full", beta=0.04)
    with pytest.raises(ValueError, match="drop --modules-to-save or use --beta 0"):
        TrainConfig(objective="grpo", reward="exact_match", modules_to_save="lm_head", beta=0.04)
    with pytest.raises(ValueError, match="--num-generations must be >= 2"):
        TrainConfig(objective="grpo", reward="exact_match", num_generations=1)
    with pytest.raises(ValueError, match=r"--temperature must be > 0"):
        TrainConfig(objective="grpo", reward="exact_match", temperature=0)
    TrainConfig(objective="grpo", reward="exact_match", finetune="full")  # beta 0: no reference needed


def _stepper(folder, reward, seed=0, G=4, mu=1, beta=0.0):
    tok = FakeTokenizer()
    rows = [prompt_row(Record(r, f"f:{i}"), tok, 64) for i, r in enumerate(prompt_records(6))]
    batcher = PromptBatcher(rows, 2, seed, per_step=1, num_iterations=mu)
    step = GRPOStep(tok, [R.Reward("r", reward)], Sampling(G, 6, 1.0), LossSettings(beta=beta), batcher, mu)
    return batcher, step


def test_a_constant_reward_gives_zero_advantages_and_moves_no_weight(folder):
    from lora_engine.train.step import make_optimizer, make_scheduler

    model = tiny_lora_model(folder)
    batcher, step = _stepper(folder, lambda prompts, completions, **_: [1.0] * len(completions))
    opt = make_optimizer(model, 1e-2)
    sched = make_scheduler(opt, 0, 10)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    res = step(model, opt, sched, [batcher.next()])
    assert all(float(ro.advantages.abs().max()) == 0 for ro in step._rollouts)
    assert res.extra["frac_reward_zero_std"] == 1.0 and res.extra["reward_std"] == 0.0
    assert res.loss == 0.0 and res.grad_norm == 0.0
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n


def test_a_varying_reward_moves_the_adapter(folder):
    from lora_engine.train.step import make_optimizer, make_scheduler

    model = tiny_lora_model(folder)
    batcher, step = _stepper(folder, lambda prompts, completions, **_: [float(len(c)) for c in completions])
    opt = make_optimizer(model, 1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    res = step(model, opt, make_scheduler(opt, 0, 10), [batcher.next()])
    assert res.grad_norm > 0 and res.extra["reward_std"] > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_sampling_repeats_from_the_seed_and_the_batcher_state(folder):
    model = tiny_lora_model(folder)
    lengths = lambda prompts, completions, **_: [float(len(c)) for c in completions]  # noqa: E731

    def draw(seed, state=None):
        batcher, step = _stepper(folder, lengths, seed)
        if state is not None:
            batcher.load_state_dict(state)
        ro, _ = step.draw(model, [batcher.next()], None)
        return ro[0].input_ids.tolist(), batcher.state_dict()

    a, state_a = draw(0)
    b, _ = draw(0)
    c, _ = draw(1)
    assert a == b and a != c
    again, _ = draw(0, state_a)  # resumed from a checkpoint's batcher state: the next draw, not the first
    batcher, step = _stepper(folder, lengths, 0)
    step.draw(model, [batcher.next()], None)
    torch.manual_seed(123)  # the global RNG does not decide the samples: the sampler's own generator does
    second = step.draw(model, [batcher.next()], None)[0][0].input_ids.tolist()
    assert again == second


def test_num_iterations_reuses_the_rollout_for_mu_steps(folder):
    from lora_engine.train.step import make_optimizer, make_scheduler

    model = tiny_lora_model(folder)
    batcher, step = _stepper(folder, lambda prompts, completions, **_: [float(len(c)) for c in completions], mu=2)
    opt = make_optimizer(model, 1e-2)
    sched = make_scheduler(opt, 0, 10)
    b1, b2, b3 = batcher.next(), batcher.next(), batcher.next()
    assert (b1["round"], b2["round"], b3["round"]) == (0, 1, 0) and b1["where"] == b2["where"] != b3["where"]
    step(model, opt, sched, [b1])
    first = step._rollouts
    assert first[0].old_logps is not None
    step(model, opt, sched, [b2])
    assert step._rollouts is first
    step(model, opt, sched, [b3])
    assert step._rollouts is not first


def _run(folder, tmp_path, *flags):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(12))
    return main(["--model", str(folder), "--out", str(tmp_path / "run"), "--objective", "grpo", "--data", str(data),
                 "--batch-size", "2", "--r", "4", "--num-generations", "3", "--max-completion-length", "6",
                 "--max-length", "64", "--no-general-eval", "--no-plot", "--warmup-steps", "0", *flags])


def test_a_short_grpo_run_writes_trl_metric_names(folder, tmp_path):
    rc = _run(folder, tmp_path, "--max-steps", "2", "--reward", "numeric_match,length_penalty", "--reward-weights",
              "1,0.5", "--beta", "0.04", "--loss-type", "grpo", "--epsilon-high", "0.28")
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    names = {"reward", "reward_std", "rewards/numeric_match/mean", "rewards/length_penalty/mean",
             "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio", "kl",
             "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    assert names <= set(rows[0]), names - set(rows[0])
    assert 1 <= rows[0]["completions/mean_length"] <= 6 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["config"]["objective"] == "grpo"
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_a_grpo_run_records_the_held_out_reward_before_and_after(folder, tmp_path, caplog):
    caplog.set_level("INFO", logger="lora_engine")
    assert _run(folder, tmp_path, "--max-steps", "2", "--reward", "numeric_match,length_penalty", "--val-split",
                "0.25") == 0
    ev = json.loads((tmp_path / "run" / "run.json").read_text())["eval"]
    for when in ("before", "after"):
        r = ev[when]["reward"]
        assert r["prompts"] == 3 and set(r["per_function"]) == {"numeric_match", "length_penalty"}
        assert r["mean"] is not None and math.isfinite(r["mean"])
    assert "held-out reward (greedy, 3 prompts): " in caplog.text


def test_held_out_reward_is_greedy_and_batched_the_same(folder):
    model = tiny_lora_model(folder)
    _, step = _stepper(folder, lambda prompts, completions, **_: [float(len(c)) for c in completions])
    rows = step.batcher.rows[:5]
    model.train()
    a = step.held_out_reward(model, rows, batch_size=2)
    assert model.training  # put back as it was
    b = step.held_out_reward(model, rows, batch_size=5)
    assert a == b and a["prompts"] == 5 and a["per_function"]["r"] == a["mean"]
    from lora_engine.models.generate import decode

    greedy = decode(model.eval(), [r.input_ids for r in rows], 6, temperature=0.0, stop_ids=step.stop_ids)
    texts = [step.tokenizer.decode(greedy.text_tokens(i), skip_special_tokens=True) for i in range(5)]
    assert a["mean"] == pytest.approx(sum(map(len, texts)) / 5)
    none = GRPOStep(step.tokenizer, [R.Reward("n", lambda prompts, completions, **_: [None] * len(completions))],
                    step.sampling, step.loss, step.batcher)
    assert none.held_out_reward(model, rows)["mean"] is None


@pytest.mark.parametrize("stop_after", [1, 2])  # between the two steps of a rollout, and at its boundary
def test_a_run_resumed_mid_rollout_equals_the_run_not_stopped_loss_for_loss(folder, tmp_path, stop_after):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    flags = ("--max-steps", "4", "--num-iterations", "2", "--reward", "numeric_match,length_penalty", "--beta", "0.04")
    assert _run(folder, tmp_path / "a", *flags) == 0
    assert _run(folder, tmp_path / "b", *flags, "--stop-after", str(stop_after)) == 0
    state = torch.load(tmp_path / "b" / "run" / "checkpoints" / f"step-{stop_after:08d}" / "state.pt",
                       weights_only=True)  # what the resumed run reads: tensors and plain data only
    assert ("rollout" in state["data"]) == (stop_after == 1)
    assert main(["--resume", str(tmp_path / "b" / "run")]) == 0
    rows = [[json.loads(x) for x in (tmp_path / d / "run" / "metrics.jsonl").read_text().splitlines()]
            for d in "ab"]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "reward", "kl", "completions/mean_length"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key


def test_a_failing_reward_function_stops_the_run_naming_it(folder, tmp_path, monkeypatch, capsys):
    (tmp_path / "my_rewards.py").write_text("def strict(prompts, completions, answer, **kw):\n"
                                            "    raise RuntimeError('no parser for this')\n")
    monkeypatch.chdir(tmp_path)
    rc = _run(folder, tmp_path, "--max-steps", "2", "--reward", "my_rewards:strict")
    assert rc == 2
    err = capsys.readouterr().err
    assert "error: --reward strict on the prompts from 'What is" in err and "RuntimeError: no parser" in err
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_a_reward_that_does_not_import_stops_before_anything_is_written(folder, tmp_path, capsys):
    assert _run(folder, tmp_path, "--reward", "nowhere_mod:f") == 2
    assert "cannot import module 'nowhere_mod'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_stop_strings_end_the_completions_and_the_rewards_read_the_text_before_them(folder, monkeypatch):
    from lora_engine.models.generate import Completions
    from lora_engine.train import grpo_step

    seen, calls = [], []
    tok = FakeTokenizer()
    rows = [prompt_row(Record(r, f"f:{i}"), tok, 64) for i, r in enumerate(prompt_records(4))]
    step = GRPOStep(tok, [R.Reward("r", lambda prompts, completions, **_: seen.extend(completions) or
                                   [float(len(c)) for c in completions])],
                    Sampling(2, 6, 1.0, stop=("!", "??")), LossSettings(), PromptBatcher(rows, 2, 0))

    def fake(model, prompts, max_new_tokens, **kw):
        calls.append((kw["stop_strings"], kw["tokenizer"]))
        texts = ["ab!c", "a??b", "abc", "x!"] * (len(prompts) // 4)
        return Completions([tok.encode(t) for t in texts], ["!", "??", None, "!"] * (len(prompts) // 4))

    monkeypatch.setattr(grpo_step, "decode", fake)
    rollout, metrics = step.draw(tiny_lora_model(folder), [step.batcher.next()], None)
    assert calls == [(("!", "??"), tok)] and seen == ["ab", "a", "abc", "x"]
    assert rollout[0].completion_mask.sum(1).tolist() == [4, 4, 3, 2]  # the tokens trained on keep the stop string
    step.held_out_reward(tiny_lora_model(folder), rows[:4])
    assert calls[-1] == (("!", "??"), tok)
    with pytest.raises(ValueError, match=r"--stop must be non-empty text .*got \('a', ''\)"):
        TrainConfig(objective="grpo", reward="exact_match", stop=("a", ""))


@pytest.mark.parametrize("method", [("--use-dora",), ("--quantize", "nf4")])
def test_grpo_trains_dora_and_qlora_adapters_with_the_reference_the_adapter_switched_off(folder, tmp_path, method):
    rc = _run(folder, tmp_path, "--max-steps", "2", "--reward", "numeric_match,length_penalty", "--beta", "0.04",
              "--lr", "5e-2", *method)
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["kl"]) for r in rows)
    assert abs(rows[0]["kl"]) < 1e-6 < rows[1]["kl"]  # step 1: the adapter starts as the base; step 2: it moved
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] == (method[0] == "--use-dora")
