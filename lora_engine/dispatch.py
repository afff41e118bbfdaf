"""The one place where a kernel is chosen.

Every hot op of the model, the LoRA layers and NF4 goes through a function here, and every
function asks one question, `choose_backend(device, backend)`, answered from the tensor's device
and an explicit `backend=` argument, nothing else:

  backend=None      "auto": "triton" on a CUDA GPU of compute capability >= 7.5 when triton
                    imports (else "torch"); "cpp" on CPU when the C++ extension is built (else
                    "torch", with one warning).
  backend="torch"   the PyTorch reference (kernels/ops_reference.py, kernels/nf4_reference.py), always.
  backend="triton"  the Triton kernels, also on CPU tensors (that is how the tests run them under
                    TRITON_INTERPRET=1).
  backend="cpp"     the reference with the C++ ops of csrc/ plugged in where there is one: NF4
                    quantize (CPU) and dequantize (CPU; CUDA when built with nvcc), bit-identical to
                    "torch" (kernels/nf4_cpp.py); RMSNorm, RoPE and SwiGLU fused on bf16 CPU tensors
                    (kernels/ops_cpp.py), equal to "torch" within bf16's rounding; on fp32 ones
                    the reference's forward, bit for bit (the exact path), and the fused backward,
                    equal to "torch"'s gradients within fp32's rounding. Causal self-attention on bf16 CPU
                    tensors by batched GEMMs and a fused C++ softmax (kernels/attention_cpp.py).
                    Ops and inputs without a C++ version run the reference.

Modules carry a `backend` attribute (None by default) that they pass through; set it on a whole
model with `set_backend(model, name)`. Under torch.autocast every backend follows one rule
(kernels/amp.py): the matmul ops compute in the autocast dtype, the loss stays fp32.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch

from lora_engine.kernels import attention_cpp, nf4_cpp, nf4_reference, ops_cpp, ops_reference
from lora_engine.kernels.nf4_format import NF4Tensor

BACKENDS = ("torch", "triton", "cpp")


_triton: tuple | None = None  # (ops or None, reason), once asked; a global torch.compile reads as a constant


def _triton_kernels():
    """The Triton ops (see triton_ops), or None with the reason when triton cannot be used here."""
    global _triton
    if _triton is None:
        try:
            import triton  # noqa: F401

            # Each op from the file of its kernels, kernels/<op>_triton.py, with the reference's signature.
            from lora_engine.kernels import (
                cross_entropy_triton,
                lora_linear_triton,
                rms_norm_triton,
                rope_triton,
                swiglu_triton,
            )
        except Exception as e:  # ImportError, or triton failing to find a driver/compiler
            _triton = None, f"{type(e).__name__}: {e}"
        else:
            ops = SimpleNamespace(lora_linear=lora_linear_triton.lora_linear, rms_norm=rms_norm_triton.rms_norm,
                                  rope=rope_triton.rope, swiglu=swiglu_triton.swiglu,
                                  linear_cross_entropy=cross_entropy_triton.linear_cross_entropy)
            _triton = ops, ""
    return _triton


def triton_ops() -> SimpleNamespace:
    """What backend "triton" runs for the model's ops: lora_linear, rms_norm, rope, swiglu and
    linear_cross_entropy, with kernels/ops_reference.py's signatures (NF4: kernels/nf4_triton.py).
    Importing them registers their custom ops. RuntimeError, with the reason, when triton is unusable."""
    ops, why = _triton_kernels()
    if ops is None:
        raise RuntimeError(f"triton is unusable here: {why}")
    return ops


_warned_no_cpp = False


def _warn_no_cpp() -> None:
    global _warned_no_cpp
    if _warned_no_cpp:
        return
    _warned_no_cpp = True
    warnings.warn(
        "lora_engine: the C++ extension is not built (no lora_engine.kernels._C); NF4, RMSNorm, RoPE and SwiGLU "
        "on CPU use the PyTorch reference. Build it with `pip install --no-build-isolation -e .` for faster "
        "NF4 quantization and dequantization and the fused CPU ops.",
        stacklevel=4,
    )


def _cpp_serves(device: torch.device) -> bool:
    """The C++ extension is built and has a kernel for this device type."""
    if not nf4_cpp.available():
        return False
    return device.type == "cpu" or (device.type == "cuda" and nf4_cpp.has_cuda())


def choose_backend(device: torch.device | str, backend: str | None = None) -> str:
    """The backend ("torch", "triton" or "cpp") that runs an op on `device`; see the module doc.

    An explicit backend that cannot run here raises (RuntimeError, with the reason) instead of
    silently running something else; None never raises.
    """
    device = torch.device(device)
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        if backend == "triton" and _triton_kernels()[0] is None:
            raise RuntimeError(f"backend='triton' requested but triton is unusable: {_triton_kernels()[1]}")
        if backend == "cpp" and not _cpp_serves(device):
            why = ("the C++ extension is not built (pip install --no-build-isolation -e .)" if not nf4_cpp.available()
                   else f"the C++ extension has no {device.type} kernels")
            raise RuntimeError(f"backend='cpp' requested for a {device.type} tensor but {why}")
        return backend
    if device.type == "cuda":
        mod, why = _triton_kernels()
        if mod is None:
            warnings.warn(f"lora_engine: triton unavailable ({why}); using the PyTorch reference", stacklevel=3)
            return "torch"
        if torch.cuda.get_device_capability(device) < (7, 5):
            warnings.warn("lora_engine: GPU older than sm_75; using the PyTorch reference kernels", stacklevel=3)
            return "torch"
        return "triton"
    if device.type == "cpu":
        if nf4_cpp.available():
            return "cpp"
        _warn_no_cpp()
    return "torch"


def resolve(x: torch.Tensor, backend: str | None) -> str:
    """Which backend runs an op whose main input is x: choose_backend(x.device, backend)."""
    return choose_backend(x.device, backend)


def _impl(x: torch.Tensor, backend: str | None):
    # "cpp": the fused CPU elementwise ops; ops_cpp runs the reference for the matmul ops and for
    # inputs its C++ ops do not take (a GPU tensor, fp16, mixed dtypes). bf16 activations run them
    # forward and backward. fp32 is the exact path, equal to transformers' logits to 2e-5 over 30
    # layers (tests/test_embedded.py), which the fused forwards' reordered sums and polynomial exp
    # are not: its forward stays the reference's ops and only backward is fused (one pass where
    # SwiGLU's reference backward makes ten).
    be = resolve(x, backend)
    if be == "triton":
        return _triton_kernels()[0]
    if be != "cpp":
        return ops_reference
    return ops_cpp if x.dtype == torch.bfloat16 else ops_cpp.exact_forward_ops


def rms_norm(x, weight, eps, backend=None):
    """(..., D) -> (..., D). See kernels/ops_reference.py:rms_norm."""
    return _impl(x, backend).rms_norm(x, weight, eps)


def rope(q, k, cos, sin, backend=None):
    """q (B, Hq, T, hd), k (B, Hk, T, hd), cos/sin (B, T, hd) -> (q', k')."""
    return _impl(q, backend).rope(q, k, cos, sin)


def swiglu(gate, up, backend=None):
    """silu(gate) * up."""
    return _impl(gate, backend).swiglu(gate, up)


def attention(q, k, v, is_causal, scale, mask=None, backend=None, softcap=None, window=None):
    """softmax(q k^T * scale [+ mask | causal]) v; q (B, H, T, hd), k and v (B, Hk, S, hd) -> (B, H, T, hd).
    softcap: scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2).
    window: a sliding window, keys p - window < key <= p for the query at position p (causal implied,
    the queries the last T of the S positions), in O(S x W) time and memory on every backend; not
    together with a mask.
    "cpp" on CPU runs kernels/attention_cpp.py for bf16 inputs it serves (no mask, no softcap, T == S;
    a window it takes); a softcap is checked here and falls back to the reference; fp32 stays on SDPA,
    the exact path against transformers, and no slower than attention_cpp in fp32
    (bench/results/attention_cpp.md); every other case, and the "torch" and "triton" backends, run
    ops_reference.attention (torch's SDPA; with a softcap its eager expression; with a window by chunks
    of queries, kernels/window_attention.py). "triton" on a GPU (or a CPU under TRITON_INTERPRET=1) runs
    the flash attention of kernels/attention_triton.py where it serves (no mask; causal with T == S or a
    window; head dim <= 256), soft-cap and window included; elsewhere the reference."""
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be a number of keys >= 1, got {window}")
    if (mask is None and softcap is None and q.dtype == torch.bfloat16 and resolve(q, backend) == "cpp"
            and attention_cpp.served(q, k, v)):
        if window is None:
            return attention_cpp.attention(q, k, v, is_causal, scale)
        return attention_cpp.attention(q, k, v, True, scale, window=window)
    if resolve(q, backend) == "triton":
        from lora_engine.kernels import attention_triton

        if attention_triton.serves(q, k, v, is_causal, mask, window):
            return attention_triton.attention(q, k, v, is_causal, scale, softcap, window)
    return ops_reference.attention(q, k, v, is_causal, scale, mask, softcap, window)


def linear_cross_entropy(hidden, weight, labels, ignore_index=-100, reduction="mean", backend=None,
                         chunk_size=None):
    """Chunked head matmul + cross-entropy; hidden (N, H), weight (V, H), labels (N,) -> fp32 scalar.
    chunk_size: tokens per (chunk, V) block of logits (None: the backend's default)."""
    return _impl(hidden, backend).linear_cross_entropy(hidden, weight, labels, ignore_index, reduction, chunk_size)


def lora_linear(x, weight, bias, lora_A, lora_B, scale, x_dropped=None, backend=None):
    """y = x W^T (+ b) + scale * (dropout(x) A^T) B^T.

    weight is a dense (out, in) tensor or an NF4 weight (kernels/nf4_format.py:NF4Tensor), whose
    base is dequantized on the fly in forward and again in backward, never stored.
    """
    if _is_nf4(weight):
        return _nf4_impl(x, backend).nf4_lora_linear(x, weight, bias, lora_A, lora_B, scale, x_dropped)
    return _impl(x, backend).lora_linear(x, weight, bias, lora_A, lora_B, scale, x_dropped)


# ---- NF4 (QLoRA) ---------------------------------------------------------------------------------
# Three modules with the same functions: kernels/nf4_reference.py (pure PyTorch, bit-exact with
# bitsandbytes), kernels/nf4_triton.py, kernels/nf4_cpp.py (the reference around the C++ ops).


def _is_nf4(weight) -> bool:
    return isinstance(weight, NF4Tensor)


def _nf4_impl(x: torch.Tensor, backend: str | None):
    be = resolve(x, backend)
    if be == "triton":
        from lora_engine.kernels import nf4_triton

        return nf4_triton
    return nf4_cpp if be == "cpp" else nf4_reference


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, backend=None) -> NF4Tensor:
    """w (fp32/fp16/bf16) -> NF4Tensor, bitsandbytes' bytes. There is no Triton quantizer (it runs once per
    weight): "triton" quantizes with the reference, and "cpp" on a GPU tensor too (the C++ op is CPU-only)."""
    nf4_reference.check_quantize_args(w, blocksize)
    if resolve(w, backend) == "cpp" and w.device.type == "cpu":
        return nf4_cpp.nf4_quantize(w, blocksize, double_quant)
    return nf4_reference.nf4_quantize(w, blocksize, double_quant)


