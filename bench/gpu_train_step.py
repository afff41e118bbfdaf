"""The end-to-end training step on a GPU, ours against transformers + PEFT built from the same random weights.

    python bench/gpu_train_step.py --out-dir DIR [--dry-run] [--reps 3]

Models: Llama-3.1-8B- and SmolLM2-135M-shaped (published config.json numbers, weights drawn by name,
gpu_common.fill_by_name, so both sides hold the same numbers and nothing is downloaded). Methods: LoRA on a
bf16 base and QLoRA on NF4 (double quantization, 64-blocks); r=16, alpha 32 on all seven projections, fp32
adapters with the same A (drawn by module name) and B = 0, AdamW lr 1e-4, gradient clipping at 1.0, bf16
autocast, gradient checkpointing on both sides. Batch: 2 x 2048 (Unsloth's published setting) and 1 x 2048
(a packed 2,048-token row, torchtune's; every token a target). Each side is built once per model and method and
runs the two batches in turn: the second's parity is after the first's 1 + --reps steps, the same on both.

Peers: LoRA against transformers + PEFT. QLoRA against transformers + PEFT over bitsandbytes' Linear4bit when
bitsandbytes imports and quantizes here; otherwise against our own dequantize-then-matmul path (the torch
reference backend: NF4 dequantized to bf16, then cuBLAS), and the row says which. The first step of each
side gives the loss and gradient norm (before clipping) of the same batch, printed beside the speed: a speed
figure whose loss disagrees is not the same step. Speed: median tokens/s over --reps timed steps after one
warm-up; memory: torch.cuda.max_memory_allocated over the steps (weights included).
"""

from __future__ import annotations

import argparse
import gc
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from gpu_common import (  # noqa: E402
    TARGETS,
    GiB,
    Rows,
    Timer,
    add_common_args,
    fill_by_name,
    hf_config,
    median,
    oom_or_error,
    shapes,
)
from gpu_common import device as pick_device  # noqa: E402

from lora_engine import dispatch  # noqa: E402
from lora_engine import plan as P  # noqa: E402
from lora_engine.models.config import ModelConfig  # noqa: E402
from lora_engine.train import step as trainer  # noqa: E402

SETTINGS = ((2, 2048, "bs 2 x 2048 (Unsloth)"), (1, 2048, "packed 1 x 2048, one full row (torchtune)"))
DRY_SETTINGS = ((2, 32, "bs 2 x 32 (dry run)"), (1, 32, "packed 1 x 32 (dry run)"))


def _fill_lora_A(pairs) -> None:
    """A of every adapter drawn by its module's name (kaiming-like scale), so both sides start alike."""
    for name, a in pairs:
        fill_by_name([(name + ".lora_A", a)], scale=a.shape[1] ** -0.5)


def _batch(bs: int, seq: int, vocab: int, dev: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (bs, seq), generator=g)
    return {"input_ids": ids.to(dev), "labels": ids.clone().to(dev)}


def ours(name: str, hf: dict, quantize: str, dev: str, backend: str | None = None):
    """(one-step closure returning (loss, grad_norm), label). Our model as `train` builds it (plan.build)."""
    cfg = P.PlanConfig(model=name, quantize=quantize, r=16, precision="bf16", device=dev,
                       gradient_checkpointing=True)
    model = P.meta_model(cfg, ModelConfig.from_hf(hf)).to_empty(device=dev)
    model.tie_weights()
    model.reset_buffers()
    fill_by_name(model.named_parameters())
    model, opt, amp = P.build(cfg, model)
    if backend is not None:
        dispatch.set_backend(model, backend)
    _fill_lora_A((n, m.lora_A) for n, m in model.named_modules() if hasattr(m, "lora_A"))
    sched = trainer.make_scheduler(opt, 0, 1000)

    def step(batch):
        r = trainer.train_step(model, opt, sched, [batch], amp=amp)
        return r.loss, r.grad_norm

    return step, "ours" + (f" ({backend} backend)" if backend else "")


def _hf_model(hf: dict, dev: str):
    import transformers as tf

    with torch.device(dev):
        try:
            return tf.AutoModelForCausalLM.from_config(hf_config(hf), dtype=torch.bfloat16)
        except TypeError:  # transformers 4 names it torch_dtype
            return tf.AutoModelForCausalLM.from_config(hf_config(hf), torch_dtype=torch.bfloat16)


def _to_bnb(model, dev: str) -> None:
    """Every target nn.Linear swapped for bitsandbytes' NF4 Linear4bit (double quantization, 64-blocks, bf16
    compute), quantized from the same bf16 weight: QLoRA as transformers' BitsAndBytesConfig loads it."""
    import bitsandbytes as bnb

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in TARGETS and isinstance(child, torch.nn.Linear):
                q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(child.weight.data.contiguous(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4", blocksize=64)
                setattr(parent, child_name, q.to(dev))


def peer(hf: dict, quantize: str, dev: str, bnb: bool = True):
    """transformers + PEFT (over bitsandbytes for nf4) from the same weights: (step closure, label)."""
    import peft

    if quantize == "nf4":  # before the model is built: a missing bitsandbytes costs nothing
        if not bnb:
            raise ImportError("--no-bitsandbytes")
        import bitsandbytes  # noqa: F401
    model = _hf_model(hf, dev)
    fill_by_name(model.named_parameters())
    label = "transformers + PEFT"
    if quantize == "nf4":
        _to_bnb(model, dev)  # ImportError/RuntimeError: the caller falls back to our dequantize-then-matmul
        label += " + bitsandbytes"
    model.config.use_cache = False
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS),
                                                       lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    prefix = "base_model.model."
    _fill_lora_A((n[len(prefix):], m.lora_A["default"].weight) for n, m in model.named_modules()
                 if hasattr(m, "lora_A") and isinstance(m.lora_A, torch.nn.ModuleDict) and "default" in m.lora_A)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step(batch):
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), float(norm)

    return step, label


