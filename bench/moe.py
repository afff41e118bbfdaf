"""One MoE layer's forward + backward on CPU at OLMoE-1B-7B's shapes: ours against transformers + PEFT.

Shapes: hidden 2048, 64 experts of FFN width 1024 (gate_up (64, 2048, 2048), down (64, 2048, 1024), 403M
frozen parameters), top-8 softmax routing without renormalisation (OLMoE's norm_topk_prob=False), LoRA r=16
alpha=32 on gate_up and down of every expert, base and router frozen, --tokens tokens in --dtype.

  ours      routing (softmax, top-k, sort_by_expert), dispatch.moe_grouped_mm for gate_up and down with the
            per-expert LoRA (CPU: one GEMM per expert over its contiguous rows, the shrink kept for
            backward, no dW), SwiGLU, combine
  peers     transformers' OlmoeSparseMoeBlock with PEFT's LoRA on the 3-D expert parameters
            (LoraConfig(target_parameters=["experts.gate_up_proj", "experts.down_proj"]), PEFT's
            ParamWrapper, which forms W_e + s B_e A_e for all 64 experts at every forward), with each of
            transformers' expert implementations: "eager" (its loop over hit experts) and "grouped_mm"
            (torch's grouped GEMM, or its fallback on CPU)

Same weights everywhere (ours are copies of the PEFT model's, the LoRA factors re-laid-out from PEFT's
(r*E, in) and (out, r*E) to (E, r, in) and (E, out, r)); lora_B is random (not PEFT's zeros) so the check
covers the LoRA path. Validated before timing: the output and the gradients of the input and of every
LoRA factor against PEFT eager. Timing: median and 20-80% spread of --repeats steps (forward, backward
of sum(out * g)) after one warm-up. Peak memory: the peak of live tensor storage during one step, counted
op by op (lora_engine/train/memory.py:StorageTracker), above what exists before it (weights, adapters,
input); workspaces an op allocates and frees inside itself are not seen (ours: one expert's (n_e, r) u).

    python bench/moe.py [--tokens 512] [--dtype bfloat16] [--repeats 3] [--grouped-mm]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import header_lines, machine, markdown_table  # noqa: E402

from lora_engine import dispatch  # noqa: E402
from lora_engine.kernels import moe_reference  # noqa: E402

HIDDEN, FFN, EXPERTS, TOP_K, RANK, ALPHA = 2048, 1024, 64, 8, 16, 32


def peft_block(dtype: torch.dtype, implementation: str, seed: int = 0):
    """OlmoeSparseMoeBlock at OLMoE-1B-7B's shapes with PEFT LoRA on its experts, weights from `seed`."""
    from peft import LoraConfig, get_peft_model
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    cfg = OlmoeConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                      norm_topk_prob=False, experts_implementation=implementation)
    torch.manual_seed(seed)
    block = OlmoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.02)  # transformers' init leaves the router at zeros: all ties
        block.experts.gate_up_proj.normal_(0, 0.02)
        block.experts.down_proj.normal_(0, 0.02)
    block = block.to(dtype)
    model = get_peft_model(block, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[],
                                             target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:  # both factors random, so the LoRA path's numbers are checked too
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _lora_of(model, which: str):
    """PEFT's (A (r*E, in), B (out, r*E)) of experts.<which> as ours: a (E, r, in), b (E, out, r)."""
    mods = {n: m for n, m in model.named_modules()}
    # PEFT nests one ParamWrapper per targeted parameter: the outer wraps the second target (down_proj).
    wrapper = mods["base_model.model.experts" + ("" if which == "down_proj" else ".base_layer")]
    A, B = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    a = A.detach().reshape(EXPERTS, RANK, A.shape[1]).clone()
    b = B.detach().reshape(B.shape[0], RANK, EXPERTS).permute(2, 0, 1).contiguous()
    return a.requires_grad_(), b.requires_grad_()


class OursMoE(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        block = model.base_model.model
        self.router = block.gate.weight.detach().clone()
        self.gate_up = block.experts.base_layer.base_layer.gate_up_proj.detach().clone()
        self.down = block.experts.base_layer.base_layer.down_proj.detach().clone()
        self.a1, self.b1 = _lora_of(model, "gate_up_proj")
        self.a2, self.b2 = _lora_of(model, "down_proj")
        self.scale = ALPHA / RANK

    def adapters(self):
        return [self.a1, self.b1, self.a2, self.b2]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # PEFT keeps the adapters in fp32 over a bf16 base; ours are fp32 too and, as in the engine's
        # training step, autocast runs the matmuls in the base's dtype (kernels/amp.py casts a and b once).
        with torch.autocast("cpu", dtype=self.gate_up.dtype, enabled=self.gate_up.dtype != torch.float32):
            return self._forward(h)

    def _forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, D = h.shape
        h = h.reshape(-1, D)
        # OLMoE's router: fp32 softmax over the logits, top-k, weights back in the logits' dtype.
        logits = F.linear(h, self.router)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
        weights, experts = torch.topk(probs, TOP_K, dim=-1)
        order, counts = moe_reference.sort_by_expert(experts, EXPERTS)
        xs = h[order // TOP_K]  # (T*k, D) grouped by expert
        gu = dispatch.moe_grouped_mm(xs, counts, self.gate_up, None, self.a1, self.b1, self.scale)
        gate, up = gu.chunk(2, dim=-1)
        y = dispatch.moe_grouped_mm(F.silu(gate) * up, counts, self.down, None, self.a2, self.b2, self.scale)
        return moe_reference.combine(y, order, weights.to(logits.dtype)).reshape(B, T, D)


def _adapters(model) -> list[torch.Tensor]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def _step(fn, params, h, g):
    out = fn(h)
    grads = torch.autograd.grad(out, [h, *params], g)
    return out, grads


def timed(fn, repeats: int) -> tuple[float, float, float]:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def peak_bytes(fn) -> int:
    from lora_engine.train.memory import StorageTracker

    tracker = StorageTracker()
    with tracker:
        fn()
    return tracker.report().peak_bytes


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--grouped-mm", action="store_true", help="also time transformers' grouped_mm experts + PEFT")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.md"))
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    h = (torch.randn(1, args.tokens, HIDDEN)).to(dtype).requires_grad_()
    g = torch.randn(1, args.tokens, HIDDEN).to(dtype)
    impls = {}
    peft_eager = peft_block(dtype, "eager")
    impls["transformers eager + PEFT"] = (peft_eager, _adapters(peft_eager))
    ours = OursMoE(peft_eager)
    # PEFT's adapters in its parameter order (the inner wrapper, gate_up, first); ours' gradients in that order.
    names = [n for n, p in peft_eager.named_parameters() if "lora_" in n]
    order = {"base_model.model.experts.base_layer.lora_A.default.weight": 0,
             "base_model.model.experts.base_layer.lora_B.default.weight": 1,
             "base_model.model.experts.lora_A.default.weight": 2, "base_model.model.experts.lora_B.default.weight": 3}
    impls["ours (moe_grouped_mm, CPU)"] = (ours, [ours.adapters()[order[n]] for n in names])
    if args.grouped_mm:
        try:
            peft_grouped = peft_block(dtype, "grouped_mm")
        except Exception as e:  # noqa: BLE001  (said on stderr; the other rows still run)
            print(f"transformers grouped_mm + PEFT unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            impls["transformers grouped_mm + PEFT"] = (peft_grouped, _adapters(peft_grouped))

    ref_out, ref_grads = _step(peft_eager, impls["transformers eager + PEFT"][1], h, g)
    checks = []
    for name, (fn, params) in impls.items():
        out, grads = _step(fn, params, h, g)
        errs = [_rel(out, ref_out)] + [_rel(_as_peft(x, y), y) for x, y in zip(grads, ref_grads)]
        checks.append({"impl": name, "rel err out": errs[0], "rel err dh": errs[1],
                       "worst rel err LoRA grads": max(errs[2:])})
        bound = 0.05 if dtype == torch.bfloat16 else 1e-4
        if max(errs) > bound:
            raise SystemExit(f"{name} disagrees with transformers + PEFT: relative errors {errs}; not timing it")
    print("All results match. Starting benchmarks.", file=sys.stderr)

    rows = []
    for name, (fn, params) in impls.items():
        med, lo, hi = timed(lambda fn=fn, params=params: _step(fn, params, h, g), args.repeats)
        peak = peak_bytes(lambda fn=fn, params=params: _step(fn, params, h, g))
        rows.append({"impl": name, "tokens/s": args.tokens / med, "step ms": med * 1e3, "ms p20": lo * 1e3,
                     "ms p80": hi * 1e3, "peak live MiB above weights": peak / 2**20})
        print(rows[-1], file=sys.stderr)
    base = next(r for r in rows if r["impl"].startswith("transformers eager"))
    for r in rows:
        r["speed vs eager+PEFT"] = f"{r['tokens/s'] / base['tokens/s']:.2f}x"

    info = machine()
    lines = ["# MoE layer forward + backward on CPU (OLMoE-1B-7B shapes)", "", *header_lines(info), "",
             f"hidden {HIDDEN}, {EXPERTS} experts of FFN {FFN}, top-{TOP_K} (no renormalisation), LoRA r={RANK} "
             f"alpha={ALPHA} on every expert's gate_up and down (PEFT target_parameters), base and router frozen, "
             f"{args.tokens} tokens, {args.dtype}, {args.repeats} timed steps after one warm-up "
             f"(`python bench/moe.py --tokens {args.tokens} --dtype {args.dtype} --repeats {args.repeats}`).", "",
             "## Check against transformers eager + PEFT (relative L2 error)", "", *markdown_table(checks), "",
             "## Speed and memory", "", *markdown_table(rows, ".4g"), "",
             "Peak live MiB: the peak of tensor storage alive during one step above what existed before it "
             "(StorageTracker, op by op). PEFT's ParamWrapper forms W_e + s B_e A_e for all 64 experts at every "
             "forward (and keeps them for backward); ours never forms it, and computes no weight gradient."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _as_peft(ours_grad: torch.Tensor, peft_grad: torch.Tensor) -> torch.Tensor:
    """Our (E, r, in) / (E, out, r) gradient in PEFT's (r*E, in) / (out, r*E) layout (h's passes through)."""
    if ours_grad.shape == peft_grad.shape:
        return ours_grad
    if ours_grad.shape[0] == EXPERTS and ours_grad.shape[1] == RANK:  # a: (E, r, in) -> (E*r, in)
        return ours_grad.reshape(-1, ours_grad.shape[-1])
    return ours_grad.permute(1, 2, 0).reshape(ours_grad.shape[1], -1)  # b: (E, out, r) -> (out, r, E) -> (out, r*E)


if __name__ == "__main__":
    main()
