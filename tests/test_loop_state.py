"""The loop's typed state: through a checkpoint unchanged, what a run saves is what it did, and old or
foreign checkpoints are read or refused by name."""

import json

import pytest
import torch

from lora_engine.train import checkpoint
from lora_engine.train import step as trainer
from lora_engine.train.config import TrainConfig
from lora_engine.train.loop import LoopState, run
from tests.test_train_support import (
    FakeTokenizer,
    tiny_lora_model,
)

TOK = FakeTokenizer()
QUIET = lambda *a: None  # noqa: E731


def _cfg(out, data, **kw):
    base = dict(model="unused", data=str(data), out=str(out) if out else None, max_steps=6, batch_size=4, lr=5e-3,
                warmup_steps=2, r=4, max_length=96, save_every=0, general_eval=False, eval_batch_size=8, plot=False)
    return TrainConfig(**{**base, **kw})


def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _edit_loop_state(ckpt, edit):
    """Rewrite the loop state inside a checkpoint's state.pt, as an older or newer version would have saved it."""
    path = ckpt / "state.pt"
    state = torch.load(path, weights_only=True)
    edit(state["loop"])
    torch.save(state, path)


def test_loop_state_round_trips_through_a_checkpoint(folder, tmp_path):
    model = tiny_lora_model(folder)
    opt = trainer.make_optimizer(model, 1e-3)
    sched = trainer.make_scheduler(opt, 1, 10)
    state = LoopState(step=7, tokens=1234, targets=567, skipped=1, best_val=1.25,
                      eval_before={"target": {"loss": 2.0, "ppl": 7.389, "tokens": 10}})
    ck = checkpoint.save_checkpoint(tmp_path, 7, model, opt, sched, state.to_dict(), {"epoch": 0})
    restored = checkpoint.load_checkpoint(ck, model, opt, sched)
    assert type(restored["loop"]) is dict  # plain data on disk: no class of ours to unpickle
    assert LoopState.from_dict(restored["loop"]) == state


def test_from_dict_reads_a_checkpoint_from_before_the_target_count_and_refuses_unknown_fields():
    old = {"step": 3, "tokens": 50, "skipped": 0, "best_val": None, "eval_before": None}
    assert LoopState.from_dict(old) == LoopState(step=3, tokens=50, targets=None)
    with pytest.raises(ValueError, match=r"unknown fields \['lr_scale'\]"):
        LoopState.from_dict({"step": 1, "lr_scale": 2.0})
    with pytest.raises(ValueError, match="step missing"):
        LoopState.from_dict({"tokens": 5})


def test_the_state_a_run_saves_is_what_it_did(folder, data, tmp_path):
    out = tmp_path / "run"
    m = run(_cfg(out, data, stop_after=3), tokenizer=TOK, model=tiny_lora_model(folder), log=QUIET)
    assert m["status"] == "interrupted"
    rows = _rows(out)
    (ck,) = checkpoint.list_checkpoints(out)
    state = LoopState.from_dict(torch.load(ck / "state.pt", weights_only=True)["loop"])
    assert state.step == 3 and state.skipped == 0
    assert state.tokens == sum(r["tokens"] for r in rows)
    assert state.targets == sum(r["targets"] for r in rows) == rows[-1]["target_tokens_seen"]
    # The default schedule evaluates at steps 2 and 4 of 6: step 2's loss is the best so far.
    assert state.best_val == rows[1]["val_loss"]
    assert state.eval_before == m["eval"]["before"] and set(state.eval_before) == {"target"}


def test_resume_from_a_checkpoint_without_the_target_count(folder, data, tmp_path):
    out = tmp_path / "run"
    run(_cfg(out, data, stop_after=3), tokenizer=TOK, model=tiny_lora_model(folder), log=QUIET)
    (ck,) = checkpoint.list_checkpoints(out)
    _edit_loop_state(ck, lambda loop: loop.pop("targets"))
    m = run(_cfg(None, data, resume=str(out)), {"resume"}, tokenizer=TOK, model=tiny_lora_model(folder), log=QUIET)
    rows = _rows(out)
    assert m["status"] == "completed" and [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # The count stays unknown after such a resume rather than restarting from zero.
    assert ["target_tokens_seen" in r for r in rows] == [True] * 3 + [False] * 3
    assert m["tokens"] == sum(r["tokens"] for r in rows)


def test_resume_refuses_a_loop_state_it_does_not_know(folder, data, tmp_path):
    out = tmp_path / "run"
    run(_cfg(out, data, stop_after=2), tokenizer=TOK, model=tiny_lora_model(folder), log=QUIET)
    (ck,) = checkpoint.list_checkpoints(out)
    _edit_loop_state(ck, lambda loop: loop.update(future_field=1))
    with pytest.raises(checkpoint.ResumeError, match=r"step-00000002: the loop state .*unknown fields "
                                                     r"\['future_field'\].*version that wrote the checkpoint"):
        run(_cfg(None, data, resume=str(out)), {"resume"}, tokenizer=TOK, model=tiny_lora_model(folder), log=QUIET)
