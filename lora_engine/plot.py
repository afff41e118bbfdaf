"""The loss curve of a run as a PNG, from its metrics.jsonl. matplotlib is optional."""

from __future__ import annotations

import json
from pathlib import Path

from lora_engine.io import atomic


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: str | Path, png_path: str | Path, evals: list[tuple[int, float]] = ()) -> str | None:
    """Write the training (and validation) loss against step; returns a note when it is skipped.

    evals: extra (step, target-task validation loss) points, e.g. before and after training.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss curve skipped: matplotlib is not installed (pip install matplotlib)"
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None and r["loss"] == r["loss"]]
    val = sorted([(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None] + list(evals))
    if not train:
        return "loss curve skipped: no logged steps"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per target token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    atomic.write_bytes(png_path, tmp.read_bytes())
    tmp.unlink()
    return None
