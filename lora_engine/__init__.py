"""lora_engine: a small, exact LoRA/QLoRA fine-tuning engine with hand-written Triton kernels.

    import lora_engine as le
    model = le.load_model("smollm2-135m-instruct")        # or a local Hugging Face folder
    tok = le.load_tokenizer("smollm2-135m-instruct")
    le.apply_lora(model, le.LoraConfig(r=16, lora_alpha=32))   # returns the model, as PEFT does
    ...
    le.save_adapter(model, "out/adapter")                  # loads in PEFT

Layers, bottom up (tests/test_layers.py enforces them: no cycle, no import from a lower layer to
a higher one):

  kernels/    Triton kernels and their pure-PyTorch references (torch + triton only)
  dispatch.py the one place a kernel is chosen (torch / triton / cpp);  io/  atomic writes,
              strict safetensors reading;  registry/  the model registry's store (its command on top)
  sources/    GGUF import, llama.cpp BPE vocabularies, the embedded default model
  models/     ModelConfig, the decoder, the tokenizer (no LoRA, no quantization)
  quant/      NF4 and its checkpoints;  lora/  LoRA layers and PEFT adapter files
  loading.py, export.py   load_model / save_model;  deploy/  GGUF, QLoRA merges;  data/  records -> rows -> batches
  train/      config, step, loop, checkpoints, lineage, plot, suites, DPO, the memory counter
  eval.py, generate.py, registry/command.py, plan.py ...   the commands
  cli.py      command lines from dataclasses; the commands are `python -m lora_engine.<cmd>`

Public names and submodules are imported lazily so `import lora_engine` stays cheap.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "ModelConfig": "lora_engine.models.config",
    "CausalLM": "lora_engine.models.decoder",
    "load_model": "lora_engine.loading",
    "CheckpointError": "lora_engine.io.safetensors",
    "set_backend": "lora_engine.dispatch",
    "load_tokenizer": "lora_engine.models.tokenizer",
    "Tokenizer": "lora_engine.models.tokenizer",
    "LoraConfig": "lora_engine.lora.layers",
    "LoraLinear": "lora_engine.lora.layers",
    "apply_lora": "lora_engine.lora.layers",
    "merge_lora": "lora_engine.lora.layers",
    "unmerge_lora": "lora_engine.lora.layers",
    "count_parameters": "lora_engine.lora.layers",
    "save_adapter": "lora_engine.lora.adapter",
    "load_adapter": "lora_engine.lora.adapter",
    "read_adapter_config": "lora_engine.lora.adapter",
    "save_model": "lora_engine.export",
}

# Submodules a user reaches as `le.<name>` without importing them first; some keep the names they
# had before the package was split into layers (le.nf4 is quant/, le.trainer train/step.py). A name
# that is also a module of this package (le.convert, le.generate, le.runs, le.registry) maps to that
# very module: importing it (`python -m lora_engine.convert`, `lora_engine.registry.command`) binds
# the name to it anyway, and any other mapping would make le.<name> depend on import order. So those
# command modules also carry what le.<name> has always offered: le.convert the GGUF converter's
# names, le.runs the lineage functions, le.registry the registry package, and le.generate, a
# callable module, runs the generate function when called.
_MODULES = {
    "nf4": "lora_engine.quant", "trainer": "lora_engine.train.step", "data": "lora_engine.data",
    "dispatch": "lora_engine.dispatch", "kernels": "lora_engine.kernels", "lora": "lora_engine.lora",
    "quant": "lora_engine.quant", "models": "lora_engine.models", "train": "lora_engine.train",
    "io": "lora_engine.io", "sources": "lora_engine.sources", "loading": "lora_engine.loading",
    "export": "lora_engine.export", "eval": "lora_engine.eval", "cli": "lora_engine.cli",
    "convert": "lora_engine.convert", "generate": "lora_engine.generate", "runs": "lora_engine.runs",
    "registry": "lora_engine.registry", "plan": "lora_engine.plan", "deploy": "lora_engine.deploy",
}

__all__ = sorted(_EXPORTS) + sorted(_MODULES)


def __getattr__(name):
    from importlib import import_module

    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'lora_engine' has no attribute {name!r}")
    globals()[name] = value  # cached: the next read does not come here
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_MODULES))
