#!/usr/bin/env bash
# GPU check: the one prepared run that settles every GPU claim of README.md when a GPU is lent. Steps, each
# under its own time limit (a failing or timed-out step is reported and the next one still runs; the steps
# of bench/gpu_*.py write each row the moment it is measured, so a time limit keeps what came before):
#   environment, install (pip install --no-deps --no-build-isolation -e ., without the optional C++
#   extension), import, gpu-tests (every kernel against its reference at Llama-3-8B shapes, bf16 and fp16:
#   `pytest -m gpu`), kernel-bench (bench/kernel_bench.py), nf4-triton-tests and nf4-triton-bench
#   (bench/nf4_triton.py), plan-vs-gpu (bench/plan_vs_gpu.py), train-step (bench/gpu_train_step.py: 8B- and
#   135M-shaped LoRA and QLoRA steps against transformers + PEFT from the same random weights, with loss
#   and gradient-norm parity), context-4k and context-24g (bench/gpu_context.py: the plan's 4,096-token
#   figure, and the longest 8B QLoRA context under a 24 GiB cap by bisection over real steps), gpu-kernels
#   (bench/gpu_kernels.py: NF4 dequantization against copy bandwidth, fused LoRA against the base matmuls),
#   gpu-new-kernels (bench/gpu_new_kernels.py: the MoE grouped GEMM at OLMoE-1B-7B shapes and the gated delta
#   rule at Qwen3.5 shapes, Triton against their torch paths: time, TFLOP/s or peak memory, relative error).
# Writes gpu_check.md under $OUT (or bench/results/ when OUT is unset): the steps, a Claims table naming
# each README GPU claim with its step and "measured", "planned" or "failed: why" (bench/gpu_claims.py),
# the rows, and each step's log. Exit status: 0 only when every step passed.
#
#   bash bench/gpu_check.sh              # on a CUDA machine, from the repository root or anywhere
#   bash bench/gpu_check.sh --dry-run    # every step on tiny shapes on a CPU (tests/test_gpu_check.py):
#                                        # checks the script; writes under $OUT or a temp dir, never bench/results
#
# Needs: a CUDA GPU, torch, triton, pytest, hypothesis, transformers, peft (bitsandbytes optional: without it
# the QLoRA peer is our own dequantize-then-matmul path, and the rows say so); no network.
set -euo pipefail

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ "$DRY" -eq 1 ]; then
    RESULTS="${OUT:-$(mktemp -d)}"
    # a dry run measures nothing: it must never replace the recorded results
    [ "$(cd "$RESULTS" 2>/dev/null && pwd)" = "$ROOT/bench/results" ] && RESULTS="$(mktemp -d)"
else
    RESULTS="${OUT:-$ROOT/bench/results}"
fi
mkdir -p "$RESULTS"
LOGS="$(mktemp -d)"
SUMMARY="$RESULTS/gpu_check.md"
PY="${PYTHON:-python}"
START=$(date +%s)
FAILED=0
STEPS=()
rm -f "$RESULTS/gpu_rows.jsonl" "$RESULTS/gpu_steps.tsv"
DRYFLAG=(); [ "$DRY" -eq 1 ] && DRYFLAG=(--dry-run)

# Per-step limits (seconds), one per step, summing to
# 10 + 30 + 10 + 45 + 35 + 30 + 30 + 30 + 95 + 20 + 90 + 20 + 30 = 475 s, under 8 minutes, which leaves room
# for a rerun in 15 minutes of device time (each limit can overrun by the 5 s grace before KILL). The longest
# context gets the most: one 131,072-token 8B step is about a minute on an H100, so its 80 s budget still
# holds the first probe (the planned length), if fewer bisection steps than before the MoE and delta-rule
# kernels took their 30 s.
T_ENV=10; T_INSTALL=30; T_IMPORT=10; T_TESTS=45; T_BENCH=35; T_NF4_TESTS=30; T_NF4_BENCH=30; T_PLAN=30
T_TRAIN=95; T_CTX4K=20; T_CTX24G=90; T_KERNELS=20; T_NEW_KERNELS=30

