"""Every backend under torch.autocast (bf16 and fp16): kernels/amp.py's rule, training against fp32,
and `python -m lora_engine.train --precision bf16|fp16` on the reference path.

Three layers of checks:
  1. the rule, op by op and backend by backend: under autocast a matmul op gives exactly what it
     gives, without autocast, on inputs cast by hand to the autocast dtype; the result has that
     dtype, the loss stays fp32, and fp32 inputs (the adapters) get fp32 gradients;
  2. a few training steps of a tiny random model, {LoRA, QLoRA} x {bf16, fp16} x {torch, triton},
     against the same steps in fp32, within tolerances derived below;
  3. the command line with --precision bf16 / fp16 for LoRA and QLoRA (CPU, auto backend: the
     PyTorch reference and, for NF4, the C++ dequantizer).

fp16 autocast on CPU: torch 2.13 supports it for every op involved (F.linear, matmul, addmm,
scaled_dot_product_attention, the elementwise ops); the trainer pairs it with a GradScaler on
CPU as on a GPU, and these tests run that path too.
"""

import json
import math

import pytest
import torch

from lora_engine import dispatch
from lora_engine.dispatch import set_backend
from lora_engine.kernels import nf4_cpp
from lora_engine.lora.layers import LoraConfig, apply_lora
from lora_engine.models.decoder import CausalLM
from lora_engine.quant import nf4
from lora_engine.train import step as trainer
from lora_engine.train.command import main
from tests.conftest import TOLERANCE, tiny_config
from tests.kernel_utils import device, needs_triton
from tests.test_train_support import chat_records, write_jsonl

AMP_DTYPES = [torch.bfloat16, torch.float16]
BACKENDS = [
    "torch",
    pytest.param("triton", marks=needs_triton),
]


def _dev(backend: str) -> str:
    """torch and triton run on the GPU when there is one (the reference serves a GPU without triton)."""
    return "cpu" if backend == "cpp" else device()


def _needs_cpp(backend: str) -> None:
    if backend == "cpp" and not nf4_cpp.available():
        pytest.skip("the C++ extension is not built here (LORA_ENGINE_NO_EXT=1 or no compiler); CI builds it")


def _nf4_backend(backend: str) -> str | None:
    # dispatch picks the C++ dequantizer on CPU only in auto mode (backend=None).
    return None if backend == "cpp" else backend


# ---- 1. the rule, op by op ------------------------------------------------------------------------


def _leaves(dev, *shapes, scale=1.0):
    g = torch.Generator().manual_seed(0)
    return [(scale * torch.randn(s, generator=g)).to(dev).requires_grad_() for s in shapes]


def _run(fn, inputs, amp: torch.dtype | None, dev: str):
    """fn(*inputs) under autocast(amp) (None: without autocast); -> (output, grads of the inputs)."""
    with torch.autocast(torch.device(dev).type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        out = fn(*inputs)
    grads = torch.autograd.grad(out.float().square().sum(), inputs)
    return out, grads


def _check_rule(fn, inputs, dt, dev, out_dtype):
    """Under autocast: out_dtype output, fp32 grads, equal bit for bit to the op on hand-cast inputs."""
    got, got_g = _run(fn, inputs, dt, dev)
    assert got.dtype == out_dtype
    assert all(g.dtype == torch.float32 for g in got_g)
    # The same op without autocast on inputs cast by hand (the casts in the graph, as autocast does).
    want, want_g = _run(lambda *a: fn(*(t.to(dt) for t in a)), inputs, None, dev)
    assert want.dtype == out_dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dt", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_lora_linear_follows_the_rule(backend, dt):
    dev = _dev(backend)
    # Weights frozen (no grad) like LoRA's; x, dropout(x), A, B, bias in fp32 as autocast finds them.
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(1)).to(dev) / 5
    x, xd, A, B, b = _leaves(dev, (2, 5, 24), (2, 5, 24), (4, 24), (40, 4), (40,), scale=0.5)

    def op(x, xd, A, B, b):
        return dispatch.lora_linear(x, w.to(x.dtype), b, A, B, 2.0, x_dropped=xd, backend=backend)

    _check_rule(op, [x, xd, A, B, b], dt, dev, dt)


