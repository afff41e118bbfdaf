"""Long-context memory options (issue 11 item 4): offloaded checkpoints, the chunked MLP, plain causal SDPA.

Each option changes where tensors live, never what a step computes: the loss and gradients of a
tiny LoRA / QLoRA model on CPU are compared with the plain step's. Offloading recomputes the same
ops on the same inputs, so it is bit for bit; the chunked MLP sums the weight gradients block by
block, so it is equal to rounding (fp32, relative 1e-5).
"""

from __future__ import annotations

import json

import pytest
import torch

from lora_engine import plan as P
from lora_engine.lora.layers import LoraConfig, apply_lora
from lora_engine.models import decoder
from lora_engine.models.config import ModelConfig
from lora_engine.models.decoder import CausalLM
from lora_engine.models.recompute import chunked_rows
from lora_engine.quant.nf4 import quantize_model
from lora_engine.train import planning
from lora_engine.train.config import TrainConfig

TINY = {"model_type": "llama", "vocab_size": 97, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "torch_dtype": "float32"}


def tiny_lora(quantize: str = "none", dropout: float = 0.0) -> CausalLM:
    torch.manual_seed(0)
    model = CausalLM(ModelConfig.from_hf(TINY))
    if quantize == "nf4":
        quantize_model(model)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8.0, lora_dropout=dropout), verbose=False)
    with torch.no_grad():  # lora_B starts at zero, which would leave lora_A's gradient zero too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.train()


def step(model: CausalLM, amp=None, seed: int = 1, **options) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward + backward of a fixed batch with the given model attributes set; (loss, grads by name)."""
    for k, v in options.items():
        setattr(model, k, v)
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY["vocab_size"], (2, 37), generator=g)  # 37: not a multiple of any chunk
    torch.manual_seed(seed)  # dropout masks
    with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        loss = model.loss(ids, ids)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(a, b, exact: bool):
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys() and len(ga) > 0
    assert all(g.abs().sum() > 0 for g in ga.values())  # every adapter trains, also the first layer's
    if exact:
        assert torch.equal(la, lb)
        for n in ga:
            assert torch.equal(ga[n], gb[n]), n
    else:
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_offloaded_checkpoints_equal_the_plain_step_bit_for_bit(quantize):
    model = tiny_lora(quantize)
    plain = step(model, gradient_checkpointing=False)
    offloaded = step(model, gradient_checkpointing=True, offload_activations=True)
    assert_same_step(plain, offloaded, exact=True)


def test_offload_replays_dropout_and_autocast():
    """The recomputation in backward draws the forward's dropout masks and runs under its autocast."""
    model = tiny_lora(dropout=0.2)
    for amp in (None, torch.bfloat16):
        plain = step(model, amp, gradient_checkpointing=False)
        offloaded = step(model, amp, gradient_checkpointing=True, offload_activations=True)
        assert_same_step(plain, offloaded, exact=True)
    torch.manual_seed(5)
    a = torch.rand(3)
    torch.manual_seed(5)
    step(model, seed=5, gradient_checkpointing=False)
    b = torch.rand(3)
    torch.manual_seed(5)
    step(model, seed=5, gradient_checkpointing=True, offload_activations=True)
    assert torch.equal(b, torch.rand(3)) and not torch.equal(a, b)  # backward's replay leaves the RNG as plain


