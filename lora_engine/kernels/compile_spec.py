"""What to compile for each Triton kernel to check it against real GPU compilers, without a GPU.

The interpreter accepts programs a GPU compiler rejects (tl.dot tiles under 16, too much shared
memory), so every kernel is also compiled to PTX and cubin for the targets below by
`triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32))`
(tests/test_kernels_compile.py, in a process where TRITON_INTERPRET is unset). A CompileSpec is one
such launch variant: argument types, constexpr values, launch options, targets. Each kernel file
lists its own in `compile_specs()`, beside the kernels, built from the launcher's own tile rules,
so a change to a kernel's arguments or tiles is a change to its specs in the same file.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

TARGETS = (75, 80, 86, 89, 90)  # Turing, Ampere (A100, RTX 30), Ada, Hopper compute capabilities


@dataclass(frozen=True)
class CompileSpec:
    name: str  # "<kernel variant>/<dtype>"; with a target, unique across the package
    kernel: object  # the @triton.jit function (a JITFunction when TRITON_INTERPRET is unset)
    signature: dict[str, str]  # every argument -> "*bf16", "i32", "fp32", ..., or "constexpr"
    constexprs: dict[str, object]
    targets: tuple[int, ...] = TARGETS
    options: dict[str, object] = field(default_factory=dict)  # num_warps, num_stages, enable_fp_fusion
    attrs: dict | None = None  # e.g. {(index,): [["tt.divisibility", 16]]}, as the JIT specializes


def _is_constexpr(annotation) -> bool:
    # Annotations are strings in files with `from __future__ import annotations`.
    return getattr(annotation, "__name__", None) == "constexpr" or str(annotation).endswith("constexpr")


def arguments(kernel) -> list[tuple[str, bool]]:
    """(name, is_constexpr) of each parameter of a @triton.jit function, JIT or interpreted."""
    params = inspect.signature(kernel.fn).parameters.values()
    return [(p.name, _is_constexpr(p.annotation)) for p in params]


def signature(kernel, ptr: str, **types: str) -> dict[str, str]:
    """The ASTSource signature of `kernel`: `*_ptr` arguments point to `ptr` ("bf16", ...) unless
    named in types, constexpr parameters are "constexpr", and every other argument must be named
    in types, so a kernel that gains a scalar fails here until its spec states the type."""
    sig = {}
    for name, const in arguments(kernel):
        if name in types:
            sig[name] = types[name]
        elif const:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{ptr}"
        else:
            raise ValueError(f"compile spec of {kernel.fn.__name__}: state the type of argument {name!r}")
    unknown = set(types) - set(sig)
    if unknown:
        raise ValueError(f"compile spec of {kernel.fn.__name__}: no argument named {sorted(unknown)}")
    return sig