@pytest.mark.parametrize("dt", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", ["torch", "cpp", pytest.param("triton", marks=needs_triton)])
def test_nf4_linear_and_lora_linear_follow_the_rule(backend, dt):
    _needs_cpp(backend)
    dev = _dev(backend)
    w = nf4.quantize(torch.randn(40, 24, generator=torch.Generator().manual_seed(1)) / 5).to(dev)
    x, A, B = _leaves(dev, (2, 5, 24), (4, 24), (40, 4), scale=0.5)
    be = _nf4_backend(backend)
    _check_rule(lambda x, A, B: dispatch.lora_linear(x, w, None, A, B, 2.0, backend=be), [x, A, B], dt, dev, dt)
    _check_rule(lambda x: dispatch.nf4_linear(x, w, backend=be), [x], dt, dev, dt)


@pytest.mark.parametrize("dt", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_cross_entropy_follows_the_rule_and_keeps_the_loss_fp32(backend, dt):
    dev = _dev(backend)
    h, w = _leaves(dev, (30, 16), (50, 16))
    labels = torch.randint(0, 50, (30,), generator=torch.Generator().manual_seed(2)).to(dev)
    labels[::4] = -100

    def op(h, w):
        return dispatch.linear_cross_entropy(h, w, labels, backend=backend)

    _check_rule(op, [h, w], dt, dev, torch.float32)


# ---- 2. training steps against fp32 ---------------------------------------------------------------

CFG = tiny_config()
STEPS = 2  # the second step checks the update (optimizer, fp16 scaler) as well

# Tolerances of the autocast runs against fp32, relative (gradients norm-wise per adapter tensor),
# derived in tests/conftest.py's TOLERANCE.
AMP_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16"}
GRAD_TOL = {dt: TOLERANCE[f"amp_grad_{n}"][0] for dt, n in AMP_NAME.items()}
LOSS_TOL = {dt: TOLERANCE[f"amp_loss_{n}"][0] for dt, n in AMP_NAME.items()}
# SGD, not AdamW: Adam's first step is lr * sign(g) element by element, so a gradient element near
# zero that rounding flips moves its parameter by 2 lr in any precision; SGD's step is proportional
# to the gradient, so the parameters after a step differ by lr times the gradient's error only.
LR = 0.5


def _tiny_model(qlora: bool, backend: str) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(CFG)
    with torch.no_grad():  # random norm weights, so a dtype slip in a norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    if qlora:
        nf4.quantize_model(model)  # every projection; the head stays dense (nf4.DEFAULT_SKIP)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8), verbose=False)  # all seven projections
    with torch.no_grad():  # B starts at zero; nonzero B so every adapter path carries a gradient
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    set_backend(model, backend)
    return model.to(device())


def _batch() -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CFG.vocab_size, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that carries no loss
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "where": ["0", "1"]}


def _train(qlora: bool, backend: str, amp: torch.dtype | None):
    """STEPS SGD steps through trainer.train_step -> (losses, the gradients each step applied)."""
    model = _tiny_model(qlora, backend)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    sched = trainer.make_scheduler(opt, warmup_steps=0, total_steps=10**6)  # ~constant lr
    scaler = torch.amp.GradScaler(device()) if amp == torch.float16 else None  # as train_loop does
    applied = []
    # Called inside optimizer.step, after the scaler has unscaled: the gradients that move the weights.
    opt.register_step_pre_hook(lambda *_: applied.append([p.grad.clone() for p in params]))
    losses = [trainer.train_step(model, opt, sched, [_batch()], max_grad_norm=None, amp=amp, scaler=scaler).loss
              for _ in range(STEPS)]
    return losses, applied


_FP32 = {}


def _fp32_run(qlora: bool):
    # The oracle: the PyTorch reference in fp32 (the Triton kernels equal it to ~1e-6 there,
    # tests/test_kernels_train.py), computed once per model kind.
    if qlora not in _FP32:
        _FP32[qlora] = _train(qlora, "torch", None)
    return _FP32[qlora]


@pytest.mark.parametrize("dt", AMP_DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("qlora", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_training_matches_fp32(backend, qlora, dt):
    want_losses, want_grads = _fp32_run(qlora)
    losses, grads = _train(qlora, backend, dt)
    assert len(grads) == STEPS  # no step was skipped (fp16: the scaler found no overflow)
    assert all(g.dtype == torch.float32 for g in grads[0])  # fp32 adapters keep fp32 gradients
    for step, (got, want) in enumerate(zip(grads, want_grads)):
        for i, (a, b) in enumerate(zip(got, want)):
            rel = float((a - b).norm() / b.norm())
            assert rel <= GRAD_TOL[dt], f"step {step + 1}, adapter tensor {i}: relative gradient error {rel:.3g}"
    for step, (a, b) in enumerate(zip(losses, want_losses)):
        assert abs(a - b) <= LOSS_TOL[dt] * abs(b), f"step {step + 1}: loss {a} vs fp32 {b}"
    assert want_losses[-1] < want_losses[0] - 0.01, want_losses  # the steps move the loss: a real comparison


# ---- 3. the command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_records(24))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_cli_trains_under_autocast_on_the_reference_path(folder, data, tmp_path, quantize, precision):
    """`python -m lora_engine.train --precision bf16 --max-steps 2` (issue 9): it crashed in add_low_rank."""
    out = tmp_path / "run"
    rc = main(["--model", str(folder), "--data", str(data), "--out", str(out), "--max-steps", "2",
               "--batch-size", "4", "--r", "4", "--max-length", "64", "--quantize", quantize,
               "--precision", precision, "--device", "cpu", "--no-general-eval", "--no-plot"])
    assert rc == 0 and (out / "adapter/adapter_model.safetensors").is_file()
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "completed" and m["config"]["precision"] == precision
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
