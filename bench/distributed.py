"""Training throughput and peak memory per rank, 1 process against 2 under torchrun (DDP and FSDP).

    python bench/distributed.py [--model FOLDER|smollm2-135m-instruct] [--steps 8] [--batch-size 4] [--max-length 128]

Validates, then times: each run is the real `python -m lora_engine.train` (through loop.run), one
global batch of 2 x batch-size rows a step in every configuration (1 process: --grad-accum 2; 2
processes: --grad-accum 1), so the losses of the configurations must agree (checked before any
number is reported). tokens/s is the median (and min-max) over the steps after the first;
peak memory per rank is each process's peak RSS on CPU, torch.cuda.max_memory_allocated on a GPU.
Default model: a random 4-layer Llama (hidden 256) built here, so nothing is downloaded. Results
go to bench/results/distributed.md and .json.

What sharding saves, per rank (RSS is mostly torch itself at these sizes): a second launch of each
configuration (`--memory-worker`) builds the same LoRA/QLoRA model, prepares it as train does
(train/distributed.py prepare: replicated, or sharded by train/fsdp.py) and runs two train_step calls
on one full batch-size x max-length batch per rank, counted by train/memory.py's StorageTracker:
the frozen-parameter bytes the rank holds (fsdp.local_parameter_bytes) and its peak of live tensor
bytes. Beside them, the plan's per-rank peak of the same step (python -m lora_engine.plan
--world-size N --distributed ..., --device cpu, fp32).
"""

from __future__ import annotations

import argparse
import contextlib
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

from lora_engine import plan as P  # noqa: E402

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


