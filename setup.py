"""Packaging lives in pyproject.toml; this file only adds the optional C++ extension (csrc/).

The extension is built when torch is importable in the build environment and a C++ compiler
works (e.g. `pip install --no-build-isolation -e .`). Anywhere else the package installs without
it and lora_engine falls back to the PyTorch reference with one warning. It is never required.
"""

import os
import sys

from setuptools import setup


def _extensions():
    if os.environ.get("LORA_ENGINE_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("lora_engine: torch not importable at build time; skipping the csrc/ extension", file=sys.stderr)
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc")) if f.endswith(".cpp")
    )
    if not sources:
        return [], {}
    # -ffp-contract=off: no fused multiply-add, so each product rounds as in the PyTorch reference
    # (the NF4 ops are tested bit for bit against it). -fno-trapping-math: the float selects of the
    # csrc/cpu_fused.cpp loops (clamps, NaN checks) may be if-converted, so GCC vectorises them; it
    # changes no value, only which floating-point exception flags may be raised.
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    cuda = sorted(os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc")) if f.endswith(".cu"))
    # The CUDA kernels (csrc/*.cu) only where a GPU build is possible: CUDA torch and nvcc present.
    if cuda and torch.cuda.is_available() and CUDA_HOME is not None:
        ext = CUDAExtension(
            "lora_engine.kernels._C",
            sources + cuda,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false", "-DLORA_ENGINE_TORCH_OP"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("lora_engine.kernels._C", sources, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
