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
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("lora_engine: torch not importable at build time; skipping the csrc/ extension", file=sys.stderr)
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(
        os.path.join("csrc", f) for f in os.listdir(os.path.join(here, "csrc")) if f.endswith(".cpp")
    )
    if not sources:
        return [], {}
    ext = CppExtension(
        "lora_engine._C",
        sources,
        extra_compile_args=["-O3", "-fopenmp"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