# The dry run allows each step 4 times its limit: tiny shapes on a CPU shared with other jobs are no GPU, and
# its point is that every step runs, not how fast (it takes about a minute of CPU time in all).
SCALE=1; [ "$DRY" -eq 1 ] && SCALE=4

run_step() {  # run_step NAME LIMIT CMD...: run with a time limit, log, record status; never exits
    local name=$1 limit=$(( $2 * SCALE )); shift 2
    local log="$LOGS/$name.log" t0 rc=0
    t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=5 "$limit" "$@" >"$log" 2>&1 || rc=$?
    local dt=$(( $(date +%s) - t0 )) status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT after ${limit}s"; FAILED=1
    elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; FAILED=1; fi
    echo "    -> $status in ${dt}s"
    tail -n 5 "$log" | sed 's/^/    | /'
    STEPS+=("$name|$status|${dt}s|$log")
    printf '%s\t%s\n' "$name" "$status" >>"$RESULTS/gpu_steps.tsv"
}

write_summary() {
    local tmp="$SUMMARY.tmp.$$"
    {
        echo "# GPU check$([ "$DRY" -eq 1 ] && echo ' (dry run on CPU, tiny shapes: nothing measured)')"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "- total: $(( $(date +%s) - START )) s"
        echo "- result: $([ "$FAILED" -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED (see below)')"
        echo
        echo "| step | status | time |"
        echo "|---|---|---:|"
        for s in "${STEPS[@]}"; do IFS='|' read -r n st dt _ <<<"$s"; echo "| $n | $st | $dt |"; done
        echo
        $PY bench/gpu_claims.py "$RESULTS" "${DRYFLAG[@]}" 2>&1 || echo "(bench/gpu_claims.py failed)"
        for s in "${STEPS[@]}"; do
            IFS='|' read -r n st _ log <<<"$s"
            echo
            echo "## $n: $st"
            echo
            echo '```'
            tail -n 60 "$log" 2>/dev/null || echo "(no log)"
            echo '```'
        done
        for md in "$RESULTS/kernels_gpu.md" "$RESULTS/nf4_triton_gpu.md" "$RESULTS/plan_vs_gpu.md"; do
            if [ -f "$md" ]; then echo; echo "---"; echo; cat "$md"; fi
        done
    } >"$tmp"
    sync "$tmp" 2>/dev/null || true
    mv -f "$tmp" "$SUMMARY"
    echo "summary: $SUMMARY"
}
trap write_summary EXIT

# 1. Environment.
if [ "$DRY" -eq 1 ]; then
    run_step environment "$T_ENV" $PY -c 'import sys, torch; print(sys.version); print("torch", torch.__version__)'
else
    run_step environment "$T_ENV" bash -c "nvidia-smi || true; $PY -c 'import sys, torch, triton; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); \
print(\"triton\", triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability()); \
assert torch.cuda.is_available(), \"no CUDA device visible\"'"
fi

# 2. The project from this checkout, installed without its dependencies (the machine has them, and no
#    network) and without the optional C++ extension (LORA_ENGINE_NO_EXT: nvcc would take minutes; the GPU
#    path does not use it). The checkout is also put first on PYTHONPATH, so an install failure costs nothing.
unset TRITON_INTERPRET
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" -eq 1 ]; then  # the dry run leaves the interpreter's packages alone
    run_step install "$T_INSTALL" bash -c "$PY -m pip --version && test -f pyproject.toml && \
echo 'would run: LORA_ENGINE_NO_EXT=1 $PY -m pip install --no-deps --no-build-isolation -e .'"
else
    run_step install "$T_INSTALL" env LORA_ENGINE_NO_EXT=1 $PY -m pip install --no-deps --no-build-isolation -e .
fi
run_step import "$T_IMPORT" $PY -c "import lora_engine, lora_engine.kernels as k; print(lora_engine.__file__, k.__file__)"

# 3. Every kernel against its reference at realistic shapes (and any other test marked gpu); the dry run
#    collects them (a CPU skips them all).
if [ "$DRY" -eq 1 ]; then
    run_step gpu-tests "$T_TESTS" $PY -m pytest -q -m gpu -p no:cacheprovider --collect-only tests/test_kernels_gpu.py
else
    run_step gpu-tests "$T_TESTS" $PY -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
        -rs tests/
fi

