"""torch.compile and fake tensors through the engine's real code path (CPU: the reference and C++ ops).

`torch.compile(model.loss, fullgraph=True)` must trace a LoRA and a QLoRA model with no graph break
(fullgraph raises on the first one) and give the eager loss and gradients; every op must also run
under FakeTensorMode, which is how a compiler, FSDP2 and a memory plan see a step without running it.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import lora_engine as le
from lora_engine import dispatch
from lora_engine.kernels import nf4_cpp
from lora_engine.models.decoder import CausalLM
from tests.conftest import tiny_config


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


CFG = tiny_config()


def _model(quantized: bool, backend: str | None) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(CFG)
    if quantized:
        le.nf4.quantize_model(model)
    le.apply_lora(model, le.LoraConfig(r=4, lora_alpha=8), verbose=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would hide a wrong gradient of A
            torch.nn.init.normal_(p, std=0.02)
    dispatch.set_backend(model, backend)
    return model


def _loss_and_grads(model, loss_fn, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(ids, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


BACKENDS = ["torch", pytest.param("cpp", marks=pytest.mark.skipif(not nf4_cpp.available(),
                                                                   reason="C++ extension not built"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_compiled_loss_has_no_graph_break_and_equals_eager(quantized, backend):
    torch._dynamo.reset()
    model = _model(quantized, backend)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG.vocab_size, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt: ignored tokens must stay ignored in the traced loss
    want, want_grads = _loss_and_grads(model, model.loss, ids, labels)
    compiled = torch.compile(model.loss, fullgraph=True)  # raises on any graph break
    got, got_grads = _loss_and_grads(model, compiled, ids, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) == 7 * 2 * CFG.num_hidden_layers
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_loss_rejects_an_out_of_vocabulary_label():
    """The eager label check cannot branch on data under compile; in the graph an assert (or, first,
    inductor's own bounds check on the gather) still stops the step instead of training on garbage."""
    torch._dynamo.reset()
    model = _model(False, "torch")
    ids = torch.randint(0, CFG.vocab_size, (1, 6))
    labels = ids.clone()
    labels[0, 3] = CFG.vocab_size
    with pytest.raises(ValueError, match="label 64 is outside the vocabulary"):
        model.loss(ids, labels)
    with pytest.raises(RuntimeError, match="outside the vocabulary|index out of bounds"):
        torch.compile(model.loss, fullgraph=True)(ids, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_a_training_step_runs_on_fake_tensors(quantized, backend):
    """Forward and backward of the whole model under FakeTensorMode: shapes only, nothing computed."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # constants (the NF4 code) become fake
        model = _model(quantized, backend)
        for _, m in model.named_modules():  # the NF4 weights too: they are plain attributes
            w = getattr(m, "weight", None)
            if isinstance(w, le.nf4.NF4Tensor):
                assert all(mode.is_our_fake(t) for t in (w.packed, w.absmax) if t is not None)
        ids = torch.randint(0, CFG.vocab_size, (2, 12))
        loss = model.loss(ids, ids)
        loss.backward()
        assert loss.shape == () and loss.dtype == torch.float32
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and mode.is_our_fake(g) for g in grads)


@pytest.mark.skipif(not nf4_cpp.available(), reason="C++ extension not built")
def test_cpp_ops_have_fake_implementations():
    w = torch.randn(6, 40)
    q = le.nf4.quantize(w, 32, backend="cpp")
    with FakeTensorMode() as mode:
        fw = mode.from_tensor(w)
        packed, absmax = torch.ops.lora_engine.nf4_quantize(fw, mode.from_tensor(q.code), 32)
        assert (packed.shape, packed.dtype, absmax.shape, absmax.dtype) == ((120,), torch.uint8, (8,), torch.float32)
        out = torch.ops.lora_engine.nf4_dequantize(mode.from_tensor(q.packed), mode.from_tensor(absmax.new_empty(8)),
                                                   mode.from_tensor(q.code), 32, 240, torch.bfloat16)
        assert (out.shape, out.dtype) == ((240,), torch.bfloat16)


# ---- the Triton launchers as custom ops -----------------------------------------------------------

TRITON_OPS = ["swiglu_fwd_triton", "swiglu_bwd_triton", "rms_norm_fwd_triton", "rms_norm_bwd_triton", "rope_triton",
              "cross_entropy_rows_triton", "lora_mm_triton", "nf4_dequantize_triton", "nf4_matmul_triton"]


def _triton_op_samples():
    """One call of every Triton launcher op on small CPU tensors (run by the interpreter)."""
    from lora_engine.kernels import nf4_triton
    from lora_engine.kernels.nf4_reference import nf4_quantize

    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    w = nf4_quantize(r(24, 64), 64, True)
    parts = (*nf4_triton._weight_args(w), w.blocksize, True, w.nested_blocksize)
    return {
        "swiglu_fwd_triton": (r(3, 40), r(3, 40)),
        "swiglu_bwd_triton": (r(3, 40), r(3, 40), r(3, 40)),
        "rms_norm_fwd_triton": (r(5, 48), r(48), 1e-6),
        "rms_norm_bwd_triton": (r(5, 48), r(5, 48), r(48), r(5).abs() + 0.5, True),
        "rope_triton": (r(1, 4, 6, 16), r(1, 2, 6, 16), r(1, 6, 16), r(1, 6, 16), False),
        "cross_entropy_rows_triton": (r(6, 50), torch.tensor([1, -100, 3, 49, 0, 7]), -100, True, 16),
        "lora_mm_triton": (r(7, 32), r(32, 24), r(7, 4), r(4, 24), 0.5, r(24), torch.float32),
        "nf4_dequantize_triton": (*parts, [24, 64], torch.float32),
        "nf4_matmul_triton": (r(5, 64), *parts, 24, 64, True, None),
    }


@pytest.mark.skipif(not _interpreting(), reason="runs the Triton ops on CPU: needs TRITON_INTERPRET=1, as CI sets")
@pytest.mark.parametrize("name", TRITON_OPS)
def test_triton_launcher_is_a_custom_op_whose_fake_matches_it(name):
    """torch.library.opcheck: the schema is right and the fake implementation gives the real op's
    shapes, strides and dtypes (what torch.compile and a memory plan rely on)."""
    from lora_engine import dispatch

    dispatch.triton_ops()  # imports every launcher: registers the ops
    from lora_engine.kernels import nf4_triton  # noqa: F401

    op = getattr(torch.ops.lora_engine, name)
    torch.library.opcheck(op, _triton_op_samples()[name],
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_a_triton_training_step_runs_on_fake_tensors_without_a_gpu_or_the_interpreter(monkeypatch):
    """The Triton path of a QLoRA step on fake tensors: what a memory plan for a GPU runs on a CPU-only
    machine. Fake CUDA tensors are unreliable without a CUDA build of torch (Tensor.to, indexing and
    RNG ops fail), so the plan runs on fake CPU tensors; the launchers accept those without
    TRITON_INTERPRET because nothing is launched, only the custom ops' fakes run."""
    pytest.importorskip("triton")
    from lora_engine.kernels import _common

    monkeypatch.setattr(_common, "interpreting", lambda: False)  # as on a machine without the interpreter
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        model = _model(True, "triton")
        ids = torch.randint(0, CFG.vocab_size, (2, 12))
        loss = model.loss(ids, ids)
        loss.backward()
        assert mode.is_our_fake(loss)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    real = torch.ones(2, 8)
    with pytest.raises(ValueError, match="CPU tensor; Triton kernels need a CUDA device"):
        _common.check_device("op", x=real)
