"""Load time and peak RSS of load_model on the embedded model (or --model PATH).

Each load runs in a fresh subprocess so its peak RSS is its own. We report the process's peak
RSS, the RSS right after `import torch, lora_engine` (the runtime's own share), and the growth
over that baseline, against the bytes of the weights. Target: growth <= 1.5x the weight bytes.

    python bench/load.py [--model PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import torch, lora_engine
from lora_engine.sources.embedded import resolve_path
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
folder = resolve_path(sys.argv[1])      # converts the embedded model once, outside the timing
base = rss_mb()
t = time.perf_counter()
model = lora_engine.load_model(sys.argv[1])
dt = time.perf_counter() - t
weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": dt, "base_mb": base, "peak_mb": peak, "weights_mb": weights / 2**20}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "load.md"))
    a = ap.parse_args()
    runs = []
    for _ in range(a.repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, a.model], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"load failed:\n{out.stderr}")
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    secs = sorted(r["seconds"] for r in runs)
    r0 = runs[0]
    growth = statistics.median(r["peak_mb"] - r["base_mb"] for r in runs)
    ratio = growth / r0["weights_mb"]
    lines = [
        f"# load_model: {a.model}", "", *header_lines(machine()), "",
        "| weights MB | load s (median) | load s (min..max) | baseline RSS MB | peak RSS MB | growth MB | growth / weights |",
        "|---|---|---|---|---|---|---|",
        f"| {r0['weights_mb']:.0f} | {statistics.median(secs):.2f} | {secs[0]:.2f}..{secs[-1]:.2f} | "
        f"{r0['base_mb']:.0f} | {statistics.median(r['peak_mb'] for r in runs):.0f} | {growth:.0f} | {ratio:.2f}x |",
        "",
        f"Target: growth <= 1.5x the weights: {'met' if ratio <= 1.5 else 'NOT met'}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
