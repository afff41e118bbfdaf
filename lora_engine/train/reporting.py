"""What a training run tells: the progress report, the lines about its data and evaluations, metrics.jsonl."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from lora_engine.io import atomic

logger = logging.getLogger(__name__)


class ProgressLog:
    """The default progress report: one line through `log` every 5% of the run and at its end.

    The interface `run` expects of a progress report: built as `progress(total, first_step)`, then
    update(step, loss, lr, tokens_per_s) after every step and close() at the end.
    """

    def __init__(self, total: int, start: int, log: Callable[[str], None] | None = None):
        self.total, self.start, self.t0 = total, start, time.time()
        self.log = log or logger.info

    def line(self, step: int, loss: float, lr: float, tps: float) -> str:
        eta = (time.time() - self.t0) / max(1, step - self.start) * (self.total - step)
        bar = "#" * int(20 * step / self.total)
        return (f"step {step}/{self.total} [{bar:<20}] loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s "
                f"ETA {int(eta) // 60}:{int(eta) % 60:02d}")

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        if step % max(1, self.total // 20) == 0 or step == self.total:
            self.log(self.line(step, loss, lr, tps))

    def close(self) -> None:
        pass


class Silent(ProgressLog):
    """The progress report of ranks other than 0."""

    def update(self, step: int, loss: float, lr: float, tps: float) -> None:
        pass


def eval_line(ev: dict) -> str:
    """An evaluation as one line: each part's loss and perplexity (reward accuracy for preference pairs; the mean
    held-out reward for GRPO)."""
    parts = [f"{k} loss {v['loss']:.4f} " + (f"reward accuracy {v['reward_accuracy']:.3f}" if k == "preference"
                                              else f"ppl {v['ppl']:.2f}")
             for k, v in ev.items() if k not in ("suite", "reward")]
    if "reward" in ev:
        m = ev["reward"]["mean"]
        parts.append(f"held-out reward {'-' if m is None else f'{m:.4f}'} (greedy, {ev['reward']['prompts']} prompts)")
    return ", ".join(parts)


def data_lines(stats: dict, n_val: int, objective: str, max_length: int, data_file: str | None) -> list[str]:
    """The data a run trains on, as the lines it logs (stats as data.prepare's Prepared.stats)."""
    if objective == "dpo":
        return [f"data: {stats['records']} preference records {stats['formats']}, {stats['truncated']} pairs "
                f"truncated at {max_length} tokens, {stats['dropped_no_targets']} dropped (no response token left), "
                f"{stats.get('identical', 0)} dropped (identical responses); {stats['rows']} training pairs, "
                f"{stats['target_tokens']:,} response tokens; {n_val} validation pairs"]
    if objective == "grpo":
        return [f"data: {stats['records']} prompt records, {stats['truncated']} truncated (from the left) at "
                f"{max_length} tokens; {stats['rows']} training prompts; {n_val} held out"]
    lines = [f"data: {stats.get('records')} records {stats.get('formats')}, {stats.get('empty', 0)} skipped (empty), "
             f"{stats['truncated']} truncated at {max_length} tokens, {stats['dropped_no_targets']} dropped (no "
             f"target left); {stats['rows']} training rows, {stats['target_tokens']:,} target tokens; "
             f"{n_val} validation rows"]
    if "dedup" in stats:
        d = stats["dedup"]
        lines.append(f"--dedup dropped {sum(d.values())} training records: {d['exact']} exact duplicates, "
                     f"{d['near']} near-duplicates, {d['val_overlap']} duplicating validation records")
    q = stats["quality"]
    lines.append("data quality: " + ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in q.items() if k != "records")
                 + (f" (details: python -m lora_engine.data check {data_file})" if data_file and any(
                     n for k, n in q.items() if k != "records") else ""))
    return lines


def read_metrics(path: Path, log: Callable[[str], None]) -> list[dict]:
    """The rows of metrics.jsonl. A last line that is cut short (power lost mid-write) is dropped with a note to
    `log`; a bad line before the last is a ValueError naming it (the file was damaged otherwise)."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row with a step")
        except ValueError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a metrics line ({e}); restore the file or delete the "
                                 "line") from e
            log(f"note: {path}:{i + 1} is cut short ({len(line)} characters, not a whole JSON line): dropped; it "
                "was written as the run stopped")
            break
        rows.append(row)
    return rows


def truncate_metrics(path: Path, step: int, log: Callable[[str], None]) -> None:
    """Keep the metrics of steps <= step (a resumed run rewrites what came after its checkpoint)."""
    if path.is_file():
        keep = [row for row in read_metrics(path, log) if row["step"] <= step]
        atomic.write_text(path, "".join(json.dumps(row) + "\n" for row in keep))