# 4. Kernel benchmarks (rows are written after each case, so a time limit keeps what was measured).
#    torch.compile recompiles for every shape: it is timed at 2048 tokens only.
if [ "$DRY" -eq 1 ]; then
    run_step kernel-bench "$T_BENCH" $PY bench/kernel_bench.py --device cpu --tokens 32 --reps 1 --no-compile \
        --ops lora_linear rms_norm --out-dir "$RESULTS"
else
    run_step kernel-bench "$T_BENCH" $PY bench/kernel_bench.py --device cuda --tokens 512 2048 8192 \
        --compile-tokens 2048 --reps 20 --out-dir "$RESULTS"
fi

# 5. NF4 Triton kernels: their tests run on CUDA whenever the interpreter is off (no `gpu` mark), then
#    dequantization GB/s and fused vs dequantize+cuBLAS across row counts (bench/nf4.py is the CPU
#    benchmark against bitsandbytes, which the GPU machine does not have).
if [ "$DRY" -eq 1 ]; then
    run_step nf4-triton-tests "$T_NF4_TESTS" env TRITON_INTERPRET=1 $PY -m pytest -q -p no:cacheprovider --collect-only \
        tests/test_nf4_triton.py
    run_step nf4-triton-bench "$T_NF4_BENCH" env TRITON_INTERPRET=1 $PY bench/nf4_triton.py --smoke \
        --out "$RESULTS/nf4_triton_smoke.md"
else
    run_step nf4-triton-tests "$T_NF4_TESTS" $PY -m pytest -q -p no:cacheprovider tests/test_nf4_triton.py
    run_step nf4-triton-bench "$T_NF4_BENCH" $PY bench/nf4_triton.py --out "$RESULTS/nf4_triton_gpu.md"
fi

# 6. The memory plan against the GPU: torch.cuda.max_memory_allocated of real 8B-shaped QLoRA steps
#    (random weights) next to lora_engine.plan's planned peak. It needs CUDA: the dry run imports it.
if [ "$DRY" -eq 1 ]; then
    run_step plan-vs-gpu "$T_PLAN" $PY -c "import sys; sys.path.insert(0, 'bench'); import plan_vs_gpu; \
print('imports; needs CUDA to run')"
else
    run_step plan-vs-gpu "$T_PLAN" $PY bench/plan_vs_gpu.py --lengths 2048 --out "$RESULTS/plan_vs_gpu.md"
fi

# 7. The end-to-end training step against transformers + PEFT, from the same random weights.
#    The dry run: one tiny model, and the QLoRA peer the device machine will have (no bitsandbytes there).
if [ "$DRY" -eq 1 ]; then
    run_step train-step "$T_TRAIN" $PY bench/gpu_train_step.py --out-dir "$RESULTS" --dry-run --models Llama-3.1-8B \
        --no-bitsandbytes
else
    run_step train-step "$T_TRAIN" $PY bench/gpu_train_step.py --out-dir "$RESULTS"
fi

# 8. Context lengths of 8B-shaped QLoRA: the plan's 4k figure, then the longest under a 24 GiB cap
#    (no probe begins that is estimated to end within 10 s of the step's limit).
run_step context-4k "$T_CTX4K" $PY bench/gpu_context.py --part 4k --out-dir "$RESULTS" "${DRYFLAG[@]}"
run_step context-24g "$T_CTX24G" $PY bench/gpu_context.py --part 24g --budget-s $(( T_CTX24G - 10 )) \
    --out-dir "$RESULTS" "${DRYFLAG[@]}"

# 9. NF4 dequantization against copy bandwidth; fused LoRA against the base matmuls.
run_step gpu-kernels "$T_KERNELS" $PY bench/gpu_kernels.py --out-dir "$RESULTS" "${DRYFLAG[@]}"

# 10. The MoE grouped GEMM and the gated delta rule, Triton against their torch paths on the same device (the
#     dry run: no Triton on a CPU, so the cpp MoE GEMMs and the fp64 recurrence stand in; the rows say so).
run_step gpu-new-kernels "$T_NEW_KERNELS" $PY bench/gpu_new_kernels.py --out-dir "$RESULTS" "${DRYFLAG[@]}"

exit "$FAILED"
