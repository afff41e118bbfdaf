"""What train and plan share of their flags: the memory options put on a model, and the flag combinations refused.

MemoryOptions: the six settings that trade step time for memory, put on a model by `apply` (train's
setup and plan's build both call it). `refuse`: the one place a combination of flags that cannot
work is refused, by name. TrainConfig and PlanConfig call it when they are built, with what a config
knows; train calls it again once the run resolves what a flag leaves open (the distributed strategy
from torchrun's WORLD_SIZE, the precision from the device), so that every refusal comes before any
model loads. A rule whose inputs are not known yet (None) waits for that second call.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryOptions:
    """The memory options of a training step (TrainConfig's and PlanConfig's flags of the same names)."""

    gradient_checkpointing: bool = False  # recompute each layer's activations in backward
    offload_activations: bool = False     # with checkpointing: each layer's input kept in CPU memory
    mlp_chunk_size: int = 0               # tokens per MLP block, recomputed in backward (0 = off)
    loss_chunk_size: int = 0              # tokens per (chunk x vocabulary) logits block (0 = the backend's default)
    embedding_on_cpu: bool = False        # the frozen input embedding in CPU memory
    head_on_cpu: bool = False             # the frozen output head in CPU memory

    @classmethod
    def of(cls, config) -> MemoryOptions:
        """The options of a config with fields of these names (TrainConfig, PlanConfig)."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})

    def apply(self, model):
        """Set the options on a CausalLM (models/decoder.py reads them in its forward and loss); returns it."""
        model.gradient_checkpointing = self.gradient_checkpointing
        model.offload_activations = self.offload_activations
        model.mlp_chunk_size = self.mlp_chunk_size
        model.loss_chunk_size = self.loss_chunk_size
        model.keep_on_host(embedding=self.embedding_on_cpu, head=self.head_on_cpu)
        return model


@dataclass(frozen=True)
class Choices:
    """The flags whose combinations can fail. None: not known yet (refuse checks it when it is)."""

    memory: MemoryOptions = MemoryOptions()
    objective: str = "sft"
    finetune: str = "lora"
    quantize: str | None = None         # the base's quantization (config.quantize_method's): None, or "nf4"
    lora_only: tuple[str, ...] = ()     # LoRA-only flags given (--use-dora, --loraplus-lr-ratio, --modules-to-save)
    modules_to_save: bool = False
    pack: bool = False
    auto_memory: bool = False
    strategy: str | None = None         # none, ddp or fsdp: the --distributed flag, or as resolved
    resolved: bool = False              # strategy is the one the run takes (torchrun's world size read)
    device: str | None = None           # the --device flag; None: not chosen by a flag
    autocast: str | None = None         # fp16, bf16 or fp32 as resolved for the device; None until then
    planned: bool = False               # a plan (python -m lora_engine.plan), not a run
    reference: bool = False             # the objective scores a reference, the adapter switched off (dpo, not
                                        # simpo or orpo; grpo, beta>0)
    linear_attention: bool = False      # the model has linear-attention layers (Qwen3.5): known once its
                                        # config.json is read (planning.has_linear_attention)


def refuse(c: Choices, error: type[Exception] = ValueError) -> None:
    """Raise `error` naming the flags of the first combination in `c` that cannot work."""
    for why in _problems(c):
        raise error(why)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _problems(c: Choices):
    """Each refusal's message, in the order they are checked (a generator: the first one is raised)."""
    m = c.memory
    if m.offload_activations and not m.gradient_checkpointing:
        yield "--offload-activations offloads the checkpointed hidden states: it needs --gradient-checkpointing"
    yield from _method(c)
    if c.pack and c.linear_attention:
        yield ("--pack puts several documents in one row, and this model's linear-attention layers (Gated DeltaNet, "
               "Qwen3.5) would carry their recurrent state from one document into the next: drop --pack")
    if c.auto_memory and (c.finetune == "full" or "--use-dora" in c.lora_only or c.objective != "sft"):
        yield ("--auto-memory plans a LoRA/QLoRA next-token step; it cannot plan --finetune full, --use-dora or "
               f"--objective {c.objective if c.objective != 'sft' else 'dpo'}: drop --auto-memory and set the memory "
               "flags yourself")
    if c.planned:
        yield from _plan_device(c)
    if c.strategy == "fsdp":
        yield from _fsdp(c)
    if c.resolved and c.strategy in ("ddp", "fsdp") and not c.planned:
        if c.objective == "dpo" or (c.objective == "grpo" and c.strategy == "fsdp"):
            # GRPO's sampling runs as many forward passes as a rank's longest completion needs, and FSDP gathers
            # each layer's weights in every forward on every rank: the ranks would wait on each other
            yield (f"--objective {c.objective} is not implemented with --distributed {c.strategy}: run it in one "
                   f"process{' or with --distributed ddp' if c.objective == 'grpo' else ''}")
        if c.device is not None and c.device.startswith("cuda:"):
            yield (f"--device {c.device} under torchrun: each rank takes cuda:LOCAL_RANK; pass --device cuda or auto "
                   "(choose the GPUs with CUDA_VISIBLE_DEVICES)")


