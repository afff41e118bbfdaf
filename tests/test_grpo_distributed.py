"""--objective grpo on 2 processes (torchrun, gloo on CPU): each rank samples for its own prompts with its own
sampler, groups stay on one rank, and the step's gradient and metrics are the one-process step's over the same
prompts (tests/grpo_ddp_step.py, with a deterministic sampler so both draw the same completions); a 2-process
run stopped mid-rollout resumes loss for loss. --distributed fsdp is refused for GRPO, with the reason."""

import json

import pytest
import torch

from lora_engine.data.formats import Record
from lora_engine.data.prepare import prompt_row
from lora_engine.train.command import main
from lora_engine.train.grpo_step import PromptBatcher, sampler_seed
from tests import grpo_ddp_step
from tests.test_distributed import _ok, _torchrun
from tests.test_grpo import prompt_records
from tests.test_train_support import FakeTokenizer, write_jsonl


def test_two_ranks_step_on_the_one_process_gradient_over_the_same_prompts(folder, tmp_path, monkeypatch):
    _ok(_torchrun([str(folder), str(tmp_path / "ddp.pt")], script=("tests/grpo_ddp_step.py",)))
    two = torch.load(tmp_path / "ddp.pt", weights_only=True)
    monkeypatch.setattr(grpo_ddp_step.grpo_step, "decode", grpo_ddp_step.fake_decode)
    for loss_type in grpo_ddp_step.CASES:
        one = grpo_ddp_step.one_step(folder, loss_type)
        got = two[loss_type]
        assert len(got["grads"]) == len(one["grads"]) > 0
        for a, b in zip(got["grads"], one["grads"]):
            # summed over 2 ranks instead of over 4 micro-batches in one: fp32 summation order only
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=loss_type)
        assert any(float(g.abs().max()) > 0 for g in one["grads"]), loss_type
        assert got["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-8) and got["targets"] == one["targets"]
        for k, v in one["metrics"].items():  # the rewards of all 8 prompts x 3, not one rank's
            assert got["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (loss_type, k)
        assert one["metrics"]["reward_std"] > 0 and one["metrics"]["frac_reward_zero_std"] < 1


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])  # (bnpo's mean is per micro-batch, by design)
def test_accumulating_micro_batches_of_prompts_equals_one_batch_of_them_all(folder, monkeypatch, loss_type):
    monkeypatch.setattr(grpo_ddp_step.grpo_step, "decode", grpo_ddp_step.fake_decode)
    split = grpo_ddp_step.one_step(folder, loss_type)  # 4 micro-batches of 2 prompts
    whole = grpo_ddp_step.one_step(folder, loss_type, batch=8, micro=1)
    assert split["metrics"]["reward"] == pytest.approx(whole["metrics"]["reward"], rel=1e-6)
    for a, b in zip(split["grads"], whole["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_each_rank_has_its_own_reproducible_sampler_and_gets_it_back_from_a_checkpoint():
    assert sampler_seed(5, 0) == 5 and len({sampler_seed(5, r) for r in range(4)}) == 4
    assert sampler_seed(2**63 - 1, 3) < 2**64  # any --seed: a valid generator seed on every rank
    tok = FakeTokenizer()
    rows = [prompt_row(Record(r, f"f:{i}"), tok, 64) for i, r in enumerate(prompt_records(8))]

    def batcher(rank, world=2):
        return PromptBatcher(rows, 2, 5, per_step=2, rank=rank, world=world)

    b0, b1 = batcher(0), batcher(1)
    draws = [torch.rand(3, generator=b.generator) for b in (b0, b1)]
    assert not torch.equal(*draws) and torch.equal(draws[1], torch.rand(3, generator=batcher(1).generator))
    b0.peers = [b0.rank_state(), b1.rank_state()]  # what GRPOStep gathers to rank 0 after a step
    saved = b0.state_dict()
    nxt = [torch.rand(3, generator=b.generator) for b in (b0, b1)]
    for rank in (0, 1):  # a resumed 2-process run: each rank continues its own sampler
        again = batcher(rank)
        again.load_state_dict(saved)
        assert torch.equal(torch.rand(3, generator=again.generator), nxt[rank])
    alone = PromptBatcher(rows, 2, 5, per_step=2)  # resumed in one process: rank 0's sampler
    alone.load_state_dict(saved)
    assert torch.equal(torch.rand(3, generator=alone.generator), nxt[0])


def _args(folder, data, out, *extra):
    return ["--model", str(folder), "--data", str(data), "--out", str(out), "--objective", "grpo", "--reward",
            "numeric_match,length_penalty", "--batch-size", "2", "--lora-r", "4", "--num-generations", "3",
            "--max-completion-length", "6", "--max-length", "64", "--max-steps", "4", "--num-iterations", "2",
            "--warmup-steps", "0", "--lr", "5e-3", "--no-general-eval", "--no-plot", "--precision", "fp32",
            "--device", "cpu", *extra]


def test_a_two_process_grpo_run_stopped_mid_rollout_resumes_loss_for_loss(folder, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(16))
    _ok(_torchrun(_args(folder, data, tmp_path / "a")))
    _ok(_torchrun(_args(folder, data, tmp_path / "b", "--stop-after", "3")))
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-00000003" / "state.pt", weights_only=True)
    ranks = state["data"]["ranks"]  # each rank's sampler and its half of the rollout the next step reuses
    assert len(ranks) == 2 and not torch.equal(ranks[0]["sampler"], ranks[1]["sampler"])
    assert all("rollout" in r for r in ranks)
    _ok(_torchrun(["--resume", str(tmp_path / "b")]))
    rows = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in rows[1]] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "reward", "reward_std", "completions/mean_length"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key
    assert len({r["reward"] for r in rows[0]}) > 1  # it sampled anew at step 3
    manifest = json.loads((tmp_path / "a" / "run.json").read_text())
    assert manifest["status"] == "completed" and manifest["distributed"]["world_size"] == 2
    assert manifest["eval"]["after"]["reward"]["prompts"] > 0


def test_grpo_under_fsdp_is_refused_with_the_reason(folder, tmp_path, monkeypatch, capsys):
    for k in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_records(4))
    args = [a for a in _args(folder, data, tmp_path / "x") if a not in ("--device", "cpu")]
    assert main([*args, "--distributed", "fsdp"]) == 2
    assert "--objective grpo is not implemented with --distributed fsdp: run it in one process or with " \
           "--distributed ddp" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
