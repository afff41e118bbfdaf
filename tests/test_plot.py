"""The loss picture: EMA smoothing by the numbers, the step -> tokens axis, the PNG (written atomically),
and the default evaluation schedule."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from lora_engine.train import plot
from lora_engine.train.config import TrainConfig, eval_steps


def test_ema_is_debiased_and_exact():
    # s = 0.5, 1.25, 2.125 before the bias correction 1 - 0.5**(i+1) = 0.5, 0.75, 0.875.
    assert plot.ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875], rel=1e-12)
    assert plot.ema([2.5] * 50, 0.9) == pytest.approx([2.5] * 50, rel=1e-12)  # no ramp up from 0
    assert plot.ema([3.0, 1.0, 4.0], 0.0) == [3.0, 1.0, 4.0]
    assert plot.ema([], 0.9) == []
    # A step from 0 to 1 is followed with time constant 1/(1-weight): the lag is what smooths.
    tail = plot.ema([0.0] * 200 + [1.0] * 10, 0.9)[200:]
    assert tail == pytest.approx([1 - 0.9 ** (k + 1) for k in range(10)], rel=1e-9)
    with pytest.raises(ValueError, match=r"ema: weight must be in \[0, 1\), got 1"):
        plot.ema([1.0], 1)


def test_smoothing_window_grows_with_the_run():
    assert plot.smoothing_weight(120) == pytest.approx(1 - 1 / 8)
    assert plot.smoothing_weight(5) == 0.0  # too few points to average anything
    assert plot.smoothing_weight(100_000) == pytest.approx(1 - 1 / 50)


def test_step_to_tokens_axis_is_piecewise_linear_and_invertible():
    fwd, inv = plot._step_to_tokens([1, 2, 4], [100, 300, 400])
    assert fwd(np.array([0, 1, 1.5, 2, 3, 4])) == pytest.approx([0, 100, 200, 300, 350, 400])
    assert fwd(np.array([6, -2])) == pytest.approx([600, -200])  # beyond the data at the mean rate, 100/step
    xs = np.linspace(-1, 6, 15)
    assert inv(fwd(xs)) == pytest.approx(xs)


def _metrics(path, steps=40, seen=True, val_every=10):
    rows, total = [], 0
    for s in range(1, steps + 1):
        total += 50 + s % 7
        r = {"step": s, "loss": 2.0 + math.exp(-s / 10) + 0.1 * math.sin(s), "targets": 50 + s % 7}
        if seen:
            r["target_tokens_seen"] = total
        if s % val_every == 0:
            r["val_loss"] = 2.2 + math.exp(-s / 12)
        rows.append(r)
    rows[5]["loss"] = float("nan")  # a step skipped by --on-nonfinite skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("seen", [True, False])
def test_plot_writes_a_png(tmp_path, seen):
    pytest.importorskip("matplotlib", reason="plotting is the optional [plot] extra")
    import matplotlib.image

    m = _metrics(tmp_path / "metrics.jsonl", seen=seen)
    png = tmp_path / "loss.png"
    assert plot.plot_loss(m, png, [(0, 3.3), (40, 2.4)]) is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[:2] == (495, 880)  # 8 x 4.5 inches at 110 dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]  # no temporaries


def test_a_grpo_run_gets_a_reward_panel_beside_the_loss(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="plotting is the optional [plot] extra")
    import matplotlib.image

    rows = [{"step": s, "loss": 0.01 * (-1) ** s, "reward": 0.1 + s / 40} for s in range(1, 21)]
    rows[3]["reward"] = float("nan")  # no function scored that step's completions
    m = tmp_path / "metrics.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    real = plot._draw_reward
    monkeypatch.setattr(plot, "_draw_reward", lambda ax, r, h: (drawn.append((len(r), h)), real(ax, r, h)))
    png = tmp_path / "loss.png"
    assert plot.plot_loss(m, png, [], [(20, 0.6), (0, 0.1)]) is None
    assert matplotlib.image.imread(png).shape[:2] == (495, 1540)  # two panels: 14 x 4.5 inches at 110 dpi
    assert drawn == [(19, [(0, 0.1), (20, 0.6)])]  # the NaN step left out, the held-out points in step order


def test_plot_keeps_the_old_png_when_rendering_fails(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="plotting is the optional [plot] extra")
    from matplotlib.figure import Figure

    m = _metrics(tmp_path / "metrics.jsonl")
    png = tmp_path / "loss.png"
    png.write_bytes(b"the previous picture")

    def fail(self, target, *a, **k):  # half a picture, then the error
        if hasattr(target, "write"):
            target.write(b"\x89PNG half")
        else:
            Path(target).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        plot.plot_loss(m, png)
    assert png.read_bytes() == b"the previous picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl"]


def test_plot_skips_without_steps(tmp_path):
    pytest.importorskip("matplotlib", reason="plotting is the optional [plot] extra")
    assert plot.plot_loss(tmp_path / "absent.jsonl", tmp_path / "loss.png") == "loss curve skipped: no logged steps"
    assert not (tmp_path / "loss.png").exists()


def test_default_run_evaluates_several_times_mid_run():
    cfg = TrainConfig()
    steps = eval_steps(cfg.max_steps, cfg.eval_every)
    assert steps == [30, 60, 90]  # plus the evaluations before and after: 5 validation points
    assert eval_steps(7, None) == [2, 4, 6]
    assert eval_steps(3, None) == [1, 2]
    assert eval_steps(1, None) == []  # the final evaluation covers a 1-step run
    assert eval_steps(4, 2) == [2]  # never at the last step: the final evaluation measures it
    assert eval_steps(10, 3) == [3, 6, 9]
    assert eval_steps(120, 0) == []
    with pytest.raises(ValueError, match=r"--eval-every must be >= 0, got -1"):
        TrainConfig(eval_every=-1)
