"""lora_engine: a small, exact LoRA/QLoRA fine-tuning engine with hand-written Triton kernels.

    import lora_engine as le
    model = le.load_model("smollm2-135m-instruct")        # or a local Hugging Face folder
    tok = le.load_tokenizer("smollm2-135m-instruct")
    le.apply_lora(model, le.LoraConfig(r=16, lora_alpha=32))
    ...
    le.save_adapter(model, "out/adapter")                  # loads in PEFT

Layers, bottom up: lora_engine.kernels (torch + triton) <- lora_engine.dispatch <- model, LoRA,
NF4 <- train, eval, generate, export. Public names are imported lazily so `import lora_engine`
stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "lora_engine.models.config",
    "CausalLM": "lora_engine.models.decoder",
    "load_model": "lora_engine.loading",
    "CheckpointError": "lora_engine.loading",
    "set_backend": "lora_engine.dispatch",
    "load_tokenizer": "lora_engine.models.tokenizer",
    "Tokenizer": "lora_engine.models.tokenizer",
    "generate": "lora_engine.generate",
    "LoraConfig": "lora_engine.lora.layers",
    "LoraLinear": "lora_engine.lora.layers",
    "apply_lora": "lora_engine.lora.layers",
    "merge_lora": "lora_engine.lora.layers",
    "unmerge_lora": "lora_engine.lora.layers",
    "save_adapter": "lora_engine.lora.adapter",
    "load_adapter": "lora_engine.lora.adapter",
    "save_model": "lora_engine.export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lora_engine' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
