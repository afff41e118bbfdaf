"""Kernels of lora_engine, installed as `lora_engine.kernels`.

Layering: this package imports torch and triton only. Code above this layer calls
lora_engine.dispatch (the one place where a backend is chosen), never these modules directly.

Backend modules are named `<op>_<backend>.py`, the backend being how the op is computed:

  reference   pure PyTorch: the test oracle, the CPU fallback, the benchmark baseline
  triton      Triton kernels (GPU; CPU tensors under TRITON_INTERPRET=1)
  cpp         the C++ ops of csrc/ (the extension lora_engine.kernels._C), the reference elsewhere

<op> is one op (rms_norm, rope, swiglu, cross_entropy, lora_linear, attention) or a family: `ops`,
the model's ops on dense tensors in one module (ops_reference.py, ops_cpp.py), and `nf4`, the NF4
ops (nf4_reference.py, nf4_triton.py, nf4_cpp.py). Every backend of an op takes the reference's
signature. Beside them: nf4_format.py (the NF4 data type), dtypes.py (the float dtypes the kernels
take), amp.py (the autocast rule), compile_spec.py and _common.py (what the Triton files share).
"""
