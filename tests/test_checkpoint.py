"""Checkpoints: atomic under a crash mid-save, written on SIGTERM, usable after kill -9, checked on resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_engine.io import atomic
from lora_engine.train import checkpoint
from lora_engine.train import step as trainer
from tests.test_train_support import chat_records, tiny_lora_model, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _parts(folder, r=4):
    model = tiny_lora_model(folder, r=r)
    opt = trainer.make_optimizer(model, 1e-3)
    return model, opt, trainer.make_scheduler(opt, 1, 10)


def test_crash_mid_save_keeps_the_previous_checkpoint(folder, tmp_path, monkeypatch):
    model, opt, sched = _parts(folder)
    first = checkpoint.save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, {"epoch": 0}, keep=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(checkpoint.torch, "save", boom)
    with pytest.raises(OSError, match="simulated"):
        checkpoint.save_checkpoint(tmp_path, 2, model, opt, sched, {"step": 2}, {"epoch": 0}, keep=1)
    monkeypatch.undo()
    assert checkpoint.list_checkpoints(tmp_path) == [first]  # keep=1 did not prune it: the new one never existed
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no half-written temporary left behind
    fresh, opt2, sched2 = _parts(folder)
    state = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path), fresh, opt2, sched2)
    assert state["loop"] == {"step": 1}
    for (n, p), q in zip(fresh.named_parameters(), model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p, q - 1.0, rtol=0, atol=1e-6, msg=n)


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    atomic.write_json(target, {"v": 1})
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("power cut (simulated)")))
    with pytest.raises(OSError, match="simulated"):
        atomic.write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_resume_with_a_different_model_is_refused(folder, tmp_path):
    model, opt, sched = _parts(folder, r=4)
    ck = checkpoint.save_checkpoint(tmp_path, 1, model, opt, sched, {}, {})
    other, opt2, sched2 = _parts(folder, r=2)
    with pytest.raises(checkpoint.ResumeError, match=r"step-00000001: model.layers.0.self_attn.q_proj.lora_A "
                                                     r"has shape \(4, 32\), the model \(2, 32\): resume with the same"):
        checkpoint.load_checkpoint(ck, other, opt2, sched2)
    with pytest.raises(checkpoint.ResumeError, match=r"--resume .*nowhere: no such folder"):
        checkpoint.latest_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.ResumeError, match=r"neither a checkpoint folder"):
        checkpoint.latest_checkpoint(tmp_path / "empty")


class Payload:
    """What a hostile state.pt holds: unpickling it runs code (here: creates a marker file)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _plant(ckpt, marker):
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["optimizer"]["state"] = Payload(marker)
    torch.save(state, ckpt / "state.pt")
    torch.load(ckpt / "state.pt", weights_only=False)  # the payload is live: the full unpickler runs it
    assert marker.read_text() == "ran"
    marker.unlink()


def test_a_pickle_payload_in_state_pt_never_runs(folder, tmp_path):
    model, opt, sched = _parts(folder)
    ck = checkpoint.save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, {"epoch": 0})
    marker = tmp_path / "pwned"
    _plant(ck, marker)
    fresh, opt2, sched2 = _parts(folder)
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    with pytest.raises(checkpoint.ResumeError, match=r"step-00000001/state.pt: not a checkpoint state this version "
                                                     r"writes \(Weights only load failed.*was not loaded"):
        checkpoint.load_checkpoint(ck, fresh, opt2, sched2)
    assert not marker.exists()
    assert all(torch.equal(p, before[n]) for n, p in fresh.named_parameters())  # refused before any change


def test_a_checkpoint_of_the_pickled_format_is_refused(folder, tmp_path):
    model, opt, sched = _parts(folder)
    ck = checkpoint.save_checkpoint(tmp_path, 1, model, opt, sched, {"step": 1}, {"epoch": 0})
    meta = json.loads((ck / "meta.json").read_text())
    assert meta["format"] == 2
    (ck / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(checkpoint.ResumeError, match=r"a checkpoint of format 1, written by an older lora_engine .*"
                                                     r"runs any code the file holds; it is not loaded. Re-create it"):
        checkpoint.load_checkpoint(ck, model, opt, sched)
    (ck / "meta.json").write_text("{oops")
    with pytest.raises(checkpoint.ResumeError, match=r"meta.json: cannot be read"):
        checkpoint.load_checkpoint(ck, model, opt, sched)
    (ck / "meta.json").write_text(json.dumps(meta))
    torch.save([1, 2], ck / "state.pt")
    with pytest.raises(checkpoint.ResumeError, match=r"state.pt: holds list, not the state this version writes"):
        checkpoint.load_checkpoint(ck, model, opt, sched)


def test_train_resume_of_a_planted_payload_is_one_error_line(folder, tmp_path):
    out = tmp_path / "run"
    proc = _start(folder, out, save_every=1, extra=["--max-steps", "1"])
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    marker = tmp_path / "pwned"
    _plant(checkpoint.latest_checkpoint(out), marker)
    proc = _start(folder, out, save_every=1, extra=["--max-steps", "2", "--resume", str(out)])
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2 and not marker.exists(), log
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "state.pt: not a checkpoint state this version writes" in errors[0], log
    assert "Traceback" not in log


def _start(folder, out, save_every, extra=("--max-steps", "100000")):
    data = write_jsonl(out.parent / f"{out.name}.jsonl", chat_records(64))
    cmd = [sys.executable, "-m", "lora_engine.train", "--model", str(folder), "--data", str(data), "--out", str(out),
           "--batch-size", "2", "--max-length", "64", "--r", "4", "--no-general-eval",
           "--no-plot", "--save-every", str(save_every), "--keep-checkpoints", "2", *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc, timeout=120):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("training made no progress in time")
        time.sleep(0.2)


def _steps(out):
    p = out / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.is_file() else 0


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(folder, tmp_path):
    out = tmp_path / "run"
    proc = _start(folder, out, save_every=0)
    _wait_for(lambda: _steps(out) >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, log  # stopped, not finished: 143, as a shell reports it
    assert "stopped by SIGTERM" in log
    (ck,) = checkpoint.list_checkpoints(out)
    assert json.loads((ck / "meta.json").read_text())["step"] == _steps(out)
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"


def test_kill_9_leaves_the_last_complete_checkpoint_usable(folder, tmp_path):
    out = tmp_path / "run"
    proc = _start(folder, out, save_every=1)
    _wait_for(lambda: len(checkpoint.list_checkpoints(out)) >= 2, proc)
    time.sleep(0.37)  # land somewhere inside a later step or save
    proc.kill()
    proc.communicate(timeout=60)
    ck = checkpoint.latest_checkpoint(out)
    model, opt, sched = _parts(folder)
    state = checkpoint.load_checkpoint(ck, model, opt, sched)
    assert state["loop"]["step"] == state["meta"]["step"] >= 2
