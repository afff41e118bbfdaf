"""Which precision a training step runs in: the one rule for --precision, CPU and GPU.

    p = resolve_precision("cpu", "auto")   # Precision(compute=torch.bfloat16, autocast=torch.bfloat16, ...)
    model = load_model(path, dtype=p.storage)
    with torch.autocast("cpu", dtype=p.autocast): ...

The rule. `auto` is bf16 wherever the hardware multiplies bf16 natively, else fp32 on a CPU and
fp16 (with a grad scaler) on an older GPU:
  - CPU: bf16 when the CPU has AVX512-BF16 (VDPBF16PS: bf16 products summed in fp32, Zen 4 and
    Cooper Lake on) or AMX (Sapphire Rapids on; every AMX CPU has AMX-BF16). Without them torch
    emulates bf16 GEMMs by converting to fp32, slower than fp32 itself, so fp32 is chosen (the rates
    per machine: bench/results/precision.md, from bench/gemm.py).
  - GPU: bf16 when torch.cuda.is_bf16_supported() (Ampere on), else fp16.
Detection (cpu_bf16_matmul): torch.cpu._is_avx512_bf16_supported() and _is_amx_tile_supported(),
which ask the cpuinfo library torch links (CPUID, any OS); where this torch lacks them, the
`avx512_bf16` / `amx_bf16` flags of /proc/cpuinfo. torch.backends.cpu.get_cpu_capability() is no
help: it says "AVX512" on CPUs with and without the bf16 instructions.

What a half precision means for the model (the same on CPU and GPU): the frozen base weights
(linear layers, embeddings, norms) are stored once in the compute dtype, so no step casts them and
no fp32 copy exists (an NF4 base dequantizes straight to it); the trained parameters (LoRA A and B,
DoRA magnitudes) and so their AdamW state stay fp32; the step runs under torch.autocast at that
dtype, whose matmuls accumulate in fp32 (oneDNN's bf16 GEMM and VDPBF16PS sum in fp32, as cuBLAS
does) and whose loss, with its softmax and logsumexp, is fp32 (kernels/amp.py). fp32 stores and
computes everything in fp32 without autocast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class Precision:
    compute: torch.dtype           # the matmuls' input dtype
    storage: torch.dtype           # the frozen base weights' dtype (= compute)
    autocast: torch.dtype | None   # torch.autocast's dtype, None for fp32 (no autocast)
    reason: str                    # why: printed by the run and recorded in run.json
    warning: str | None = None     # a choice that will run far below the device's speed, and why; also recorded

    @property
    def name(self) -> str:
        return _NAMES[self.compute]

    def to_dict(self) -> dict:
        return {"compute": self.name, "storage": _NAMES[self.storage], "autocast": self.autocast is not None,
                "reason": self.reason, "warning": self.warning}


def cpu_bf16_matmul() -> str | None:
    """The CPU feature that multiplies bf16 natively ("avx512_bf16" or "amx"), or None."""
    cpu = getattr(torch, "cpu", None)
    ask_avx = getattr(cpu, "_is_avx512_bf16_supported", None)
    ask_amx = getattr(cpu, "_is_amx_tile_supported", None)
    if ask_avx is not None and ask_amx is not None:
        if ask_amx():
            return "amx"
        return "avx512_bf16" if ask_avx() else None
    return cpuinfo_bf16(_read_cpuinfo())


def cpu_fp16_matmul() -> str | None:
    """The CPU feature that multiplies fp16 natively ("amx_fp16" or "avx512_fp16"), or None: torch
    asks cpuinfo for AMX-FP16; AVX512-FP16 (Sapphire Rapids on) only /proc/cpuinfo names."""
    ask_amx = getattr(getattr(torch, "cpu", None), "_is_amx_fp16_supported", None)
    if ask_amx is not None and ask_amx():
        return "amx_fp16"
    flags = _cpuinfo_flags(_read_cpuinfo())
    return "amx_fp16" if "amx_fp16" in flags else "avx512_fp16" if "avx512_fp16" in flags else None


def cpuinfo_bf16(text: str) -> str | None:
    """The bf16 matmul feature named in the `flags` lines of a /proc/cpuinfo text, or None."""
    flags = _cpuinfo_flags(text)
    if "amx_bf16" in flags:
        return "amx"
    return "avx512_bf16" if "avx512_bf16" in flags else None


def _cpuinfo_flags(text: str) -> set[str]:
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
    return flags


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags to read, so no bf16 claimed
        return ""


def resolve_precision(device: torch.device | str, precision: str = "auto") -> Precision:
    """The Precision of a step on `device` for a --precision choice (auto, fp32, bf16, fp16); see the module doc."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    warning = None
    if precision == "auto":
        precision, reason = _auto(device)
    else:
        reason = f"--precision {precision}"
        if device.type == "cpu":
            warning = _emulated_on_cpu(precision)
    dt = _DTYPES[precision]
    return Precision(dt, dt, None if dt == torch.float32 else dt, reason, warning)


def _emulated_on_cpu(precision: str) -> str | None:
    """Why an explicit half precision will crawl on this CPU, or None: without the instructions
    torch runs bf16 and fp16 GEMMs through an fp32 emulation. Measured on a 2-core AVX2 EPYC (torch
    2.13, 1024 x 576 x 1536): fp32 135 GFLOP/s, bf16 1.9, fp16 2.2, so a step ~70x slower."""
    if precision == "bf16" and cpu_bf16_matmul() is None:
        need = "AVX512-BF16 or AMX"
    elif precision == "fp16" and cpu_fp16_matmul() is None:
        need = "AVX512-FP16 or AMX-FP16"
    else:
        return None
    return (f"--precision {precision} on a CPU without native {precision} matmul (no {need}): torch emulates its "
            f"{precision} GEMMs, ~70x slower than fp32 (measured on a 2-core AVX2 EPYC: 1.9-2.2 against 135 "
            f"GFLOP/s); --precision auto picks fp32 on this CPU")


def _auto(device: torch.device) -> tuple[str, str]:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16"
        return "fp16", "auto: the GPU has no bf16, fp16 with a grad scaler"
    if device.type == "cpu":
        feature = cpu_bf16_matmul()
        if feature is not None:
            return "bf16", f"auto: the CPU multiplies bf16 natively ({feature.upper()})"
        return "fp32", "auto: the CPU has no native bf16 matmul (no AVX512-BF16 or AMX), where fp32 is faster"
    return "fp32", f"auto: fp32 on {device.type}"