def measure(make, batches: list[dict], timer: Timer, reps: int) -> list[dict]:
    """Build one side once; per batch shape its first step (loss, grad norm: the parity figures, and the warm-up)
    and `reps` timed steps, with the peak memory of those steps. The model is freed on return."""
    dev = timer.dev
    if dev == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    step, label = make()
    out = []
    for batch in batches:
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        loss, norm = step(batch)
        times = timer.times(partial(step, batch), reps, warmup=0)
        peak = torch.cuda.max_memory_allocated() / GiB if dev == "cuda" else float("nan")
        out.append({"label": label, "loss": loss, "grad_norm": norm, "s": median(times),
                    "tokens_per_s": batch["input_ids"].numel() / median(times), "peak_gib": peak})
    return out


def both_sides(name: str, hf: dict, quantize: str, dev: str, batches: list[dict], timer: Timer, reps: int,
               bnb: bool) -> tuple[list[dict], list[dict]]:
    mine = measure(partial(ours, name, hf, quantize, dev), batches, timer, reps)
    theirs, why = None, None
    try:
        theirs = measure(partial(peer, hf, quantize, dev, bnb), batches, timer, reps)
    except (ImportError, RuntimeError, AttributeError, TypeError, ValueError) as e:
        if quantize != "nf4":
            raise
        why = oom_or_error(e)  # bitsandbytes absent or unable: our dequantize-then-matmul path
    if theirs is None:  # outside the except: its traceback would keep the peer's model alive
        theirs = measure(partial(ours, name, hf, quantize, dev, "torch"), batches, timer, reps)
        for r in theirs:
            r["label"] += f", dequantize then matmul (bitsandbytes peer unavailable: {why})"
    return mine, theirs


def report(rows: Rows, claim: str, what: str, mine: dict, theirs: dict, dev: str) -> None:
    dl = abs(mine["loss"] - theirs["loss"]) / abs(theirs["loss"])
    dg = abs(mine["grad_norm"] - theirs["grad_norm"]) / max(abs(theirs["grad_norm"]), 1e-12)
    # bf16 on both sides: a few bf16 roundings apart (2 * 2**-8) for the loss; the norm sums many, so twice that.
    parity = "parity ok" if dl <= 2 * 2**-8 and dg <= 4 * 2**-8 else "PARITY FAILED"
    mem = f"memory {mine['peak_gib'] / theirs['peak_gib']:.2f}x" if dev == "cuda" else "memory n/a on CPU"
    peak = lambda r: f"peak {r['peak_gib']:.2f} GiB" if dev == "cuda" else "peak n/a"  # noqa: E731
    rows.add(claim, f"{what}: ours {mine['tokens_per_s']:.0f} tokens/s, {peak(mine)}; {theirs['label']} "
             f"{theirs['tokens_per_s']:.0f} tokens/s, {peak(theirs)}; speed "
             f"{mine['tokens_per_s'] / theirs['tokens_per_s']:.2f}x, {mem}; loss {mine['loss']:.4f} vs "
             f"{theirs['loss']:.4f} (rel {dl:.1e}), grad norm {mine['grad_norm']:.4g} vs {theirs['grad_norm']:.4g} "
             f"(rel {dg:.1e}): {parity}", ours=mine, peer=theirs, parity=parity)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["SmolLM2-135M", "Llama-3.1-8B"])
    ap.add_argument("--no-bitsandbytes", action="store_true",
                    help="QLoRA peer: our dequantize-then-matmul path even where bitsandbytes imports")
    a = ap.parse_args(argv)
    dev = pick_device(a.dry_run)
    rows = Rows(a.out_dir, "train-step", a.dry_run)
    timer = Timer(dev)
    reps = 1 if a.dry_run else a.reps
    settings = DRY_SETTINGS if a.dry_run else SETTINGS
    for name in a.models:
        hf = shapes(a.dry_run)[name]
        batches = [_batch(bs, seq, hf["vocab_size"], dev) for bs, seq, _ in settings]
        for quantize, method in (("none", "LoRA bf16"), ("nf4", "QLoRA NF4")):
            claim = f"train-step {name} {method}"
            try:
                mine, theirs = both_sides(name, hf, quantize, dev, batches, timer, reps, not a.no_bitsandbytes)
            except Exception as e:  # noqa: BLE001  (one configuration's failure must not cost the others)
                rows.add(claim, f"{name} {method}", ok=False, why=oom_or_error(e))
                continue
            for (_, _, setting), m, t in zip(settings, mine, theirs):
                report(rows, claim, f"{name} {method} {setting}", m, t, dev)


if __name__ == "__main__":
    main()
