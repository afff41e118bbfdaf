"""Every Triton kernel compiles to PTX and cubin for sm_75, sm_80, sm_86, sm_89 and sm_90, without a GPU.

The interpreter accepts programs a GPU compiler rejects (tl.dot with K < 16, bad layouts, too much
shared memory), so the property tests alone prove little about a GPU. triton.compile with an
explicit GPUTarget runs the real compiler here (FACTS.md). It needs JITFunctions, i.e. a process
where TRITON_INTERPRET is unset: the test runs this file as a script in one subprocess for all
kernels x targets, and the script prints one line per compilation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TARGETS = (75, 80, 86, 89, 90)
# Shared memory per block (bytes) each architecture allows (CUDA programming guide, opt-in maximum).
SMEM_LIMIT = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _specs():
    """(name, JITFunction, signature, constexprs, attrs, options, targets) for each compilation.

    Every kernel in bf16 for every target, the matmul in both operand layouts it is launched with;
    fp16 and fp32 on sm_80 (and sm_90 for the matmul, whose tiles and tl.dot lowering depend on
    the dtype). The row/elementwise kernels' dtype changes only loads and stores, and CI time is
    short (~0.8 s a compilation on 2 cores), hence fp16 for them is left to the GPU tests. The matmul is compiled as the JIT specializes
    it at run time (unit strides become constants, 16-divisible pointers and sizes are marked), so
    that the software pipeliner runs and the shared-memory check below means something.
    """
    import torch

    from lora_engine.kernels import cross_entropy_triton as cross_entropy
    from lora_engine.kernels import lora_linear_triton as lora_linear
    from lora_engine.kernels import rms_norm_triton as rms_norm
    from lora_engine.kernels import rope_triton as rope
    from lora_engine.kernels import swiglu_triton as swiglu

    out = []
    for t in ("bf16", "fp16", "fp32"):
        p = f"*{t}"
        targets = TARGETS if t == "bf16" else (80,) if t == "fp32" else ()
        out.append((f"swiglu_fwd/{t}", swiglu._swiglu_fwd,
                    {"gate_ptr": p, "up_ptr": p, "y_ptr": p, "n": "i32", "BLOCK": "constexpr"},
                    {"BLOCK": swiglu.BLOCK}, None, {}, targets))
        out.append((f"swiglu_bwd/{t}", swiglu._swiglu_bwd,
                    {"dy_ptr": p, "gate_ptr": p, "up_ptr": p, "dgate_ptr": p, "dup_ptr": p, "n": "i32",
                     "BLOCK": "constexpr"}, {"BLOCK": swiglu.BLOCK}, None, {}, targets))
        rms_sig = {"x_ptr": p, "w_ptr": p, "y_ptr": p, "rstd_ptr": "*fp32", "N": "i32", "D": "i32",
                   "stride_x": "i32", "stride_y": "i32", "eps": "fp32", "ROWS": "constexpr", "BLOCK_D": "constexpr"}
        out.append((f"rms_fwd/{t}", rms_norm._rms_fwd, rms_sig, {"ROWS": 1, "BLOCK_D": 4096}, None,
                    {"num_warps": 8}, targets))
        out.append((f"rms_bwd/{t}", rms_norm._rms_bwd,
                    {"dy_ptr": p, "x_ptr": p, "w_ptr": p, "rstd_ptr": "*fp32", "dx_ptr": p, "dw_ptr": "*fp32",
                     "N": "i32", "D": "i32", "stride_dy": "i32", "stride_x": "i32", "stride_dx": "i32",
                     "ROWS": "constexpr", "BLOCK_D": "constexpr", "COMPUTE_DW": "constexpr"},
                    {"ROWS": 1, "BLOCK_D": 4096, "COMPUTE_DW": True}, None, {"num_warps": 8}, targets))
        rope_sig = {"q_ptr": p, "k_ptr": p, "qo_ptr": p, "ko_ptr": p, "cos_ptr": p, "sin_ptr": p}
        rope_sig.update({n: "i32" for n in ("T", "Hq", "HALF", "sq_b", "sq_h", "sq_t", "sk_b", "sk_h", "sk_t",
                                            "sqo_b", "sqo_h", "sqo_t", "sko_b", "sko_h", "sko_t", "sc_b", "sc_t")})
        rope_sig.update({"BLOCK_T": "constexpr", "BLOCK_HALF": "constexpr", "BACKWARD": "constexpr"})
        for bwd in (False, True):
            out.append((f"rope_{'bwd' if bwd else 'fwd'}/{t}", rope._rope_kernel, rope_sig,
                        {"BLOCK_T": 32, "BLOCK_HALF": 64, "BACKWARD": bwd}, None, {}, targets))
        ce_sig = {"z_ptr": p, "labels_ptr": "*i64", "loss_ptr": "*fp32", "N": "i32", "V": "i32", "stride_z": "i32",
                  "ignore_index": "i32", "ROWS": "constexpr", "BLOCK_V": "constexpr", "COMPUTE_GRAD": "constexpr"}
        out.append((f"ce_rows/{t}", cross_entropy._ce_rows, ce_sig, {"ROWS": 1, "BLOCK_V": 4096, "COMPUTE_GRAD": True},
                    None, {"num_warps": 8}, targets))
        if t == "bf16":  # the variants small shapes launch: one token a program, many rows a program
            out.append(("rope_fwd_T1/bf16", rope._rope_kernel, rope_sig,
                        {"BLOCK_T": 1, "BLOCK_HALF": 64, "BACKWARD": False}, None, {}, (80,)))
            out.append(("rms_fwd_rows16/bf16", rms_norm._rms_fwd, rms_sig, {"ROWS": 16, "BLOCK_D": 128}, None,
                        {}, (80,)))
            out.append(("ce_rows16/bf16", cross_entropy._ce_rows, ce_sig,
                        {"ROWS": 16, "BLOCK_V": 256, "COMPUTE_GRAD": True}, None, {}, (80,)))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[t]
        # forward: P = x (unit stride along K), Q = W^T (unit stride along K); backward: Q = W (unit along N).
        for layout, unit in (("fwd", ("s_pk", "s_qk")), ("bwd", ("s_pk", "s_qn"))):
            if t == "fp16" and layout == "bwd":
                continue
            sig = {"p_ptr": p, "q_ptr": p, "l_ptr": p, "r_ptr": p, "bias_ptr": p, "c_ptr": p,
                   "M": "i32", "N": "i32", "K": "i32", "R": "i32", "scale": "fp32"}
            sig.update({n: "constexpr" if n in unit else "i32"
                        for n in ("s_pm", "s_pk", "s_qk", "s_qn", "s_lm", "s_lr", "s_rr", "s_rn", "s_cm", "s_cn")})
            for n in ("HAS_BIAS", "UPCAST", "PRECISION", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "GROUP_M"):
                sig[n] = "constexpr"
            names = list(sig)
            aligned = [n for n in ("p_ptr", "q_ptr", "c_ptr", "M", "N", "K", "s_pm", "s_pk", "s_qk", "s_qn", "s_cm")
                       if n not in unit]
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
            for cc in TARGETS if t == "bf16" else (80, 90):
                cfg = lora_linear.tile_config(dtype, (cc // 10, cc % 10))
                opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
                consts = dict(cfg, HAS_BIAS=layout == "fwd", UPCAST=False, BLOCK_R=16,
                              PRECISION="ieee" if t == "fp32" else "tf32", **{n: 1 for n in unit})
                out.append((f"lora_mm_{layout}/{t}", lora_linear._lora_mm, sig, consts, attrs, opts, (cc,)))
            if t == "bf16" and layout == "fwd":  # the autotuner's other candidates, on the H100/H200 target
                for bm, bn, bk, stages, warps in lora_linear._CANDIDATES_16BIT:
                    consts = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, HAS_BIAS=True, UPCAST=False,
                                  BLOCK_R=16, PRECISION="tf32", **{n: 1 for n in unit})
                    out.append((f"lora_mm_{layout}_{bm}x{bn}x{bk}/{t}", lora_linear._lora_mm, sig, consts, attrs,
                                {"num_warps": warps, "num_stages": stages}, (90,)))
    return out


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for name, fn, sig, consts, attrs, opts, targets in _specs():
        for cc in targets:
            try:
                k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                                   target=GPUTarget("cuda", cc, 32), options=opts)
                shared = k.metadata.shared
                if shared > SMEM_LIMIT[cc]:
                    raise RuntimeError(f"needs {shared} bytes of shared memory, sm_{cc} allows {SMEM_LIMIT[cc]}")
                if "cubin" not in k.asm:
                    raise RuntimeError("no cubin produced")
                print(f"ok   {name} sm_{cc} shared={shared}")
            except Exception as e:  # report every failure, not only the first
                failures += 1
                print(f"FAIL {name} sm_{cc}: {type(e).__name__}: {str(e)[:400]}")
    return 1 if failures else 0


def test_every_kernel_compiles_for_every_gpu_target():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, __file__], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    lines = r.stdout.splitlines()
    failed = [ln for ln in lines if ln.startswith("FAIL")]
    assert r.returncode == 0 and not failed, "\n".join(failed) or r.stderr[-3000:]
    expected = sum(len(spec[-1]) for spec in _specs())
    assert expected >= 5 * 9, "every kernel must be compiled at least for all targets in bf16"
    assert sum(ln.startswith("ok") for ln in lines) == expected, r.stdout


if __name__ == "__main__":
    sys.exit(main())