def memory_worker(model_name: str, quantize: str, strategy: str, batch_size: int, seq_len: int, report: Path) -> None:
    """One rank: frozen bytes held and the peak of live tensor bytes of two train_step calls."""
    import torch

    from lora_engine import plan as P
    from lora_engine.loading import load_model
    from lora_engine.train import step as trainer
    from lora_engine.train.distributed import Dist, prepare
    from lora_engine.train.fsdp import local_parameter_bytes
    from lora_engine.train.memory import StorageTracker

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dist = Dist(strategy, rank, world, rank, "gloo") if world > 1 else Dist()
    if world > 1:
        torch.distributed.init_process_group("gloo")
    try:
        cfg = P.PlanConfig(model=model_name, seq_len=seq_len, batch_size=batch_size, quantize=quantize,
                           precision="fp32", device="cpu")
        torch.manual_seed(0)
        model, _, amp = P.build(cfg, load_model(model_name, dtype=torch.float32, verbose=False))
        model = prepare(dist, model)
        opt = trainer.make_optimizer(model, lr=1e-4)
        sched = trainer.make_scheduler(opt, 0, 10)
        batch = P.batch_of(batch_size, seq_len, model.config.vocab_size)
        tracker = StorageTracker()
        with tracker, tracker.follow_fsdp_resizes() if strategy == "fsdp" else contextlib.nullcontext():
            tracker.track_model(model, opt)
            for _ in range(2):
                trainer.train_step(model, opt, sched, [batch], amp=amp, sync=dist if dist.active else None)
        held = local_parameter_bytes(model)
        (report.parent / f"{report.name}-{rank}.json").write_text(json.dumps(
            {"rank": rank, "frozen_bytes": held["frozen"], "peak_live_bytes": tracker.report().peak_bytes}))
    finally:
        dist.close()


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
    sys.path.insert(0, str(ROOT))  # tests/ helpers, also when --model skips _model
    from tests.test_train_support import chat_records, write_jsonl

    return write_jsonl(path, chat_records(200))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: a random 4-layer Llama built here)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", nargs=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        report, *argv = a.worker
        return worker(argv, Path(report))
    if a.memory_worker is not None:
        name, quantize, strategy, bs, n, report = a.memory_worker
        return memory_worker(name, quantize, strategy, int(bs), int(n), Path(report))
    tmp = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    model = Path(a.model) if a.model else _model(tmp / "model")
    data = _data(tmp / "data.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}
    rows, losses = [], {}
    runs = (("1 process", 1, "none", "none", ["--grad-accum", "2"]),
            ("2 x DDP", 2, "none", "ddp", ["--distributed", "ddp"]),
            ("2 x FSDP", 2, "none", "fsdp", ["--distributed", "fsdp"]),
            ("QLoRA 1 process", 1, "nf4", "none", ["--grad-accum", "2", "--quantize", "nf4"]),
            ("QLoRA 2 x FSDP", 2, "nf4", "fsdp", ["--distributed", "fsdp", "--quantize", "nf4"]))
    model_name = str(model)
    for name, procs, quantize, strategy, extra in runs:
        tag = name.replace(" ", "")
        out = tmp / tag
        argv = ["--model", model_name, "--data", str(data), "--out", str(out), "--max-steps", str(a.steps),
                "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--save-every", "0",
                "--eval-every", "0", "--no-general-eval", "--no-plot", "--precision", "fp32", *extra]
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)] \
            if procs > 1 else [sys.executable]
        for cmd in ([*launch, str(Path(__file__).resolve()), "--worker", str(tmp / f"rss-{tag}"), *argv],
                    [*launch, str(Path(__file__).resolve()), "--memory-worker", model_name, quantize, strategy,
                     str(a.batch_size), str(a.max_length), str(tmp / f"live-{tag}")]):
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode:
                sys.exit(f"{name} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [m["loss"] for m in metrics]
        tps = [m["tokens_per_s"] for m in metrics[1:]]
        rss = sorted(json.loads(f.read_text())["peak_bytes"] / 2**20 for f in tmp.glob(f"rss-{tag}-*.json"))
        live = [json.loads(f.read_text()) for f in sorted(tmp.glob(f"live-{tag}-*.json"))]
        plan = P.plan_step(P.PlanConfig(model=model_name, seq_len=a.max_length, batch_size=a.batch_size,
                                        quantize=quantize, precision="fp32", device="cpu", world_size=procs,
                                        distributed=None if procs == 1 else strategy))
        mib = 2**20
        rows.append({"run": name, "processes": procs, "tokens/s median": statistics.median(tps),
                     "tokens/s min": min(tps), "tokens/s max": max(tps),
                     "peak RSS MiB per rank": " / ".join(f"{x:.0f}" for x in rss),
                     "frozen MiB held per rank": " / ".join(f"{x['frozen_bytes'] / mib:.1f}" for x in live),
                     "peak live tensors MiB per rank": " / ".join(f"{x['peak_live_bytes'] / mib:.1f}" for x in live),
                     "planned peak MiB per rank": f"{plan['peak_bytes'] / mib:.1f}"})
    ref = {"none": losses["1 process"], "nf4": losses["QLoRA 1 process"]}
    for (name, _, quantize, _, _), ls in zip(runs, losses.values(), strict=True):  # validate before reporting
        bad = [i for i, (x, y) in enumerate(zip(ls, ref[quantize], strict=True)) if abs(x - y) > 1e-4 * abs(y)]
        if bad:
            sys.exit(f"{name}: losses differ from 1 process at steps {bad}: {ls} vs {ref[quantize]}")
    print("All losses match 1 process with --grad-accum 2 (LoRA and QLoRA each).")
    info = machine()
    info.update(model=str(a.model or "random Llama 4 x 256 (bench-built)"), steps=a.steps,
                memory_batch=f"{a.batch_size} x {a.max_length} tokens per rank, every token a target",
                global_batch=f"2 x {a.batch_size} rows of <= {a.max_length} tokens",
                omp_threads=env["OMP_NUM_THREADS"])
    results = ROOT / "bench/results"
    (results / "distributed.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    lines = ["# Distributed training: 1 process against 2 (torchrun, CPU gloo)", "", *header_lines(info), "",
             *markdown_table(rows, ".4g"), "",
             "Peak RSS is each rank's whole process (torch, Python, data) on CPU, mostly torch itself at this size. "
             "Every rank runs OMP_NUM_THREADS threads, so 2 processes use twice the cores of 1; on a shared machine "
             "the tokens/s ratios are noisy. Frozen MiB held and peak live tensors are from a second launch of "
             "each configuration (two train_step calls on one full batch per rank, StorageTracker; see the "
             "script's docstring); the planned peak is `python -m lora_engine.plan --world-size N` of the same "
             "step on fake tensors (fp32, --device cpu)."]
    (results / "distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
