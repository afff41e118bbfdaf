"""The memory plan of a mixture-of-experts model (train/planning_moe.py routes evenly under the fake tensors):
the planned weights are exactly the built model's (experts E x 3 x D x F in full precision or NF4, the router in
full precision), the adapters count the per-expert LoRA factors, and the routing splits the slots evenly."""

import pytest
import torch

from lora_engine import plan as P
from lora_engine.models.config import ModelConfig
from lora_engine.quant.nf4 import quantize_model
from lora_engine.quant.nf4_experts import nf4_expert_tensors

HF = {"model_type": "qwen3_moe", "vocab_size": 96, "hidden_size": 32, "intermediate_size": 40,
      "moe_intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
      "head_dim": 8, "num_experts": 6, "num_experts_per_tok": 2, "max_position_embeddings": 256,
      "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "norm_topk_prob": True, "mlp_only_layers": []}
TARGETS = dict(target_modules="q_proj,v_proj", target_parameters="mlp.experts.gate_up_proj,mlp.experts.down_proj")


def _cfg(quantize, **kw):
    return P.PlanConfig(model="tiny", seq_len=16, quantize=quantize, r=2, precision="fp32", device="cpu",
                        **{**TARGETS, **kw})


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def test_planned_weights_are_the_models_parameters_experts_included():
    mc = ModelConfig.from_hf(HF)
    meta = P.meta_model(_cfg("none"), mc)
    E, D, F = 6, 32, 24
    experts = sum(p.numel() for n, p in meta.named_parameters() if ".experts." in n)
    assert experts == 2 * E * 3 * D * F
    r = P.plan_step(_cfg("none"), mc)
    assert r["weights"] == _bytes(list(meta.parameters()) + list(meta.buffers()))


def test_planned_nf4_weights_are_the_quantized_models_bytes():
    mc = ModelConfig.from_hf(HF)
    real = P.materialize(P.meta_model(_cfg("nf4"), mc))
    with torch.no_grad():
        for p in real.parameters():
            p.normal_()
    quantize_model(real)
    parts = [getattr(w, n) for w in [getattr(m, "weight", None) for m in real.modules()] + nf4_expert_tensors(real)
             for n in ("packed", "absmax", "code", "nested_absmax", "nested_code")
             if isinstance(getattr(w, n, None), torch.Tensor) and not isinstance(w, torch.Tensor)]
    want = _bytes(list(real.parameters()) + list(real.buffers()) + parts)
    assert len(nf4_expert_tensors(real)) == 2 * 2 * 6  # layers x (gate_up_proj, down_proj) x experts
    assert type(real.model.layers[0].mlp.gate) is torch.nn.Linear  # the router in full precision
    assert P.plan_step(_cfg("nf4"), mc)["weights"] == want


def test_planned_adapters_grow_with_the_expert_lora():
    """Expert LoRA adds E x r x (K + N) per targeted parameter and layer, with its gradients and AdamW state."""
    mc = ModelConfig.from_hf(HF)
    with_experts = P.plan_step(_cfg("nf4"), mc)["adapters_and_optimizer"]
    without = P.plan_step(_cfg("nf4", target_parameters=None), mc)["adapters_and_optimizer"]
    E, D, F, r, layers = 6, 32, 24, 2, 2
    factors = layers * E * r * ((D + 2 * F) + (F + D))  # fp32 values of lora_A and lora_B
    # parameters, gradients and AdamW's two moments: four fp32 copies, the gradients possibly freed at the peak
    assert 3 * 4 * factors <= with_experts - without <= 4 * 4 * factors


def test_even_routing_splits_the_slots():
    from lora_engine.models.moe import MoEBlock
    from lora_engine.train.planning_moe import route_evenly

    mc = ModelConfig.from_hf(HF)
    model = P.materialize(P.meta_model(_cfg("none"), mc))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    assert route_evenly(model) == 2
    seen = []
    block = next(m for m in model.modules() if isinstance(m, MoEBlock))
    block.experts.forward = lambda x, counts: seen.append(counts.tolist()) or x
    block(torch.randn(1, 7, 32))
    assert seen == [[3, 3, 2, 2, 2, 2]]  # 7 tokens x 2 slots over 6 experts


def test_plan_refuses_target_parameters_on_a_dense_model():
    dense = {k: v for k, v in HF.items() if k not in ("num_experts", "num_experts_per_tok", "moe_intermediate_size")}
    from lora_engine.cli import CliError

    with pytest.raises(CliError, match="--target-parameters: .*'mlp.experts.gate_up_proj' matches no parameter"):
        P.plan_step(_cfg("none"), ModelConfig.from_hf({**dense, "model_type": "qwen3"}))


def _bf16_cuda(**kw):
    return P.PlanConfig(model="tiny", quantize="nf4", r=2, precision="bf16", device="cuda",
                        gradient_checkpointing=True, **{"seq_len": 64, **TARGETS, **kw})


def test_nf4_moe_plans_with_offloaded_recompute():
    """The recomputed, offloaded layer's NF4 experts plan (their backward reads no counts from a fake tensor)
    and offloading keeps the checkpointed inputs off the device."""
    mc = ModelConfig.from_hf(HF)
    kept = P.plan_step(_bf16_cuda(), mc)
    off = P.plan_step(_bf16_cuda(offload_activations=True), mc)
    assert off["offloaded_bytes"] > 0
    assert off["weights"] == kept["weights"]


def test_recomputed_layers_do_not_stay_alive_in_backward():
    """Each checkpointed layer's recomputation is freed after its backward: the backward peak of 6 layers is the
    2-layer one plus 4 layers' weights, adapters and checkpointed inputs, not 4 more recomputed layers."""
    peaks = {}
    for n in (2, 6):
        mc = ModelConfig.from_hf({**HF, "num_hidden_layers": n})
        r = P.plan_step(_bf16_cuda(seq_len=256), mc)
        peaks[n] = r["transient"]
    # the recomputed attention of one layer alone is > 256 tokens x 4 heads x 8 x 2 bytes x 3 (q, roped q, out)
    assert peaks[6] - peaks[2] < 256 * 32 * 2 * 3


def test_checkpointed_backward_keeps_the_forwards_router_logits_and_no_aux_graph():
    """The recomputation in backward does not replace the logits the forward recorded (their graph would keep the
    recomputed layer alive); the reported-only auxiliary loss has no graph."""
    from lora_engine.models.moe import MoEBlock

    torch.manual_seed(0)
    model = P.materialize(P.meta_model(_cfg("none"), ModelConfig.from_hf(HF)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.gradient_checkpointing = True
    model.train()
    ids = torch.randint(0, 96, (1, 12))
    loss = model.loss(ids, ids)
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    recorded = [m.router_logits for m in blocks]
    assert model.aux_loss is not None and model.aux_loss.grad_fn is None
    loss.backward()
    assert all(m.router_logits is t for m, t in zip(blocks, recorded))
