"""The memory plan of sliding-window layers at long context: O(S x W), as the step runs them.

With no padding, packing or cache, a sliding layer passes its window to dispatch.attention, which on the
plan's backends ("torch" for --device cpu, "triton" for --device cuda: neither is the C++ path) runs
ops_reference.attention's chunked window (kernels/window_attention.py) on the fake tensors, so the plan
counts what the step allocates: per chunk of queries a (c, c + W) block, never (S, S). At a fixed W the
planned activations grow 2x per doubling of S, and so do the FLOPs.

Full attention without a softcap is SDPA's flash path, also O(S) in memory in the plan (no (S, S) tensor is
allocated); only its FLOPs grow toward 4x per doubling. Full attention with a softcap (Gemma 2) is the eager
expression whose fp32 (S, S) scores the plan counts: its activations grow ~4x per doubling, the quadratic
term a dense-mask window would also show.
"""

import json

import pytest

from lora_engine import plan as P

W = 128
SEQS = (1024, 2048, 4096)
BASE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 8192}
CONFIGS = {
    "mistral_window": {**BASE, "model_type": "mistral", "sliding_window": W},
    "gemma3_sliding": {**BASE, "model_type": "gemma3_text", "sliding_window": W, "query_pre_attn_scalar": 16,
                       "layer_types": ["sliding_attention"] * 2},
    "gemma2_sliding": {**BASE, "model_type": "gemma2", "sliding_window": W, "attn_logit_softcapping": 50.0,
                       "layer_types": ["sliding_attention"] * 2},
    "llama_full": {**BASE, "model_type": "llama"},
    "gemma2_full": {**BASE, "model_type": "gemma2", "sliding_window": W, "attn_logit_softcapping": 50.0,
                    "layer_types": ["full_attention"] * 2},
}


def _plans(tmp_path, name: str, device: str) -> list[dict]:
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS[name]))
    return [P.plan_step(P.PlanConfig(model=str(tmp_path), seq_len=s, device=device, r=4)) for s in SEQS]


def _ratios(plans, key) -> list[float]:
    values = [key(p) for p in plans]
    return [b / a for a, b in zip(values, values[1:])]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name", ["mistral_window", "gemma3_sliding", "gemma2_sliding"])
def test_sliding_layers_plan_linear_in_seq_len(tmp_path, name, device):
    plans = _plans(tmp_path, name, device)
    for r in _ratios(plans, lambda p: p["activations"]):
        assert 1.8 < r < 2.2, (name, device, [p["activations"] for p in plans])
    for r in _ratios(plans, lambda p: p["activations"] + p["transient"]):
        assert r < 2.2, (name, device, [(p["activations"], p["transient"]) for p in plans])
    for r in _ratios(plans, lambda p: p["flops"]):
        assert r < 2.2, (name, device, [p["flops"] for p in plans])
    # nothing (S, S)-sized at the peak: the largest tensor is at most a few (S, hidden)-sized ones
    S = SEQS[-1]
    assert max(b for b, _, _ in plans[-1]["largest_at_peak"]) < S * S


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_full_attention_flash_plan_is_linear_in_memory_quadratic_in_flops(tmp_path, device):
    plans = _plans(tmp_path, "llama_full", device)
    for r in _ratios(plans, lambda p: p["activations"]):
        assert 1.8 < r < 2.2
    for r in _ratios(plans, lambda p: p["flops"]):
        assert r > 3.0  # the linear layers keep it under 4 at these sizes


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_full_softcapped_attention_plans_quadratic(tmp_path, device):
    """The contrast: the eager soft-capped full layer holds fp32 (S, S) scores, and the plan sees them."""
    plans = _plans(tmp_path, "gemma2_full", device)
    for r in _ratios(plans, lambda p: p["activations"]):
        assert r > 3.5
    S = SEQS[-1]
    assert max(b for b, _, _ in plans[-1]["largest_at_peak"]) >= 4 * S * S  # one head's fp32 scores at least
