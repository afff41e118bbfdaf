"""`python -m lora_engine.plan`: the memory of a training step, computed on any machine without running it.

    python -m lora_engine.plan --model path/to/Llama-3.1-8B/config.json --quantize nf4 --r 16 \\
        --seq-len 8192 --gradient-checkpointing --device cuda
    python -m lora_engine.plan --model config.json --quantize nf4 --fit 24GiB --json

The model is built from its config.json alone (a folder, the file itself, or an embedded model's
name) under FakeTensorMode: every tensor has a shape, a dtype and a device but no data, so an 8B or
70B model costs nothing. Then two full training steps run through the engine's real code (the
same model, LoRA, NF4 and loss code as `train`; AdamW as train/step.py makes it; the second step
has the optimizer state of the first) while train/memory.py counts live tensor storage at every
op. The result: the peak, split into weights, adapters + optimizer state, activations saved for
backward and transient workspace, and the FLOPs of one step.

--device cuda plans for a GPU on a machine without one. A CPU-only torch cannot run autograd on
fake CUDA tensors (its engine asks for a CUDA device guard), so the step runs on fake CPU tensors
with the GPU's rules: every allocation rounded up to 512 bytes (the caching allocator's block
size, which torch.cuda.max_memory_allocated counts), autocast in the chosen precision, and the
attention's GPU workspace added at its backward op (train/planning.py: cuda_workspace). `--fit` then
adds what a GPU holds besides tensors (train/planning.py: cuda_overhead, and the comment above its
constants). What the plan cannot see is written in bench/results/plan.md (fragmentation, NCCL
buffers, other processes).
"""

from __future__ import annotations

import json
import logging
import sys

from lora_engine.cli import logs_to, parse, run_cli, user_input
from lora_engine.train.planning import (  # noqa: F401  (the plan's API, defined in the train layer)
    CUBLAS_WORKSPACE_BYTES,
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION,
    PRECISIONS,
    GiB,
    PlanConfig,
    _gib,
    _triton_usable,
    batch_of,
    build,
    cuda_overhead,
    cuda_workspace,
    fit,
    format_plan,
    host_weights,
    materialize,
    meta_model,
    parse_size,
    plan_step,
    read_config,
    tracked_steps,
)

logger = logging.getLogger(__name__)


@logs_to("stderr")
def main(argv=None):
    cfg, _ = parse(PlanConfig, argv, prog="python -m lora_engine.plan",
                   description="The memory of a LoRA/QLoRA training step, planned on fake tensors.")
    with user_input("--model"):
        model_config = read_config(cfg.model)
    if cfg.fit is not None:
        budget = parse_size(cfg.fit)
        n, result = fit(cfg, budget, model_config)
        result["max_seq_len"] = n
        result["budget_bytes"] = budget
        print(f"longest --seq-len that fits {cfg.fit}: {n}")
    else:
        result = plan_step(cfg, model_config)
    print(format_plan(cfg, result))
    if cfg.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
