"""Triton kernels of lora_engine, installed as `lora_engine.kernels`.

Layering: this package imports torch and triton only. `reference.py` holds the pure-PyTorch
oracle of every kernel; `triton_ops.py` gathers the Triton implementations behind the same
signatures. Code above this layer calls lora_engine.dispatch, never these modules directly.
"""

# The files are named <op>_triton.py, not <op>.py: importing a submodule sets it as an attribute of
# the package, which would shadow the function of the same name (lora_engine.kernels.rope would be
# a module, not the op).
_PUBLIC = {
    # name -> module that defines it. lora_linear is the public signature
    # lora_linear(x, weight, lora_A, lora_B, scale, *, bias=None, x_dropped=None).
    "lora_linear": "lora_linear_triton",
    "rms_norm": "triton_ops",
    "rope": "triton_ops",
    "swiglu": "triton_ops",
    "linear_cross_entropy": "triton_ops",
}


def __getattr__(name: str):
    # Lazy: importing lora_engine.kernels (for reference.py) must not import triton.
    if name in _PUBLIC:
        import importlib

        module = importlib.import_module(f"{__name__}.{_PUBLIC[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