def _method(c: Choices):
    """--objective and --finetune against the flags that cannot go with them."""
    if c.objective == "dpo":
        if c.pack:
            yield "--objective dpo scores each response as one row: drop --pack"
        if c.reference and c.modules_to_save:  # (--dpo-loss simpo and orpo have no reference)
            yield ("--objective dpo takes its reference from the model with the adapter switched off, which "
                   "--modules-to-save (trained in place) does not allow; drop --modules-to-save (or use --dpo-loss "
                   "simpo or orpo, which have no reference)")
        if c.reference and c.finetune == "full":
            yield ("--objective dpo with --finetune full would need a second, frozen copy of the model as the "
                   "reference; use --finetune lora (the reference is the adapter switched off), or --dpo-loss simpo "
                   "or orpo")
    if c.objective == "grpo":
        yield from _grpo(c)
    if c.finetune == "full":
        if c.quantize is not None:
            yield (f"--finetune full trains every weight, which --quantize {c.quantize} stores in 4 bits and cannot "
                   "train: use --quantize none, or --finetune lora for QLoRA")
        if c.lora_only:
            yield (f"{', '.join(c.lora_only)} configure LoRA adapters; --finetune full has none (drop them, or use "
                   "--finetune lora)")


def _grpo(c: Choices):
    """--objective grpo: prompts are sampled from, not packed; its KL reference is the adapter switched off."""
    if c.pack:
        yield "--objective grpo samples completions for each prompt: drop --pack"
    if c.reference and c.modules_to_save:
        yield ("--objective grpo with --beta > 0 takes its reference from the model with the adapter switched off, "
               "which --modules-to-save (trained in place) does not allow; drop --modules-to-save or use --beta 0")
    if c.reference and c.finetune == "full":
        yield ("--objective grpo with --beta > 0 and --finetune full would need a second, frozen copy of the model "
               "as the reference; use --beta 0, or --finetune lora (the reference is the adapter switched off)")


def _plan_device(c: Choices):
    """A plan for --device cpu cannot move what is in CPU memory already."""
    m = c.memory
    for name in ("embedding_on_cpu", "head_on_cpu"):
        if getattr(m, name) and c.device != "cuda":
            yield (f"{_flag(name)} keeps a matrix in CPU memory instead of the GPU's: it needs --device cuda (on "
                   "--device cpu it is in CPU memory already)")
    if m.offload_activations and c.device != "cuda":
        yield ("--offload-activations moves activations from the GPU to CPU memory: it needs --device cuda (on "
               "--device cpu they are in CPU memory already)")


def _fsdp(c: Choices):
    """What FSDP (train/fsdp.py) does not implement: it shards the embedding and head with the layers, gathers
    only adapters for saving, and has no sharded grad scaler."""
    m = c.memory
    on_host = [_flag(n) for n in ("embedding_on_cpu", "head_on_cpu") if getattr(m, n)]
    if c.planned:
        if m.offload_activations or on_host:
            name = "--offload-activations" if m.offload_activations else on_host[0]
            yield (f"{name} is not implemented with --distributed fsdp (train refuses it): plan without it, or with "
                   "--distributed ddp")
        return
    if on_host or c.auto_memory:
        yield ("--distributed fsdp shards the embedding and head with the layers: it cannot keep them in CPU memory "
               "(--embedding-on-cpu, --head-on-cpu), and --auto-memory plans one unsharded process; drop those "
               "flags or use --distributed ddp")
    if m.offload_activations:
        yield ("--offload-activations is not implemented with --distributed fsdp (the offloaded input is read "
               "after FSDP frees the layer's parameters): drop it, or use --distributed ddp")
    if c.resolved and c.finetune == "full":
        yield ("--finetune full is not implemented with --distributed fsdp (only adapters are gathered for saving): "
               "use --distributed ddp, or --finetune lora")
    if c.autocast == "fp16":
        yield ("--distributed fsdp with fp16 needs a sharded grad scaler, not implemented: use --precision bf16 or "
               "fp32, or --distributed ddp")
