"""lora_engine: a small, exact LoRA/QLoRA fine-tuning engine with hand-written Triton kernels.

    import lora_engine as le
    model = le.load_model("smollm2-135m-instruct")        # or a local Hugging Face folder
    tok = le.load_tokenizer("smollm2-135m-instruct")
    le.apply_lora(model, le.LoraConfig(r=16, lora_alpha=32))
    ...
    le.save_adapter(model, "out/adapter")                  # loads in PEFT

Layers, bottom up: lora_engine.kernels (torch + triton) <- lora_engine.dispatch <- model, LoRA,
NF4 <- train, eval, generate, export. Public names and the public submodules (`le.nf4`,
`le.trainer`, `le.data`, ...) are imported lazily, on first use, so `import lora_engine` stays cheap.
"""

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

# The submodules the docstrings point users to. The helpers behind the command lines (cli_config,
# data_check, data_embedded, plot) stay importable by their full name only; `le.generate` is the
# function (lora_engine.generate.generate), not its module.
_SUBMODULES = (
    "adapter", "atomic", "checkpoint", "config", "convert", "data", "data_formats", "dispatch", "embedded",
    "eval", "export", "kernels", "loading", "lora", "model", "nf4", "runs", "tokenizer", "train",
    "train_loop", "trainer",
)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    from importlib import import_module

    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        # Bound here, also so that `generate` stays the function: importing lora_engine.generate
        # has just bound the module under that name.
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        # import_module also binds the submodule on this package, so later lookups skip this.
        return import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'lora_engine' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
