"""A tiny model trained 20 steps with the Triton kernels (interpreter) and with the reference gives
the same losses: every kernel's forward and backward inside a real training graph.

Kept tiny for the interpreter (~0.05-0.2 s a launch on CI's 2 cores): one layer, LoRA with
dropout on two projections (one in attention, one in the MLP), ~15 launches a step.
"""

import torch

from lora_engine.dispatch import set_backend
from lora_engine.lora.layers import LoraConfig, apply_lora
from lora_engine.models.decoder import CausalLM
from tests.conftest import tiny_config, tol
from tests.kernel_utils import device, needs_triton

pytestmark = needs_triton

CFG = tiny_config(num_hidden_layers=1)


def _train(backend: str, steps: int = 20) -> list[float]:
    torch.manual_seed(0)
    model = CausalLM(CFG)
    with torch.no_grad():  # random norm weights, so a wrong RMSNorm weight path shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=("q_proj", "down_proj"))
    apply_lora(model, lora, verbose=False)
    model.to(device())
    set_backend(model, backend)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    # One fixed batch, so the adapters memorise it and the loss falls far.
    ids = torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)).to(device())
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that carries no loss
    losses = []
    for _ in range(steps):
        loss = model.loss(ids, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_training_with_triton_kernels_matches_reference(monkeypatch):
    from lora_engine import dispatch

    triton_kernels = dispatch.triton_ops()

    calls = {}

    def spy(name):
        f = getattr(triton_kernels, name)

        def counted(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return f(*a, **k)
        return counted

    for name in ("rms_norm", "rope", "swiglu", "linear_cross_entropy", "lora_linear"):
        monkeypatch.setattr(triton_kernels, name, spy(name))
    ours = _train("triton")
    assert set(calls) == {"rms_norm", "rope", "swiglu", "linear_cross_entropy", "lora_linear"}, calls
    want = _train("torch")
    assert want[-1] < want[0] - 0.5, want  # it learns something, so the comparison means something
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(want), **tol("train_fp32"))
