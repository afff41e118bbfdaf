"""The embedded GRPO demonstration, measured: `python -m lora_engine.train --objective grpo` (no other flag)
run in a subprocess and timed, its held-out reward before and after and its per-step reward read back from
run.json and metrics.jsonl, appended to bench/results/grpo_demo.md with the machine, git revision and load.

    python bench/grpo_demo.py [--out runs/grpo-demo]
    python bench/grpo_demo.py --record RUN_DIR --wall SECONDS   # a run made already by the same command

The load average matters on a shared machine: the run's wall time scales with the CPU it is given.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_model, header_lines, machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "grpo_demo.md"
COMMAND = [sys.executable, "-m", "lora_engine.train", "--objective", "grpo"]


def run(out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of the demo command writing to `out`."""
    t = time.perf_counter()
    subprocess.run([*COMMAND, "--out", str(out), "--overwrite"], check=True)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t, usage.ru_utime + usage.ru_stime


def report(run_dir: Path, wall: float, cpu: float | None) -> list[str]:
    manifest = json.loads((run_dir / "run.json").read_text())
    if manifest["status"] != "completed":
        raise SystemExit(f"{run_dir}: the run is {manifest['status']}, not completed")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    before, after = manifest["eval"]["before"]["reward"], manifest["eval"]["after"]["reward"]
    info = machine()
    info["cpu_model"] = cpu_model()
    info["load_average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    cfg = manifest["config"]
    info["setting"] = (f"{cfg['max_steps']} steps x {cfg['batch_size']} prompts x {cfg['num_generations']} "
                       f"completions of <= {cfg['max_completion_length']} tokens, lr {cfg['lr']}, reward "
                       f"{cfg['reward']}, precision {manifest['precision']['compute']}")
    quarter = max(1, len(rows) // 4)
    mean = lambda rs: sum(r["reward"] for r in rs) / len(rs)  # noqa: E731
    lines = [f"## {info['date']}", "", *header_lines(info), "",
             "| | before | after |", "|---|---|---|",
             f"| held-out reward (greedy, {after['prompts']} prompts) | {before['mean']:.3f} | {after['mean']:.3f} |"]
    for name in after["per_function"]:
        lines.append(f"| {name} | {before['per_function'][name]:.3f} | {after['per_function'][name]:.3f} |")
    lines += ["", f"- rollout reward, mean of the first {quarter} steps: {mean(rows[:quarter]):.3f}; of the last "
                  f"{quarter}: {mean(rows[-quarter:]):.3f}",
              f"- completion length (tokens), first step: {rows[0]['completions/mean_length']:.2f}; last: "
              f"{rows[-1]['completions/mean_length']:.2f}",
              f"- wall {int(wall // 60)}:{int(wall % 60):02d} (model load, both evaluations with the forgetting "
              f"check, {len(rows)} steps)" + (f", CPU {cpu:.0f} s" if cpu is not None else ""), ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/grpo-demo")
    ap.add_argument("--record", help="record this finished run of the same command instead of running it")
    ap.add_argument("--wall", type=float, help="with --record: the run's wall seconds")
    ap.add_argument("--cpu", type=float, help="with --record: the run's CPU seconds (user + system)")
    a = ap.parse_args()
    if a.record:
        if a.wall is None:
            ap.error("--record needs --wall")
        run_dir, wall, cpu = Path(a.record), a.wall, a.cpu
    else:
        run_dir = Path(a.out)
        wall, cpu = run(run_dir)
    lines = report(run_dir, wall, cpu)
    if not RESULTS.exists():
        RESULTS.write_text("# The embedded GRPO demonstration (bench/grpo_demo.py)\n\n"
                           "`python -m lora_engine.train --objective grpo`: which of two numbers is larger, reward "
                           "numeric_match + regex_match (lora_engine/data/embedded_grpo.py).\n\n")
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
