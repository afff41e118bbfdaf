"""Triton kernels of lora_engine, installed as `lora_engine.kernels`.

Layering: this package imports torch and triton only. `reference.py` holds the pure-PyTorch
oracle of every kernel; `triton_ops.py` gathers the Triton implementations behind the same
signatures. Code above this layer calls lora_engine.dispatch, never these modules directly.
"""

_PUBLIC = {
    # name -> module that defines it. lora_linear is the public signature
    # lora_linear(x, weight, lora_A, lora_B, scale, *, bias=None, x_dropped=None).
    "lora_linear": "lora_linear",
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
