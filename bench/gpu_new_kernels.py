"""The MoE and delta-rule Triton kernels against their torch paths, on the same device in the same run.

    python bench/gpu_new_kernels.py --out-dir DIR [--dry-run]

moe grouped mm: dispatch.moe_grouped_mm forward + backward (dx, dA, dB; the base W is frozen) at OLMoE-1B-7B's
  expert shapes (hidden 2048 -> FFN 1024, 64 experts, top-8 of 4,096 tokens: 32,768 routed rows, LoRA r=16),
  bf16, backend "triton" against "torch" (the per-expert reference loop under autograd): time of each,
  TFLOP/s counting 4MNK for the base (forward and dx) and 6Mr(K+N) for the adapter, and the largest
  max|a - b| / max|b| over the output and the three gradients.
delta rule: dispatch.gated_delta_rule forward + backward (dq, dk, dv, dg, dbeta) at Qwen3.5's linear-attention
  shapes (B=1, H=16, dk=dv=128) at 4,096 and 16,384 tokens, bf16 inputs, backend "triton" against "torch"
  (the chunked path): time, peak memory above the inputs, and the same relative error.
window attention: dispatch.attention forward + backward with a sliding window (W = 1,024, causal, GQA 16 query
  heads over 8, hd 128, bf16) at 4,096 and 8,192 tokens, backend "triton" (kernels/attention_triton.py's flash
  attention, which skips key blocks outside the window) against torch's SDPA under a dense (S, S) window mask:
  time, peak memory above the inputs, and the same relative error.
Times are medians of synchronized wall clock over a few calls after one warmup call (which compiles Triton).
--dry-run: tiny shapes on CPU, where Triton does not run: MoE compares the "cpp" per-expert GEMMs against
"torch", the delta rule the chunked "torch" path against the fp64 recurrence, and window attention the chunked
"torch" path against the masked SDPA; the rows say so.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from gpu_common import Rows, Timer, add_common_args, median, oom_or_error  # noqa: E402
from gpu_common import device as pick_device  # noqa: E402

from lora_engine import dispatch  # noqa: E402
from lora_engine.kernels import delta_rule_reference, moe_reference  # noqa: E402


def rel_err(got, want) -> float:
    """Largest max|a - b| / max|b| over pairs of tensors."""
    worst = 0.0
    for a, b in zip(got, want):
        a, b = a.detach().double(), b.detach().double()
        worst = max(worst, float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30))
    return worst


def fwd_bwd(fn, inputs, dy):
    """(output, grads of inputs) of one forward + backward."""
    for t in inputs:
        t.grad = None
    out = fn()
    torch.autograd.backward(out, dy.to(out.dtype), inputs=inputs)  # the fp64 recurrence returns fp64
    return [out] + [t.grad for t in inputs]


def timed(dev: str, fn, reps: int) -> tuple[float, int]:
    """(median seconds, peak bytes allocated above what was allocated before) of fn."""
    if dev == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    secs = median(Timer(dev).times(fn, reps))
    peak = torch.cuda.max_memory_allocated() - base if dev == "cuda" else 0
    return secs, peak


def moe(dev: str, tokens: int, hidden: int, ffn: int, experts: int, top_k: int, r: int, reps: int,
        backends: tuple[str, str]) -> tuple[str, dict]:
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    routed = torch.randn(tokens, experts, generator=gen).topk(top_k, dim=-1).indices
    order, counts = moe_reference.sort_by_expert(routed, experts)
    M, K, N = tokens * top_k, hidden, ffn
    x = (torch.randn(M, K, generator=gen) * 0.5).to(dev, dt).requires_grad_()
    w = (torch.randn(experts, N, K, generator=gen) * K**-0.5).to(dev, dt)
    a = (torch.randn(experts, r, K, generator=gen) * K**-0.5).to(dev, dt).requires_grad_()
    b = (torch.randn(experts, N, r, generator=gen) * r**-0.5).to(dev, dt).requires_grad_()
    dy = torch.randn(M, N, generator=gen).to(dev, dt)
    counts = counts.to(dev)
    res, secs = {}, {}
    for be in backends:
        def step(be=be):
            return fwd_bwd(lambda: dispatch.moe_grouped_mm(x, counts, w, None, a, b, 2.0, backend=be), [x, a, b], dy)
        res[be] = [t.clone() for t in step()]
        secs[be] = timed(dev, step, reps)[0]
    err = rel_err(res[backends[0]], res[backends[1]])
    flop = 4 * M * N * K + 6 * M * r * (K + N)
    tf = {be: flop / s / 1e12 for be, s in secs.items()}
    new, ref = backends
    text = (f"MoE grouped mm fwd+bwd, {tokens:,} tokens top-{top_k} of {experts} experts, {K}->{N}, r={r}, bf16: "
            f"{new} {secs[new] * 1e3:.2f} ms ({tf[new]:.3g} TFLOP/s) vs {ref} {secs[ref] * 1e3:.2f} ms "
            f"({tf[ref]:.3g} TFLOP/s) = {secs[ref] / secs[new]:.2f}x; max rel err of out and grads {err:.2g}")
    if "triton" not in backends:
        text += " (CPU: Triton does not run here, so the cpp per-expert GEMMs stand in for it)"
    return text, {"ms": {k: v * 1e3 for k, v in secs.items()}, "tflops": tf, "rel_err": err}


def delta_rule(dev: str, seq: int, heads: int, dk: int, reps: int, dry_run: bool) -> tuple[str, dict]:
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    shape = (1, seq, heads)
    q = torch.nn.functional.normalize(torch.randn(*shape, dk, generator=gen), dim=-1).to(dev, dt).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(*shape, dk, generator=gen), dim=-1).to(dev, dt).requires_grad_()
    v = torch.randn(*shape, dk, generator=gen).to(dev, dt).requires_grad_()
    g = torch.nn.functional.logsigmoid(torch.randn(*shape, generator=gen) + 4).to(dev, dt).requires_grad_()
    beta = torch.sigmoid(torch.randn(*shape, generator=gen)).to(dev, dt).requires_grad_()
    dy = torch.randn(*shape, dk, generator=gen).to(dev, dt)
    inputs = [q, k, v, g, beta]
    runs = {"torch chunked": lambda: dispatch.gated_delta_rule(q, k, v, g, beta, backend="torch")[0]}
    if dry_run:
        runs["fp64 recurrence"] = lambda: delta_rule_reference.gated_delta_rule_recurrent(q, k, v, g, beta)[0]
        new, ref = "torch chunked", "fp64 recurrence"
    else:
        runs["triton"] = lambda: dispatch.gated_delta_rule(q, k, v, g, beta, backend="triton")[0]
        new, ref = "triton", "torch chunked"
    res, secs, peak = {}, {}, {}
    for name in (new, ref):
        def step(name=name):
            return fwd_bwd(runs[name], inputs, dy)
        res[name] = [t.clone() for t in step()]
        secs[name], peak[name] = timed(dev, step, reps)
    err = rel_err(res[new], res[ref])
    gib = {n: p / 2**30 for n, p in peak.items()}
    text = (f"gated delta rule fwd+bwd, B=1 H={heads} dk=dv={dk}, {seq:,} tokens, bf16 inputs: {new} "
            f"{secs[new] * 1e3:.2f} ms, peak {gib[new]:.2f} GiB vs {ref} {secs[ref] * 1e3:.2f} ms, peak "
            f"{gib[ref]:.2f} GiB = {secs[ref] / secs[new]:.2f}x; max rel err of out and grads {err:.2g}")
    if dry_run:
        text += " (CPU: Triton does not run here, so the chunked path is checked against the recurrence)"
    return text, {"ms": {n: s * 1e3 for n, s in secs.items()}, "peak_gib": gib, "rel_err": err}


def window_attention(dev: str, seq: int, window: int, heads: int, kv_heads: int, hd: int, reps: int,
                     dry_run: bool) -> tuple[str, dict]:
    dt = torch.bfloat16
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, heads, seq, hd, generator=gen).to(dev, dt).requires_grad_()
    k, v = (torch.randn(1, kv_heads, seq, hd, generator=gen).to(dev, dt).requires_grad_() for _ in range(2))
    dy = torch.randn(1, heads, seq, hd, generator=gen).to(dev, dt)
    pos = torch.arange(seq, device=dev)
    mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - window)  # (S, S): what a dense path pays

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    new = "torch chunks" if dry_run else "triton"
    runs = {"sdpa masked": sdpa,
            new: lambda: dispatch.attention(q, k, v, True, None, backend="torch" if dry_run else "triton",
                                            window=window)}
    res, secs, peak = {}, {}, {}
    for name in (new, "sdpa masked"):
        def step(name=name):
            return fwd_bwd(runs[name], [q, k, v], dy)
        res[name] = [t.clone() for t in step()]
        secs[name], peak[name] = timed(dev, step, reps)
    err = rel_err(res[new], res["sdpa masked"])
    gib = {n: p / 2**30 for n, p in peak.items()}
    text = (f"window attention fwd+bwd, W={window} H={heads}/{kv_heads} hd={hd}, {seq:,} tokens, bf16: {new} "
            f"{secs[new] * 1e3:.2f} ms, peak {gib[new]:.2f} GiB vs SDPA with an (S, S) window mask "
            f"{secs['sdpa masked'] * 1e3:.2f} ms, peak {gib['sdpa masked']:.2f} GiB = "
            f"{secs['sdpa masked'] / secs[new]:.2f}x; max rel err of out and grads {err:.2g}")
    if dry_run:
        text += " (CPU: Triton does not run here, so the chunked torch path stands in)"
    return text, {"ms": {n: s * 1e3 for n, s in secs.items()}, "peak_gib": gib, "rel_err": err}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    dev = pick_device(a.dry_run)
    rows = Rows(a.out_dir, "gpu-new-kernels", a.dry_run)
    reps = 2 if a.dry_run else a.reps
    failed = 0
    try:
        if a.dry_run:
            text, vals = moe(dev, 32, 64, 48, 8, 2, 4, reps, ("cpp", "torch"))
        else:
            text, vals = moe(dev, 4096, 2048, 1024, 64, 8, 16, reps, ("triton", "torch"))
        rows.add("moe grouped mm", text, **vals)
    except Exception as e:  # noqa: BLE001  (the delta rule still runs)
        rows.add("moe grouped mm", "MoE grouped mm", ok=False, why=oom_or_error(e))
        failed = 1
    for seq in (48,) if a.dry_run else (4096, 16384):
        try:
            if a.dry_run:
                text, vals = delta_rule(dev, seq, 2, 16, reps, True)
            else:
                text, vals = delta_rule(dev, seq, 16, 128, reps, False)
            rows.add("delta rule", text, seq=seq, **vals)
        except Exception as e:  # noqa: BLE001  (the next length still runs)
            rows.add("delta rule", f"gated delta rule at {seq:,} tokens", ok=False, why=oom_or_error(e))
            failed = 1
        if dev == "cuda":
            torch.cuda.empty_cache()
    for seq in (48,) if a.dry_run else (4096, 8192):
        try:
            if a.dry_run:
                text, vals = window_attention(dev, seq, 8, 2, 1, 16, reps, True)
            else:
                text, vals = window_attention(dev, seq, 1024, 16, 8, 128, reps, False)
            rows.add("window attention", text, seq=seq, **vals)
        except Exception as e:  # noqa: BLE001  (the next length still runs)
            rows.add("window attention", f"window attention at {seq:,} tokens", ok=False, why=oom_or_error(e))
            failed = 1
        if dev == "cuda":
            torch.cuda.empty_cache()
    sys.exit(failed)


if __name__ == "__main__":
    main()
