"""Activations rebuilt in backward (lora_engine/models/rebuild.py): the rebuilt tensor's storage dies
after forward although a LoRA backward needs it, it is made again once for all its readers, and the
outputs and gradients equal the path that keeps it, bit for bit; nesting and outer hooks."""

import pytest
import torch

from lora_engine import dispatch
from lora_engine.kernels import ops_cpp as cf
from lora_engine.models import rebuild

needs_ops = pytest.mark.skipif(not cf.available(), reason="C++ extension not built (pip install --no-build-isolation -e .)")


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_ops)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_into_keeps_no_copy_of_the_product_and_gives_the_same_gradients(backend, dtype):
    """The SwiGLU output fed to a LoRA down projection is freed after forward (its storage dies,
    although the LoRA backward needs it) and rebuilt in backward: output and gradients equal the
    plain path's bit for bit."""
    import gc
    import weakref

    import lora_engine as le

    torch.manual_seed(0)
    mlp = torch.nn.ModuleDict({"down_proj": torch.nn.Linear(48, 16).to(dtype)})
    le.apply_lora(mlp, le.LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]), verbose=False)
    down = mlp["down_proj"]
    params = [p for p in down.parameters() if p.requires_grad]
    assert len(params) == 2  # lora_A, lora_B: A's gradient needs the SwiGLU output
    for p in params:
        torch.nn.init.normal_(p, std=0.1)
    g0, u0 = torch.randn(2, 7, 48, dtype=dtype) * 3, torch.randn(2, 7, 48, dtype=dtype)
    dy = torch.randn(2, 7, 16, dtype=dtype)
    storages = []

    def fn(h):
        storages.append(weakref.ref(h.untyped_storage()))  # dies with the memory, not with the view
        return down(h)

    results = []
    for fused in (False, True):
        g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
        storages.clear()
        y = rebuild.swiglu_into(g, u, fn, backend=backend) if fused else fn(dispatch.swiglu(g, u, backend=backend))
        gc.collect()
        assert (storages[0]() is None) == fused  # plain: LoRA's backward holds it; fused: nothing does
        results.append((y.detach(), torch.autograd.grad(y, [g, u, *params], dy)))
    (y0, grads0), (y1, grads1) = results
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))


def _lora_linears(names, d_in, d_out, dtype):
    import lora_engine as le

    mods = torch.nn.ModuleDict({n: torch.nn.Linear(d_in, d_out).to(dtype) for n in names})
    le.apply_lora(mods, le.LoraConfig(r=4, lora_alpha=8, target_modules=list(names)), verbose=False)
    params = [p for p in mods.parameters() if p.requires_grad]
    for p in params:  # lora_B starts at zero; nonzero, so that A's gradient (which reads the input) is too
        torch.nn.init.normal_(p, std=0.1)
    return mods, params


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_ops)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("amp", [False, True])
def test_rms_norm_into_rebuilds_the_normed_input_once_for_all_its_readers(backend, dtype, amp):
    """A layer's normed input read by three LoRA projections (q, k, v) is freed after forward, although
    their backward needs it, and made again once in backward for all three (under the forward's
    autocast); output and gradients equal the plain path's bit for bit."""
    import gc
    import weakref

    torch.manual_seed(0)
    mods, params = _lora_linears(("q", "k", "v"), 24, 8, dtype)
    w = (1 + 0.2 * torch.randn(24)).to(dtype).requires_grad_()
    x0, dy = torch.randn(2, 5, 24, dtype=dtype) * 2, torch.randn(2, 5, 24, dtype=dtype)
    storages, made = [], []
    real = dispatch.rms_norm
    kept = not (amp and dtype == torch.float32)  # else LoRA keeps its bf16 copy of h (kernels/amp.py), not h

    def counting_norm(*a, **k):
        made.append(1)
        return real(*a, **k)

    def fn(h):
        storages.append(weakref.ref(h.untyped_storage()))
        return torch.cat([mods[n](h) for n in ("q", "k", "v")], -1)

    results = []
    for fused in (False, True):
        x = x0.clone().requires_grad_()
        storages.clear()
        made.clear()
        dispatch.rms_norm = counting_norm
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                if fused:
                    y = rebuild.rms_norm_into(x, w, 1e-5, fn, backend=backend)
                else:
                    y = fn(dispatch.rms_norm(x, w, 1e-5, backend=backend))
            gc.collect()
            # plain: the LoRA backward holds it; rebuilt: nothing does
            assert (storages[0]() is None) == (fused or not kept)
            results.append((y.detach(), torch.autograd.grad(y, [x, w, *params], dy)))
        finally:
            dispatch.rms_norm = real
        assert len(made) == (2 if fused and kept else 1)  # forward, and one rebuild shared by q, k and v
    (y0, grads0), (y1, grads1) = results
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(grads0, grads1))


def test_rebuilt_into_nests_and_lets_a_composable_observer_see_the_rest():
    """An MLP after a norm: the normed input (gate, up) and the SwiGLU product (down) are both rebuilt,
    the inner hook handing everything else to the outer one; a composable observer outside sees every
    saved tensor but those two, and a non-composable hook (checkpointing) turns rebuilding off."""
    torch.manual_seed(0)
    mods, params = _lora_linears(("gate", "up"), 16, 40, torch.float32)
    down, down_params = _lora_linears(("down",), 40, 16, torch.float32)
    params += down_params
    w = (1 + 0.2 * torch.randn(16)).requires_grad_()
    x0, dy = torch.randn(3, 16), torch.randn(3, 16)

    def mlp(h):
        return rebuild.swiglu_into(mods["gate"](h), mods["up"](h), down["down"])

    def run(mode):
        x = x0.clone().requires_grad_()
        seen = []

        def pack(t):
            seen.append(tuple(t.shape))
            return t

        pack.composable = mode != "opaque"
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        with hooks:
            if mode == "plain":
                h = dispatch.rms_norm(x, w, 1e-5)
                y = down["down"](dispatch.swiglu(mods["gate"](h), mods["up"](h)))
            else:
                y = rebuild.rms_norm_into(x, w, 1e-5, mlp)
        return seen, y.detach(), torch.autograd.grad(y, [x, w, *params], dy)

    seen_plain, y0, g0 = run("plain")
    seen, y1, g1 = run("rebuilt")
    seen_opaque, y2, g2 = run("opaque")
    assert seen_plain.count((3, 16)) == seen_opaque.count((3, 16)) == seen.count((3, 16)) + 2  # the norm's x stays
    assert seen_plain.count((3, 40)) == seen_opaque.count((3, 40)) == seen.count((3, 40)) + 1  # gate, up stay
    assert torch.equal(y0, y1) and torch.equal(y0, y2)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(g0, g1, g2))
