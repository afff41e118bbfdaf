#!/usr/bin/env bash
# GPU check: the GPU test subset (every kernel against its reference at Llama-3-8B shapes, bf16 and
# fp16: `pytest -m gpu`), the kernel benchmarks (bench/kernel_bench.py), the NF4 Triton tests and
# benchmark (bench/nf4_triton.py) and the memory plan against max_memory_allocated (bench/plan_vs_gpu.py),
# in under 10 minutes. Writes one summary, gpu_check.md, under $OUT (or bench/results/
# when OUT is unset), beside the benchmarks' CSV and table; a failing or timed-out step is reported
# there and the next step still runs. Exit status: 0 only when every step passed.
#
#   bash bench/gpu_check.sh            # from the repository root or anywhere
#
# Needs: a CUDA GPU, torch, triton, pytest, hypothesis (transformers/peft for a few imports); no
# network. The project is imported from this checkout (PYTHONPATH), not installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS="${OUT:-$ROOT/bench/results}"
mkdir -p "$RESULTS"
LOGS="$(mktemp -d)"
SUMMARY="$RESULTS/gpu_check.md"
PY="${PYTHON:-python}"
START=$(date +%s)
FAILED=0
STEPS=()

# Per-step limits (seconds): 2 x 20 + 30 + 110 + 150 + 50 + 80 + 120 = 580 s worst case, under 10 minutes.
T_ENV=20; T_INSTALL=30; T_TESTS=110; T_BENCH=150; T_NF4_TESTS=50; T_NF4_BENCH=80; T_PLAN=120

run_step() {  # run_step NAME LIMIT CMD...: run with a time limit, log, record status; never exits
    local name=$1 limit=$2; shift 2
    local log="$LOGS/$name.log" t0 rc=0
    t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$log" 2>&1 || rc=$?
    local dt=$(( $(date +%s) - t0 )) status="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT after ${limit}s"; FAILED=1
    elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; FAILED=1; fi
    echo "    -> $status in ${dt}s"
    tail -n 5 "$log" | sed 's/^/    | /'
    STEPS+=("$name|$status|${dt}s|$log")
}

write_summary() {
    local tmp="$SUMMARY.tmp.$$"
    {
        echo "# GPU check"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "- total: $(( $(date +%s) - START )) s"
        echo "- result: $([ "$FAILED" -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED (see below)')"
        echo
        echo "| step | status | time |"
        echo "|---|---|---:|"
        for s in "${STEPS[@]}"; do IFS='|' read -r n st dt _ <<<"$s"; echo "| $n | $st | $dt |"; done
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
run_step environment "$T_ENV" bash -c "nvidia-smi || true; $PY -c 'import sys, torch, triton; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); \
print(\"triton\", triton.__version__); print(torch.cuda.get_device_name(), torch.cuda.get_device_capability()); \
assert torch.cuda.is_available(), \"no CUDA device visible\"'"

# 2. The project from this checkout: the repository root on PYTHONPATH is enough (the package,
# kernels included, is one folder); the C++ extension is optional and not needed on the GPU path.
unset TRITON_INTERPRET
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
run_step import "$T_ENV" $PY -c "from lora_engine import dispatch; dispatch.triton_ops(); import lora_engine.kernels as k; print(k.__file__)"

# 3. Every kernel against its reference at realistic shapes (and any other test marked gpu).
run_step gpu-tests "$T_TESTS" $PY -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors \
    -rs tests/

# 4. Kernel benchmarks (rows are written after each case, so a time limit keeps what was measured).
#    torch.compile recompiles for every shape: it is timed at 2048 tokens only.
run_step kernel-bench "$T_BENCH" $PY bench/kernel_bench.py --device cuda --tokens 512 2048 8192 --compile-tokens 2048 \
    --reps 20 --out-dir "$RESULTS"

# 5. NF4 Triton kernels: their tests run on CUDA whenever the interpreter is off (no `gpu` mark),
#    then dequantization GB/s and fused vs dequantize+cuBLAS across row counts. (bench/nf4.py is
#    the CPU benchmark against bitsandbytes, which the GPU machine does not have.)
run_step nf4-triton-tests "$T_NF4_TESTS" $PY -m pytest -q -p no:cacheprovider tests/test_nf4_triton.py
run_step nf4-triton-bench "$T_NF4_BENCH" $PY bench/nf4_triton.py --out "$RESULTS/nf4_triton_gpu.md"

# 6. The memory plan against the GPU: torch.cuda.max_memory_allocated of real 8B-shaped QLoRA steps
#    (random weights) next to lora_engine.plan's planned peak, at a few context lengths.
run_step plan-vs-gpu "$T_PLAN" $PY bench/plan_vs_gpu.py --lengths 2048 8192 --out "$RESULTS/plan_vs_gpu.md"

exit "$FAILED"
