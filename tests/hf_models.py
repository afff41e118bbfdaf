"""Tiny random Hugging Face models of each supported family, saved as real checkpoints.

The transformers import is deferred to the call: transformers is a test extra, never needed by
the library.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")

_BASE = dict(
    vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)


def hf_config(family: str, tie: bool = False):
    import transformers as tf

    kw = dict(_BASE, tie_word_embeddings=tie)
    if family == "llama":
        return tf.LlamaConfig(**kw, rope_theta=10000.0)
    if family == "llama3":
        kw["max_position_embeddings"] = 2048
        return tf.LlamaConfig(**kw, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, rope_theta=500000.0)
    if family == "mistral":
        return tf.MistralConfig(**kw, sliding_window=None, head_dim=16)
    if family == "qwen2":
        return tf.Qwen2Config(**kw)
    if family == "qwen3":
        return tf.Qwen3Config(**kw, head_dim=16)
    raise ValueError(family)


def make_hf_model(family: str, folder: Path, tie: bool = False, shard_size: str | None = None, seed: int = 0,
                  **overrides):
    """Build a random fp32 transformers model, save it to `folder`, return it in eval mode.

    overrides: config fields to change (vocab_size=320, head_dim=128, ...)."""
    import transformers as tf

    torch.manual_seed(seed)
    config = hf_config(family, tie)
    for k, v in overrides.items():
        setattr(config, k, v)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random norms and biases too, so a missed bias or norm weight shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    kw = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kw)
    return model.eval()


def load_hf(folder: Path):
    """transformers' model of a checkpoint folder, fp32, in eval mode (the oracle side of a parity test)."""
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def peft_trained(model, cfg, steps: int = 3):
    """`model` (transformers) wrapped by peft.get_peft_model(model, cfg) after a few AdamW steps on random
    tokens, so every B is nonzero; in eval mode."""
    import peft

    model = peft.get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()
