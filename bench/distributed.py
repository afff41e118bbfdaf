"""Training throughput and peak memory per rank, 1 process against 2 under torchrun (DDP and FSDP).

    python bench/distributed.py [--model FOLDER] [--steps 8] [--batch-size 4] [--max-length 128]

Validates, then times: each run is the real `python -m lora_engine.train` (through loop.run), one
global batch of 2 x batch-size rows a step in every configuration (1 process: --grad-accum 2; 2
processes: --grad-accum 1), so the losses of the configurations must agree (checked before any
number is reported). tokens/s is the median (and min-max) over the steps after the first;
peak memory per rank is each process's peak RSS on CPU, torch.cuda.max_memory_allocated on a GPU.
Default model: a random 4-layer Llama (hidden 256) built here, so nothing is downloaded. Results
go to bench/results/distributed.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def worker(argv: list[str], report: Path) -> None:
    """One rank: the training run, then its peak memory into report-<rank>.json."""
    import torch

    from lora_engine.cli import parse
    from lora_engine.train.config import TrainConfig
    from lora_engine.train.loop import run

    cfg, explicit = parse(TrainConfig, argv, "bench", "")
    run(cfg, explicit, log=lambda *_: None)
    rank = int(os.environ.get("RANK", 0))
    peak = (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    (report.parent / f"{report.name}-{rank}.json").write_text(json.dumps({"rank": rank, "peak_bytes": peak}))


def _model(folder: Path) -> Path:
    import torch
    import transformers as tf

    sys.path.insert(0, str(ROOT))
    from tests.test_train_support import save_tokenizer_files

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    return save_tokenizer_files(folder)


def _data(path: Path) -> Path:
    from tests.test_train_support import chat_records, write_jsonl

    return write_jsonl(path, chat_records(200))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: a random 4-layer Llama built here)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        report, *argv = a.worker
        return worker(argv, Path(report))
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    model = Path(a.model) if a.model else _model(tmp / "model")
    data = _data(tmp / "data.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    rows, losses = [], {}
    for name, procs, extra in (("1 process", 1, ["--grad-accum", "2"]), ("2 x DDP", 2, ["--distributed", "ddp"]),
                               ("2 x FSDP", 2, ["--distributed", "fsdp"])):
        out = tmp / name.replace(" ", "")
        argv = ["--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", str(a.steps),
                "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--save-every", "0",
                "--eval-every", "0", "--no-general-eval", "--no-plot", "--precision", "fp32", *extra]
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)] \
            if procs > 1 else [sys.executable]
        cmd = [*launch, str(Path(__file__).resolve()), "--worker", str(tmp / f"mem{procs}{name[-4:]}"), *argv]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"{name} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [m["loss"] for m in metrics]
        tps = [m["tokens_per_s"] for m in metrics[1:]]
        peaks = sorted(json.loads(f.read_text())["peak_bytes"] / 2**20
                       for f in tmp.glob(f"mem{procs}{name[-4:]}-*.json"))
        rows.append({"run": name, "processes": procs, "tokens/s median": statistics.median(tps),
                     "tokens/s min": min(tps), "tokens/s max": max(tps),
                     "peak MiB per rank": " / ".join(f"{x:.0f}" for x in peaks)})
    ref = losses["1 process"]
    for name, ls in losses.items():  # validate before reporting
        bad = [i for i, (x, y) in enumerate(zip(ls, ref, strict=True)) if abs(x - y) > 1e-4 * abs(y)]
        if bad:
            sys.exit(f"{name}: losses differ from 1 process at steps {bad}: {ls} vs {ref}")
    print("All losses match 1 process with --grad-accum 2.")
    info = machine()
    info.update(model=str(a.model or "random Llama 4 x 256 (bench-built)"), steps=a.steps,
                global_batch=f"2 x {a.batch_size} rows of <= {a.max_length} tokens",
                omp_threads=env["OMP_NUM_THREADS"])
    results = ROOT / "bench/results"
    (results / "distributed.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    lines = ["# Distributed training: 1 process against 2 (torchrun, CPU gloo)", "", *header_lines(info), "",
             *markdown_table(rows, ".4g"), "",
             "Peak memory is each rank's peak RSS (the whole process: torch, Python, data) on CPU. Every rank runs "
             "OMP_NUM_THREADS threads, so 2 processes use twice the cores of 1; on a shared machine the ratios are "
             "noisy. The model is small enough that every rank's RSS is mostly torch itself: FSDP's saving of the "
             "sharded base shows on models whose weights dominate."]
    (results / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