@pytest.mark.parametrize("quantize", ["none", "nf4"])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_rebuilt_norms_and_swiglu_give_the_step_that_keeps_them(quantize, amp, monkeypatch):
    """The layers rebuild both norms' outputs and the SwiGLU product in backward (models/rebuild.py):
    the same loss and gradients as a model that keeps them, bit for bit, also under autocast and
    with LoRA dropout; and autograd keeps neither the normed inputs nor the product."""
    import gc
    import weakref

    from lora_engine import dispatch
    from lora_engine.models import rebuild

    def saved_widths(model):
        widths = []

        def pack(t):
            widths.append(t.shape[-1] if t.dim() == 3 else None)
            return t

        pack.composable = True
        model.eval()  # no dropout: the projections keep their input itself, not a dropped copy
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.loss(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
        model.train()
        return widths

    model = tiny_lora(quantize, dropout=0.1)
    rebuilt, widths = step(model, amp), saved_widths(model)
    monkeypatch.setattr(rebuild, "rebuilt_into", lambda make, fn: fn(make()))
    kept, kept_widths = step(model, amp), saved_widths(model)
    assert_same_step(kept, rebuilt, exact=True)
    monkeypatch.undo()
    # A forward whose loss is dropped without backward frees its graph (what the hooks saw included:
    # the attention output, which the attention saves as its own output).
    outputs, real = [], dispatch.attention
    monkeypatch.setattr(dispatch, "attention", lambda *a, **k: outputs.append(real(*a, **k)) or outputs[-1])
    ids = torch.zeros(1, 8, dtype=torch.long)
    model.loss(ids, ids)
    storages = [weakref.ref(o.untyped_storage()) for o in outputs]
    outputs.clear()
    gc.collect()
    assert storages and all(r() is None for r in storages)
    layers, hidden, ffn = TINY["num_hidden_layers"], TINY["hidden_size"], TINY["intermediate_size"]
    if amp is None:  # (under autocast the projections keep their own bf16 copies of fp32 inputs)
        assert kept_widths.count(hidden) - widths.count(hidden) == (3 + 2) * layers  # n1 by q, k, v; n2 by gate, up
        assert kept_widths.count(ffn) - widths.count(ffn) == layers  # the SwiGLU product, by down_proj


@pytest.mark.parametrize("quantize", ["none", "nf4"])
@pytest.mark.parametrize("chunk", [1, 8, 30])
def test_chunked_mlp_equals_the_unchunked_step(quantize, chunk):
    model = tiny_lora(quantize)
    plain = step(model)
    chunked = step(model, mlp_chunk_size=chunk)
    assert_same_step(plain, chunked, exact=False)
    model.mlp_chunk_size = 0
    assert_same_step(plain, step(model), exact=True)  # off again: the plain path


def test_chunked_mlp_with_offloaded_checkpoints():
    model = tiny_lora()
    plain = step(model)
    both = step(model, mlp_chunk_size=16, gradient_checkpointing=True, offload_activations=True)
    assert_same_step(plain, both, exact=False)


def test_chunked_rows_keeps_only_its_input_for_backward():
    """What autograd saves for the chunked MLP is x: not the (tokens x intermediate) tensors."""
    mlp = tiny_lora().model.layers[0].mlp
    mlp.chunk_size = 8
    x = torch.randn(2, 40, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = mlp(x)
    assert saved == [torch.Size([80, 64])] and y.shape == x.shape
    ref = mlp._rows(x)
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    dx = x.grad.clone()
    x.grad = None
    ref.sum().backward()
    torch.testing.assert_close(dx, x.grad)


def test_chunked_rows_refuses_a_chunk_below_one():
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_rows(lambda t: t, torch.ones(4, 2), [], 0)
    with pytest.raises(ValueError, match="mlp_chunk_size must be a whole number"):
        tiny_lora().mlp_chunk_size = -2


def test_plain_causal_attention_passes_no_mask_to_sdpa(monkeypatch):
    """No (T x T) mask for the plain causal case, so SDPA may pick its flash / memory-efficient kernels."""
    seen = []
    real = decoder.F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((attn_mask, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(decoder.F, "scaled_dot_product_attention", sdpa)
    step(tiny_lora(), gradient_checkpointing=True, offload_activations=True, mlp_chunk_size=8)
    assert seen and all(m is None and causal for m, causal in seen)


# ---- the plan ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "config.json").write_text(json.dumps({**TINY, "hidden_size": 128, "intermediate_size": 512,
                                               "num_hidden_layers": 6}))
    return d


def test_plan_counts_offloaded_hidden_states_in_host_memory(tiny_dir, monkeypatch):
    monkeypatch.setattr(planning, "_triton_usable", lambda: False)  # the reference kernels: faster, same tensors
    base = dict(model=str(tiny_dir), seq_len=512, r=4, precision="bf16", device="cuda",
                gradient_checkpointing=True)
    kept = P.plan_step(P.PlanConfig(**base))
    off = P.plan_step(P.PlanConfig(**base, offload_activations=True))
    hidden = 512 * 128 * 2  # one layer's input (T, D) in bf16: 2**17 bytes, a power of two already
    assert kept["offloaded_bytes"] == 0
    assert off["offloaded_bytes"] == 6 * hidden  # every layer's input, in pinned host memory
    # At the peak (the last layer's backward) the plain checkpoint holds all six inputs on the device,
    # the offloaded one none. It holds the copy brought back instead, and a second (T, D) buffer: the
    # backward's output gradient, which autograd cannot reuse in place while the Function's backward
    # holds it; and the layer's adapter gradients come back together, as the Function's outputs
    # (one projection's dA and dB may overlap that peak: LoRA's backward returns them together).
    adapter_grads = 4 * (128 + 512) * 2  # r x (in + out) of the widest projection, in bf16
    assert kept["activations"] - off["activations"] == 6 * hidden
    assert off["transient"] - kept["transient"] <= 2 * hidden + adapter_grads
    assert kept["peak_bytes"] - off["peak_bytes"] >= 2 * hidden


def test_plan_counts_the_chunked_mlp(tiny_dir, monkeypatch):
    monkeypatch.setattr(planning, "_triton_usable", lambda: False)
    base = dict(model=str(tiny_dir), seq_len=512, r=4, precision="bf16", device="cuda",
                gradient_checkpointing=True, offload_activations=True)
    whole = P.plan_step(P.PlanConfig(**base))
    chunked = P.plan_step(P.PlanConfig(**base, mlp_chunk_size=64))
    inter = 512 * 512 * 2  # one (T, F) bf16 tensor
    assert whole["peak_bytes"] - chunked["peak_bytes"] >= 2 * inter


@pytest.mark.parametrize("args, match", [
    (["--mlp-chunk-size", "-1"], "--mlp-chunk-size must be >= 0"),
])
def test_plan_flag_errors(tiny_dir, args, match, capsys):
    with pytest.raises(SystemExit):
        P.main(["--model", str(tiny_dir)] + args)
    assert match in capsys.readouterr().err


@pytest.mark.parametrize("kw, match", [
    ({"offload_activations": True}, "--offload-activations .* needs --gradient-checkpointing"),
    ({"mlp_chunk_size": -4}, "--mlp-chunk-size must be >= 0"),
])
def test_train_flag_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_host_embedding_head_and_loss_chunks_equal_the_plain_step_bit_for_bit(quantize):
    """Keeping the embedding and head in CPU memory and smaller loss chunks change where tensors live and
    how the loss is blocked, not what a step computes (on CPU: the same device; the code path is the GPU's).
    Host matrices: bit for bit; loss chunks: equal to the head matmul's rounding (its row count changes)."""
    plain = step(tiny_lora(quantize))
    model = tiny_lora(quantize).keep_on_host(embedding=True, head=True)
    assert model.embedding_on_cpu and model.head_on_cpu
    assert_same_step(plain, step(model), exact=True)
    assert_same_step(plain, step(model, loss_chunk_size=5), exact=False)
    logits = model(torch.arange(10)[None])
    assert torch.equal(logits, tiny_lora(quantize)(torch.arange(10)[None]))


def test_keep_on_host_refuses_a_trained_head():
    model = tiny_lora()
    model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="the head is trained.*--head-on-cpu"):
        model.keep_on_host(head=True)


