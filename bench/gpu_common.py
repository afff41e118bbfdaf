"""What the GPU-check steps (bench/gpu_*.py, run by bench/gpu_check.sh) share: the model shapes, random
weights that two implementations can both hold, a timer, and the rows each step writes as it measures.

Weights: every tensor is drawn from a generator seeded by its name (`fill_by_name`), so our model and
transformers' model, built apart in one process, hold the same numbers without either holding both, and
an 8B-shaped model costs no download. --dry-run (every step on CPU at tiny shapes) checks the steps'
code while no GPU is lent; its rows say so and are never written into bench/results/.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from plan_table import MODELS  # noqa: E402
from train_step import TARGETS  # noqa: E402,F401  (the CPU benchmark's seven projections)

GiB = 2**30
# SmolLM2-135M's published config.json (the embedded model's shape).
SMOLLM2_135M = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_act": "silu",
                "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}}
# Tiny stand-ins for --dry-run: the same families of options (an untied 8B-like head, a tied 135M-like one).
TINY = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
SHAPES = {"Llama-3.1-8B": MODELS["Llama-3.1-8B"], "SmolLM2-135M": SMOLLM2_135M}
DRY_SHAPES = {"Llama-3.1-8B": {**TINY, "tie_word_embeddings": False},
              "SmolLM2-135M": {**TINY, "tie_word_embeddings": True}}


def shapes(dry_run: bool) -> dict:
    return DRY_SHAPES if dry_run else SHAPES


def device(dry_run: bool) -> str:
    if dry_run:
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible: run with --dry-run to check the script on a CPU")
    return "cuda"


@torch.no_grad()
def fill_by_name(named_tensors, scale: float = 0.02) -> None:
    """Matrices ~ N(0, scale) and vectors = 1 (RMSNorm weights), each from a generator seeded by its name."""
    for name, t in named_tensors:
        g = torch.Generator(device=t.device).manual_seed(zlib.crc32(name.encode()))
        if t.dim() > 1:
            t.copy_(torch.randn(t.shape, generator=g, device=t.device, dtype=torch.float32) * scale)
        else:
            t.fill_(1.0)


def hf_config(hf: dict):
    """transformers' LlamaConfig of a config.json dict (rope_parameters in transformers 5, rope_scaling in 4)."""
    import transformers as tf

    d = dict(hf)
    if int(tf.__version__.split(".")[0]) < 5:
        rope = dict(d.pop("rope_parameters"))
        d["rope_theta"] = rope.pop("rope_theta")
        d["rope_scaling"] = None if rope.get("rope_type") == "default" else rope
    return tf.LlamaConfig(**d)


class Timer:
    """fn -> list of seconds per call. CUDA: synchronized wall time; CPU: perf_counter."""

    def __init__(self, dev: str):
        self.dev = dev

    def sync(self):
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def times(self, fn, reps: int, warmup: int = 1) -> list[float]:
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            out.append(time.perf_counter() - t0)
        return out


def median(xs) -> float:
    return statistics.median(xs)


class Rows:
    """Rows of one step, appended to DIR/gpu_rows.jsonl and printed the moment each is measured (a time limit
    that stops the step keeps what came before). Each row has "step", "claim" (an id of gpu_claims.CLAIMS or
    None) and "status": "measured" for a GPU figure, "dry-run" for a CPU check at tiny shapes, or
    "failed: why"."""

    def __init__(self, out_dir: str, step: str, dry_run: bool):
        self.path = Path(out_dir) / "gpu_rows.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step, self.dry_run = step, dry_run

    def add(self, claim: str | None, text: str, ok: bool = True, why: str = "", **values):
        status = ("dry-run" if self.dry_run else "measured") if ok else f"failed: {why}"
        row = {"step": self.step, "claim": claim, "status": status, "text": text, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{self.step}] {status}: {text}", flush=True)


def add_common_args(ap) -> None:
    ap.add_argument("--out-dir", required=True, help="folder of gpu_rows.jsonl")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 1-2 steps: checks the code only")


def oom_or_error(e: BaseException) -> str:
    """One line for a row: the exception's type and first line."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first[:160]}"
