"""Triton kernels of lora_engine, installed as `lora_engine.kernels`.

Layering: this package imports torch and triton only. `reference.py` holds the pure-PyTorch
oracle of every kernel; `triton_ops.py` gathers the Triton implementations behind the same
signatures. Code above this layer calls lora_engine.dispatch, never these modules directly.
"""