def nf4_dequantize(weight: NF4Tensor, dtype: torch.dtype, backend=None) -> torch.Tensor:
    """NF4Tensor -> dense tensor of weight.shape in `dtype`: code[q] * absmax[block], cast once."""
    return _nf4_impl(weight.packed, backend).nf4_dequantize(weight, dtype)


def nf4_linear(x, weight, bias=None, backend=None) -> torch.Tensor:
    """y = x W^T (+ b) with W in NF4; differentiable in x (W is frozen)."""
    return _nf4_impl(x, backend).nf4_linear(x, weight, bias)


def set_backend(model: torch.nn.Module, backend: str | None) -> torch.nn.Module:
    """Set the kernel backend of every module of `model` that dispatches (None = auto)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    for m in model.modules():  # an unusable backend raises at the first forward, naming the reason
        if hasattr(m, "backend"):
            m.backend = backend
    return model


# ---- Gated DeltaNet (Qwen3.5 linear attention): the gated delta rule and the short causal conv1d ----
# "torch" and "cpp" run the chunked PyTorch form (kernels/delta_rule_chunked.py; there is no C++ op, its
# GEMMs are already batched) and conv1d's reference; "triton" the kernels of kernels/delta_rule_triton.py
# and kernels/conv1d_triton.py. The fp64 oracle is kernels/delta_rule_reference.py.


def gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, backend=None,
                     chunk_size=None):
    """q, k (B, T, H, dk) L2-normalised, v (B, T, H, dv), g (log decay, <= 0) and beta (B, T, H), initial_state
    (B, H, dk, dv) or None -> (o (B, T, H, dv) in v's dtype, final state (B, H, dk, dv) fp32 or None), the
    recurrence of kernels/delta_rule_reference.py; differentiable in every tensor. chunk_size: tokens per
    chunk (None: 64)."""
    from lora_engine.kernels import delta_rule_chunked

    chunk = delta_rule_chunked.DEFAULT_CHUNK if chunk_size is None else chunk_size
    if resolve(v, backend) == "triton":
        from lora_engine.kernels import delta_rule_triton

        return delta_rule_triton.gated_delta_rule(q, k, v, g, beta, scale, initial_state, output_final_state, chunk)
    return delta_rule_chunked.gated_delta_rule_chunked(q, k, v, g, beta, scale, initial_state, output_final_state,
                                                       chunk)


def causal_conv1d(x, weight, bias=None, activation="silu", initial_state=None, backend=None):
    """x (B, T, C), weight (C, 1, K) as nn.Conv1d stores it, bias (C,) or None, initial_state (B, C, K - 1) or
    None -> act(depthwise causal conv) (B, T, C) in x's dtype; see kernels/conv1d_reference.py."""
    from lora_engine.kernels import conv1d_reference

    if resolve(x, backend) == "triton":
        from lora_engine.kernels import conv1d_triton

        return conv1d_triton.causal_conv1d(x, weight, bias, activation, initial_state)
    return conv1d_reference.causal_conv1d(x, weight, bias, activation, initial_state)


# ---- mixture of experts ------------------------------------------------------------------------------
# kernels/moe_reference.py is the oracle; kernels/moe_grouped.py the differentiable op over two
# implementations: per-expert CPU GEMMs and kernels/moe_triton.py's grouped GEMM with the LoRA shrink fused.


def moe_grouped_mm(x, counts, w, bias=None, a=None, b=None, scale=1.0, backend=None):
    """y_e = x_e W_e^T (+ bias_e) + scale * (x_e A_e^T) B_e^T over the expert groups of x (M, K); counts (E,);
    w (E, N, K), possibly a transposed view of (E, K, N); bias (E, N); a (E, r, K), b (E, N, r) or both None.
    Differentiable in x, a, b, bias, and in w only when w requires grad (the frozen base never forms dW).
    "torch" runs the reference loop under autograd, "triton" kernels/moe_triton.py, and a CPU tensor under "cpp"
    or auto the per-expert CPU GEMMs of kernels/moe_grouped.py: plain torch, so auto takes them also where the
    C++ extension is not built (it has no MoE op).
    w may also be a list of E NF4Tensors, each expert's (N, K) (kernels/moe_nf4.py): every backend then runs the
    per-expert GEMMs, dequantizing one active expert at a time with its NF4 backend's dequantize."""
    from lora_engine.kernels import moe_grouped, moe_reference

    if isinstance(w, (list, tuple)):
        from lora_engine.kernels import moe_nf4

        return moe_nf4.grouped_mm_nf4(x, counts, w, bias, a, b, scale, _nf4_impl(x, backend).nf4_dequantize)

    be = "cpp" if backend is None and x.device.type == "cpu" else resolve(x, backend)
    if be == "triton":
        from lora_engine.kernels import moe_triton

        return moe_grouped.grouped_mm(x, counts, w, bias, a, b, scale, moe_triton.IMPL)
    if be == "cpp" and x.device.type == "cpu":
        return moe_grouped.grouped_mm(x, counts, w, bias, a, b, scale, moe_grouped.CPU)
    moe_grouped.check_args(x, counts, w, bias, a, b)
    return moe_reference.grouped_lora_mm(x, counts, w, bias, a, b, scale)
