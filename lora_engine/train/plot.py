"""The loss curve of a run as a PNG, from its metrics.jsonl. matplotlib is optional.

The picture: the raw per-step train loss faint, its debiased EMA drawn over it, the validation loss
(held-out target task) as points at every evaluation, steps on the bottom axis and target tokens
seen (the tokens the loss is taken on) on the top one. A GRPO run (metrics with "reward") gets a second
panel beside it: the mean reward of each step's rollouts, raw and smoothed, and the held-out reward
(greedy completions) before and after training as points.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lora_engine.io import atomic


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Debiased exponential moving average: s_i = weight*s_{i-1} + (1-weight)*x_i, divided by 1 - weight**(i+1).

    Without the division the curve would start at (1-weight)*x_0, far below the data; with it the
    first point is x_0 itself and a constant series stays constant (TensorBoard's smoothing).
    """
    if not 0 <= weight < 1:
        raise ValueError(f"ema: weight must be in [0, 1), got {weight}")
    out, s = [], 0.0
    for i, x in enumerate(values):
        s = weight * s + (1 - weight) * x
        out.append(s / (1 - weight ** (i + 1)))
    return out


def smoothing_weight(n: int) -> float:
    """EMA weight for n points: a window of about n/15 steps (1 to 50), so a 120-step run averages ~8."""
    window = min(50.0, max(1.0, n / 15))
    return 1 - 1 / window


def _step_to_tokens(steps: list[int], seen: list[int]):
    """(forward, inverse) maps between step and target tokens seen, for secondary_xaxis.

    Piecewise linear through (0, 0) and the logged points, extended beyond them at the mean rate so
    the axis margins map too.
    """
    import numpy as np

    xs = np.array([0, *steps], dtype=float)
    ys = np.array([0, *seen], dtype=float)
    rate = ys[-1] / xs[-1]

    def interp(v, xp, fp, slope):
        v = np.asarray(v, dtype=float)
        inside = np.interp(v, xp, fp)
        return np.where(v < xp[0], fp[0] + (v - xp[0]) * slope,
                        np.where(v > xp[-1], fp[-1] + (v - xp[-1]) * slope, inside))

    return (lambda v: interp(v, xs, ys, rate)), (lambda v: interp(v, ys, xs, 1 / rate))


def _tokens_label(x, _pos=None) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:g}{unit}"
    return f"{x:g}"


def plot_loss(metrics_path: str | Path, png_path: str | Path, evals: list[tuple[int, float]] = (),
              reward_evals: list[tuple[int, float]] = ()) -> str | None:
    """Write the training (and validation) loss against step; returns a note when it is skipped.

    evals: extra (step, target-task validation loss) points, e.g. before and after training.
    reward_evals: (step, held-out reward) points, drawn in the reward panel (present when the metrics carry
    "reward").
    The PNG appears complete or not at all (streamed into a temporary, then renamed into place).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss curve skipped: matplotlib is not installed (pip install matplotlib)"
    rows = read_metrics(metrics_path)
    # NaN losses are the steps skipped by --on-nonfinite skip.
    train = [r for r in rows if r.get("loss") is not None and math.isfinite(r["loss"])]
    val = sorted([(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None] + list(evals))
    if not train:
        return "loss curve skipped: no logged steps"
    rewarded = [r for r in train if r.get("reward") is not None and math.isfinite(r["reward"])]
    fig, axes = plt.subplots(1, 2 if rewarded else 1, figsize=(14 if rewarded else 8, 4.5), dpi=110, squeeze=False)
    try:
        _draw(axes[0][0], train, val, Path(png_path).parent.name or "run")
        if rewarded:
            _draw_reward(axes[0][1], rewarded, sorted(reward_evals))
        fig.tight_layout()
        with atomic.atomic_file(png_path) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return None


def _curve(ax, steps: list[int], values: list[float], name: str, raw_note: str, color: str,
           points: list[tuple[int, float]], points_label: str, points_color: str) -> list[float]:
    """One per-step series, faint, with its EMA over it and the held-out points; returns the EMA."""
    weight = smoothing_weight(len(values))
    smooth = ema(values, weight)
    ax.plot(steps, values, color=color, alpha=0.25, lw=0.8, label=f"{name} ({raw_note})")
    ax.plot(steps, smooth, color=color, lw=2, label=f"{name} (EMA, ~{round(1 / (1 - weight))} steps)")
    if points:
        ax.plot(*zip(*points), "o", ls=":", lw=1, color=points_color, ms=6, mec="white", mew=0.8,
                label=points_label, zorder=3, clip_on=False)
    return smooth


def _draw(ax, train: list[dict], val: list[tuple[int, float]], title: str) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]
    smooth = _curve(ax, steps, losses, "train loss", "per step", "tab:blue", val, "validation loss (held-out)",
                    "tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token (nats)")
    # A loss that falls by more than 10x (e.g. memorising a tiny set) reads better on a log scale.
    shown = losses + [v for _, v in val]
    if min(shown) > 0 and max(shown) / min(shown) > 10:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 0.2, 0.5, 1, 2, 5: a decade alone says little
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    ax.set_xlim(left=0)
    seen = [r["target_tokens_seen"] for r in train if "target_tokens_seen" in r]
    if len(seen) == len(train) and seen[-1] > 0:  # absent in metrics from before the field existed
        top = ax.secondary_xaxis("top", functions=_step_to_tokens(steps, seen))
        top.set_xlabel("target tokens seen")
        top.xaxis.set_major_formatter(FuncFormatter(_tokens_label))
    summary = f"final train EMA {smooth[-1]:.3f}"
    if val:
        summary += f", validation {val[0][1]:.3f} \u2192 {val[-1][1]:.3f}"
    ax.set_title(f"{title}: {summary}", fontsize=10)
    ax.legend(loc="best", fontsize=9)


def _draw_reward(ax, rows: list[dict], held_out: list[tuple[int, float]]) -> None:
    """The reward panel: each step's mean rollout reward (TRL's "reward"), its EMA, and the held-out points."""
    steps, rewards = [r["step"] for r in rows], [r["reward"] for r in rows]
    smooth = _curve(ax, steps, rewards, "reward", "rollouts, per step", "tab:green", held_out,
                    "held-out reward (greedy)", "tab:red")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean reward")
    ax.grid(alpha=0.3)
    ax.set_xlim(left=0)
    summary = f"final reward EMA {smooth[-1]:.3f}"
    if held_out:
        summary += f", held-out {held_out[0][1]:.3f} \u2192 {held_out[-1][1]:.3f}"
    ax.set_title(summary, fontsize=10)
    ax.legend(loc="best", fontsize=9)