def test_plan_counts_host_weights_apart(monkeypatch, tmp_path):
    monkeypatch.setattr(planning, "_triton_usable", lambda: False)
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "vocab_size": 4096}))
    base = dict(model=str(tmp_path), seq_len=64, r=4, precision="bf16", device="cuda")
    plain = P.plan_step(P.PlanConfig(**base))
    host = P.plan_step(P.PlanConfig(**base, embedding_on_cpu=True, head_on_cpu=True, loss_chunk_size=16))
    table = 4096 * 64 * 2  # one (V, D) bf16 matrix
    assert host["host_weight_bytes"] == 2 * table
    assert plain["weights"] - host["weights"] >= table  # the embedding is gone; the head only during the loss
    assert host["peak_bytes"] < plain["peak_bytes"]


def test_auto_memory_picks_nothing_when_roomy_options_when_tight_and_errors_when_impossible(monkeypatch):
    monkeypatch.setattr(planning, "_triton_usable", lambda: False)
    cfg = P.PlanConfig(model="tiny", seq_len=256, r=4, precision="fp32", device="cpu")
    mc = ModelConfig.from_hf({**TINY, "vocab_size": 4096})
    plain = P.plan_step(cfg, mc)
    assert planning.auto_memory(cfg, plain["total_bytes"], mc)[0] == {}
    picked, r = planning.auto_memory(cfg, plain["total_bytes"] - 1, mc)
    assert picked and r["total_bytes"] < plain["total_bytes"]
    assert list(picked) == [n for n, _, gpu in planning.AUTO_OPTIONS if not gpu][:len(picked)]  # in order, CPU ones
    with pytest.raises(ValueError, match=r"--auto-memory .*nothing fits.*planned peak is .*weights alone"):
        planning.auto_memory(cfg, 1024, mc)


def test_train_auto_memory_logs_its_choice(monkeypatch, tmp_path):
    from lora_engine.train import planning as pl

    seen = {}

    def fake_auto(cfg, budget, model_config=None):
        seen.update(cfg=cfg, budget=budget)
        return {"gradient_checkpointing": True}, {"total_bytes": 3 * 2**30}

    monkeypatch.setattr(pl, "auto_memory", fake_auto)
    logs = []
    tc = TrainConfig(auto_memory="4GiB", max_length=64, batch_size=2, device="cpu")
    out = pl.plan_training(tc, torch.device("cpu"), "smollm2-135m-instruct", logs.append)
    assert out.gradient_checkpointing and seen["budget"] == 4 * 2**30 and seen["cfg"].seq_len == 64
    assert "--auto-memory 4GiB: --gradient-checkpointing; planned peak 3.00 GiB" in logs[0]
    with pytest.raises(ValueError, match="--auto-memory '4XB' is not a size"):
        pl.plan_training(TrainConfig(auto_memory="4XB"), torch.device("cpu"), "x", logs.append)
    with pytest.raises(ValueError, match="--auto-memory plans a LoRA/QLoRA"):
        TrainConfig(auto_memory="4GiB", use_dora=True)
