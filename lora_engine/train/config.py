"""`python -m lora_engine.train`: LoRA fine-tuning from the command line.

With no arguments it fine-tunes the embedded SmolLM2-135M-Instruct on the embedded chatterbot
conversations, evaluating before and after. --objective dpo trains on preference pairs instead
(default: pairs built from the same conversations), --objective grpo learns from rewards (default: the
embedded comparison task, data/embedded_grpo.py), --finetune full trains every weight instead of LoRA.
Every flag comes from TrainConfig (see --help); `--config run.yaml` (or .toml) overlays a file, flags override it.
The output folder (--out) holds:

  adapter/, adapter-best/    the PEFT adapter at the end, and at the best validation loss
  model/, model-best/        instead, with --finetune full: Hugging Face model folders
  checkpoints/step-N/        resumable checkpoints (--save-every, and on Ctrl-C / SIGTERM)
  metrics.jsonl              one JSON object per step: step, loss, lr, grad_norm, tokens_per_s, ...
  loss.png                   the loss curve (when matplotlib is installed)
  config.json, config.yaml   the resolved config (rerun it with --config config.yaml)
  run.json                   the lineage and evaluation results
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from lora_engine.cli import format_config, parse_dtype
from lora_engine.cli import option as _f
from lora_engine.sources.embedded import DEFAULT_MODEL
from lora_engine.train.options import Choices, MemoryOptions, refuse
from lora_engine.train.trackers import parse_report_to

ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class TrainConfig:
    model: str = _f(DEFAULT_MODEL, "Hugging Face model folder or embedded model name")
    data: str | None = _f(None, "training data: a .jsonl/.json/.csv/.parquet/.arrow file, a datasets save_to_disk "
                                "folder, or hf://NAME[:SPLIT]; default: the embedded chatterbot conversations "
                                "(--objective grpo: the embedded comparison task)")
    columns: str | None = _f(None, "FIELD=COLUMN,...: read a format's fields from columns named otherwise in --data "
                                   "and --val-data, e.g. prompt=question,completion=answer")
    format: str = _f("auto", "data format", choices=["auto", "text", "alpaca", "prompt_completion", "chat"])
    val_data: str | None = _f(None, "validation file (default: --val-split of --data)")
    val_split: float = _f(0.1, "fraction of --data held out for validation when --val-data is not given")
    out: str | None = _f(None, "output folder (default runs/<time>; with --resume, the resumed run's folder)")
    overwrite: bool = _f(False, "replace the run already in --out (its checkpoints, adapters, metrics and run.json "
                                "are deleted first); without it an existing run folder is refused")
    max_steps: int = _f(120, "optimizer steps; 0 = run --epochs epochs")
    epochs: float = _f(1.0, "epochs when --max-steps is 0")
    batch_size: int = _f(8, "examples per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    lr: float = _f(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_steps: int = _f(10, "linear warmup steps before the cosine decay")
    min_lr_ratio: float = _f(0.1, "final learning rate as a fraction of --lr")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    # --lora-r: under torchrun, whose parser takes "--r" for an abbreviation of its own --rdzv-... flags
    r: int = _f(16, "LoRA rank", aliases=["--lora-r"])
    lora_alpha: float = _f(32.0, "LoRA alpha (scale alpha/r)")
    lora_dropout: float = _f(0.0, "dropout on the LoRA input")
    target_modules: str = _f(ALL_PROJECTIONS, "comma-separated module names that get LoRA")
    target_parameters: str | None = _f(None, "comma-separated parameters that get a LoRA per expert (mixture-of-"
                                              "experts models; PEFT's target_parameters), e.g. "
                                              "mlp.experts.gate_up_proj,mlp.experts.down_proj")
    router_aux_loss: bool = _f(False, "mixture-of-experts models: add router_aux_loss_coef (config.json) times the "
                                      "router's load-balancing loss to the training loss, as transformers does "
                                      "with output_router_logits")
    use_rslora: bool = _f(False, "scale alpha/sqrt(r) instead of alpha/r")
    use_dora: bool = _f(False, "DoRA (PEFT's use_dora): a trained magnitude per output row on top of LoRA; "
                               "costs one weight-norm of W + s*B@A per layer and step")
    loraplus_lr_ratio: float | None = _f(None, "LoRA+: lora_B (and DoRA magnitudes) learn at this multiple of "
                                               "--lr (the paper suggests 16); default: one learning rate")
    modules_to_save: str | None = _f(None, "comma-separated modules trained in full and saved in the adapter, PEFT's "
                                           "modules_to_save (e.g. embed_tokens,lm_head for added tokens); vLLM "
                                           "refuses such adapters")
    objective: str = _f("sft", "sft: next-token loss on the responses; dpo: DPO preference tuning on {prompt, chosen, "
                               "rejected} records (default data: pairs from the embedded conversations), the "
                               "reference being the model with its adapter switched off; grpo: reinforcement "
                               "learning from --reward functions on {prompt, ...} records (GRPO, Dr. GRPO, DAPO, GSPO; "
                               "default data: the embedded comparison task)",
                           choices=["sft", "dpo", "grpo"])
    dpo_beta: float = _f(0.1, "DPO's beta: how far the policy may move from the reference (--objective dpo)")
    dpo_loss: str = _f("sigmoid", "--objective dpo's loss: sigmoid (DPO), ipo (IPO, TRL's length-normalised form; "
                       "--dpo-beta is its tau), simpo (SimPO: no reference; try --dpo-beta 2) or orpo (ORPO: SFT "
                       "loss plus odds ratio, no reference; --dpo-beta is its lambda)",
                       choices=["sigmoid", "ipo", "simpo", "orpo"])
    simpo_gamma: float = _f(0.5, "SimPO's target reward margin gamma (--dpo-loss simpo)")
    # --objective grpo (train/grpo_step.py); names and defaults as TRL's GRPOConfig.
    reward: str | None = _f(None, "grpo: comma-separated reward functions, built-ins (exact_match, numeric_match, "
                                  "think_format, regex_match, length_penalty, repetition_penalty) or module:function "
                                  "with TRL's signature f(prompts, completions, **fields) -> list[float | None]; "
                                  "without --data, the embedded task's regex_match,numeric_match")
    reward_weights: str | None = _f(None, "grpo: comma-separated weights of the --reward functions (default 1 each)")
    num_generations: int = _f(8, "grpo: completions sampled per prompt (G); --batch-size counts prompts")
    max_completion_length: int = _f(256, "grpo: most tokens a completion may have")
    temperature: float = _f(1.0, "grpo: sampling temperature (the loss's log-probs use it too)")
    top_p: float = _f(1.0, "grpo: nucleus sampling's probability mass")
    top_k: int = _f(0, "grpo: sample among the k likeliest tokens (0 = all)")
    stop: tuple[str, ...] = _f((), "grpo: end a completion where this string appears (the rewards see the text "
                                   "before it); give the flag once per stop string")
    num_iterations: int = _f(1, "grpo: optimizer steps per rollout (mu); > 1 clips each step's ratio against the "
                                "rollout's log-probs")
    loss_type: str = _f("dapo", "grpo: grpo (sequence means), dr_grpo (constant length), dapo (token mean over the "
                                "step), bnpo (token mean per micro-batch)", choices=["grpo", "dr_grpo", "dapo", "bnpo"])
    importance_sampling_level: str = _f("token", "grpo: token, or sequence (GSPO: one ratio per completion)",
                                        choices=["token", "sequence"])
    beta: float = _f(0.0, "grpo: weight of the KL to the reference (the base, adapter off); 0 = no reference pass")
    epsilon: float = _f(0.2, "grpo: clip range below 1 of the probability ratio")
    epsilon_high: float | None = _f(None, "grpo: clip range above 1 (DAPO's clip-higher, e.g. 0.28); default "
                                          "--epsilon")
    scale_rewards: str = _f("group", "grpo: divide advantages by the group's std (group), the batch's (batch), or "
                                     "not (none, Dr. GRPO)", choices=["group", "batch", "none"])
    finetune: str = _f("lora", "lora: train LoRA adapters on a frozen base; full: train every weight (AdamW in fp32 "
                               "needs ~16 bytes per parameter, weights + gradients + 2 moments, e.g. ~2.2 GB for "
                               "135M parameters before activations, against ~4 for LoRA), written as a Hugging "
                               "Face folder model/", choices=["lora", "full"])
    max_length: int = _f(256, "tokens per example (longer ones are truncated, counts reported)")
    pack: bool = _f(False, "pack several examples per row (attention and positions isolated per example)")
    stream: bool | None = _f(None, "read a --format text corpus (.txt/.jsonl files or a folder of them) as training "
                                   "goes, through a shuffle buffer, with memory independent of its size (default: so "
                                   "for --format text; --no-stream reads it in memory)")
    shuffle_buffer: int = _f(4096, "documents in a streamed corpus's shuffle buffer (more mixes more, holds more)")
    split_documents: bool = _f(False, "streamed --format text: cut a document longer than --max-length into pieces "
                                      "of --max-length tokens, each trained, instead of truncating it (domain-"
                                      "adaptive pretraining on long documents keeps all their text)")
    group_by_length: bool = _f(True, "batch examples of similar length together (less padding; order still random)")
    completion_only: bool = _f(True, "loss only on responses / assistant turns (prompt and chat formats)")
    mask_empty_think: bool = _f(False, "chat: no loss on the empty <think></think> block a reasoning template "
                                       "(Qwen3's) writes into a turn without reasoning, so the model is not taught "
                                       "to skip thinking")
    dedup: bool = _f(False, "drop exact and near-duplicate training records, and those that duplicate the "
                            "validation data, before training (counts logged and in run.json)")
    save_every: int = _f(100, "checkpoint every N steps (0 = only at the end and on interruption)")
    keep_checkpoints: int = _f(2, "how many checkpoints to keep")
    # Default (None): 3 evaluations during the run, at 1/4, 1/2 and 3/4 of it (eval_steps below), besides
    # those before and after. Measured on a project CPU (2 cores, shared) with the default run, 120 steps
    # of 8 chats (~530 padded tokens a step) and 42 held-out chats (3.5k padded tokens): one evaluation
    # costs about 2 train steps (26-37 s CPU time against 19-22 s a step; a forward is ~1/3.5 of a
    # step per token), so the three cost ~5% of the run. A fixed N would not scale with the run: with
    # a large --data, the 10% --val-split makes one evaluation ~3% of an epoch's time.
    eval_every: int | None = _f(None, "validation loss every N steps, saving adapter-best/ (0 = only before and "
                                      "after; default: 3 times during the run, at 1/4, 1/2 and 3/4)")
    eval_batch_size: int = _f(16, "batch size of evaluations")
    general_eval: bool = _f(True, "measure general-English perplexity before and after (forgetting check)")
    general_tokens: int = _f(128, "tokens per general-English passage (8 passages)")
    forgetting_threshold: float = _f(0.05, "warn when general-English perplexity rises by more than this")
    resume: str | None = _f(None, "continue from a checkpoint folder, or the newest checkpoint of a run folder")
    registry: str | None = _f(None, "the registry that registry:NAME@REF references are read from (default: "
                                    "$LORA_ENGINE_REGISTRY, else ~/.local/share/lora_engine/registry)")
    stop_after: int = _f(0, "stop (with a checkpoint) after this step, as if interrupted; 0 = off")
    seed: int = _f(0, "seed of data order, LoRA initialisation and dropout")
    quantize: str = _f("none", "base weights: none, or nf4 (QLoRA)", choices=["none", "nf4"])
    precision: str = _f("auto", "auto: bf16 where the CPU (AVX512-BF16, AMX) or GPU multiplies bf16 natively, with "
                                "the frozen weights stored in bf16; else fp32 on CPU, fp16 on GPU; or fp32, bf16, fp16")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward to save memory")
    offload_activations: bool = _f(False, "with --gradient-checkpointing: keep each layer's checkpointed input in "
                                          "CPU memory until backward (asynchronous copies on a GPU)")
    mlp_chunk_size: int = _f(0, "run each MLP this many tokens at a time, recomputed in backward, so the "
                                "(tokens x intermediate) tensors never live at once (0 = off)")
    loss_chunk_size: int = _f(0, "tokens per (chunk x vocabulary) block of the loss's logits (0: the backend's "
                                 "default, 1024 on a GPU); smaller saves memory at short context")
    embedding_on_cpu: bool = _f(False, "keep the frozen input embedding in CPU memory: rows looked up there, only "
                                       "the (tokens x hidden) result copied to the device")
    head_on_cpu: bool = _f(False, "keep the frozen output head in CPU memory, copied to the device for the loss "
                                  "only (one head-sized host-to-device copy per micro-batch)")
    auto_memory: str | None = _f(None, "before training, plan the step (python -m lora_engine.plan) and switch on "
                                       "memory options cheapest first until it fits this size (e.g. 24GiB; on a "
                                       "CPU only those a CPU has)")
    device: str = _f("auto", "cpu, cuda, cuda:1... (auto: cuda when available)")
    distributed: str | None = _f(None, "under torchrun: ddp (replicated base, adapter gradients all-reduced) or fsdp "
                                       "(base sharded with FSDP2); none in one process. Default: ddp when "
                                       "WORLD_SIZE > 1, else none", choices=["ddp", "fsdp", "none"])
    dist_timeout: float = _f(300.0, "seconds a rank waits in a collective (e.g. for a failed peer) before it raises")
    on_nonfinite: str = _f("stop", "on a NaN/inf loss or gradient: stop, or skip the step and count it",
                           choices=["stop", "skip"])
    log_every: int = _f(1, "write a metrics line every N steps")
    plot: bool = _f(True, "draw loss.png at the end (needs matplotlib)")
    report_to: str = _f("none", "comma-separated trackers the metrics also go to: none, tensorboard, mlflow, wandb, "
                                "trackio (metrics.jsonl is written always)")
    mlflow_tracking_uri: str | None = _f(None, "where --report-to mlflow logs, e.g. sqlite:///mlflow.db (no server "
                                               "needed); default: $MLFLOW_TRACKING_URI, else MLflow's default")
    dry_run: bool = _f(False, "print the resolved config, the data summary and quality counts, the trainable "
                              "parameter count and the memory plan of a step, then exit without training or "
                              "touching --out")
    # The names of the fields the user set (command line and --config file; cli.parse passes them), so a task's
    # own defaults (the embedded GRPO task's) replace only the flags left unset: a flag given with exactly its
    # default value is still given. None (a config built in code): the fields whose value is not the default.
    # Not a field (no flag, not saved); after construction every name counts as given, so a copy made by
    # dataclasses.replace, which passes this on from the instance, keeps every value as it is.
    given: dataclasses.InitVar[frozenset[str] | None] = None

    def __post_init__(self, given: frozenset[str] | None = None):
        self.precision = parse_dtype(self.precision, "--precision", ("auto",))
        for name, low, high, *unit in _RANGES:
            check_range(name, getattr(self, name), low, high, *unit)
        if self.max_steps == 0 and self.epochs <= 0:
            raise ValueError("--max-steps 0 needs --epochs > 0")
        if self.objective not in ("sft", "dpo", "grpo"):
            raise ValueError(f"--objective must be sft, dpo or grpo, got {self.objective!r}")
        if self.dpo_loss not in ("sigmoid", "ipo", "simpo", "orpo"):
            raise ValueError(f"--dpo-loss must be sigmoid, ipo, simpo or orpo, got {self.dpo_loss!r}")
        if self.objective == "grpo" and self.data is None:
            self._embedded_grpo_settings(given)
        self.stop = tuple(self.stop)  # (a saved config.json holds a list)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"--stop must be non-empty text (the flag once per stop string), got {self.stop!r}")
        if self.objective == "grpo" and not (self.reward or "").strip():
            raise ValueError("--objective grpo with --data needs --reward: a built-in (exact_match, numeric_match, "
                             "think_format, regex_match, length_penalty, repetition_penalty) or module:function")
        if self.finetune not in ("lora", "full"):
            raise ValueError(f"--finetune must be lora or full, got {self.finetune!r}")
        if self.overwrite and self.resume:
            raise ValueError("--overwrite starts the run in --out afresh, --resume continues one: give one of them")
        self.report_to = ",".join(parse_report_to(self.report_to)) or "none"
        refuse(self.choices())
        self.given = frozenset(f.name for f in dataclasses.fields(self))

    def _embedded_grpo_settings(self, given: frozenset[str] | None) -> None:
        """--objective grpo without --data trains on the embedded comparison task: its settings (reward, steps,
        batch, completion length; data/embedded_grpo.py) replace the flags the user did not set."""
        from lora_engine.data.embedded_grpo import SETTINGS

        if given is None:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            given = {name for name in SETTINGS if getattr(self, name) != defaults[name]}
        for name, value in SETTINGS.items():
            if name not in given:
                setattr(self, name, value)

    def choices(self, **resolved) -> Choices:
        """The flags whose combinations options.refuse checks; `resolved`: what the run has resolved since
        (strategy=..., resolved=True; autocast=...)."""
        lora_only = tuple(f"--{n.replace('_', '-')}" for n in ("use_dora", "loraplus_lr_ratio", "modules_to_save")
                          if getattr(self, n))
        given = dict(memory=MemoryOptions.of(self), objective=self.objective, finetune=self.finetune,
                     quantize=quantize_method(self.quantize), lora_only=lora_only,
                     modules_to_save=bool(self.modules_to_save), pack=self.pack,
                     auto_memory=self.auto_memory is not None, strategy=self.distributed, device=self.device,
                     reference=(self.objective == "dpo" and self.dpo_loss not in ("simpo", "orpo"))
                     or (self.objective == "grpo" and self.beta != 0))
        return Choices(**{**given, **resolved})


# The range of every numeric flag, checked where the config is built: (field, lowest, highest), each bound
# a number (inclusive), a 1-tuple (exclusive) or None (unbounded). Every float must also be finite: an inf or
# NaN learning rate, norm or ratio would not fail at once but poison the run (a NaN loss, gradient ascent).
# The upper bounds are where a value stops meaning anything and starts failing: AdamW's learning rate past
# 1 (and past float32's range it raises inside the optimizer), a timeout past timedelta's range.
_RANGES = (
    ("batch_size", 1, None), ("grad_accum", 1, None), ("r", 1, None), ("max_length", 2, None),
    ("eval_batch_size", 1, None), ("log_every", 1, None), ("keep_checkpoints", 1, None), ("general_tokens", 1, None),
    ("shuffle_buffer", 1, None),
    ("max_steps", 0, None), ("save_every", 0, None), ("eval_every", 0, None), ("warmup_steps", 0, None),
    ("stop_after", 0, None), ("mlp_chunk_size", 0, None), ("loss_chunk_size", 0, None), ("seed", 0, (2**63,)),
    ("val_split", 0, (1,)), ("epochs", 0, None), ("lr", (0,), 1), ("weight_decay", 0, None),
    ("min_lr_ratio", 0, 1), ("max_grad_norm", 0, None), ("lora_alpha", (0,), None), ("lora_dropout", 0, (1,)),
    ("loraplus_lr_ratio", (0,), 1000), ("dpo_beta", (0,), None), ("forgetting_threshold", 0, None),
    ("dist_timeout", (0,), 10**7, "seconds"),
    ("num_generations", 2, None), ("max_completion_length", 1, 131072), ("temperature", (0,), None),
    ("top_p", (0,), 1), ("top_k", 0, None), ("num_iterations", 1, None), ("beta", 0, None), ("epsilon", 0, (1,)),
    ("epsilon_high", 0, None),
)


def check_range(name: str, value, low, high, unit: str = "") -> None:
    """ValueError naming --name unless `value` is a finite number between low and high (as in _RANGES); None
    (an optional flag left unset) passes."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {value!r}")
    below = low is not None and (value <= low[0] if isinstance(low, tuple) else value < low)
    above = high is not None and (value >= high[0] if isinstance(high, tuple) else value > high)
    if below or above:
        lo = "-inf" if low is None else low[0] if isinstance(low, tuple) else low
        hi = "inf" if high is None else high[0] if isinstance(high, tuple) else high
        interval = f"in {'(' if low is None or isinstance(low, tuple) else '['}{lo}, {hi}" \
                   f"{')' if high is None or isinstance(high, tuple) else ']'}"
        if high is None and low is not None:
            interval = f"{'>' if isinstance(low, tuple) else '>='} {lo}"
        raise ValueError(f"--{name.replace('_', '-')} must be {interval}{' ' + unit if unit else ''}, got {value}")


def quantize_method(choice: str) -> str | None:
    """A --quantize choice as load_model's `quantize=` takes it: "none" -> None (full precision), "nf4" -> "nf4".

    The one place the string is mapped, for every command with a --quantize flag (train, eval).
    """
    return None if choice == "none" else choice


def resolve_device(name: str):
    """A --device value as a torch.device: "auto" is cuda when one is available, else cpu."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def eval_steps(total: int, eval_every: int | None) -> list[int]:
    """The steps after which the validation loss is measured during a run of `total` steps.

    Every eval_every steps (None: ceil(total / 4), i.e. 3 times for total >= 7; 0: never), but not at
    the last step, where the evaluation after training measures the same weights anyway.
    """
    every = math.ceil(total / 4) if eval_every is None else eval_every
    return list(range(every, total, every)) if every else []


def resolve_resume(cfg: TrainConfig, explicit: set[str]) -> tuple[TrainConfig, Path | None]:
    """With --resume: the saved config of the resumed run, overlaid with the flags given now."""
    if not cfg.resume:
        return cfg, None
    import json

    from lora_engine.train.checkpoint import ResumeError, latest_checkpoint, run_dir_of

    if cfg.resume.startswith("registry:"):
        raise ResumeError(_registry_resume_message(cfg.resume, cfg.registry))

    ckpt = latest_checkpoint(cfg.resume)
    saved_path = run_dir_of(ckpt) / "config.json"
    if not saved_path.is_file():
        raise ResumeError(f"{saved_path} is missing: cannot tell how the resumed run was configured")
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResumeError(f"{saved_path} is not valid JSON ({e}); restore it, or start a new run without --resume") \
            from e
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in saved.items() if k in known}
    values.update({k: getattr(cfg, k) for k in explicit})
    values["resume"] = str(ckpt)
    values["stop_after"] = cfg.stop_after if "stop_after" in explicit else 0
    values["overwrite"] = cfg.overwrite if "overwrite" in explicit else False  # a saved --overwrite was that run's
    # How the resumed run is launched is today's choice: a 2-process run resumes in 1 process and back.
    values["distributed"] = cfg.distributed if "distributed" in explicit else None
    if "out" not in explicit:
        values["out"] = str(run_dir_of(ckpt))
    return TrainConfig(**values, given=frozenset(values)), ckpt  # the saved config is complete: nothing to fill


def _registry_resume_message(ref: str, root: str | None) -> str:
    """Why --resume cannot take a registry reference, and where the checkpoints of that version may still be."""
    from lora_engine.registry.names import PREFIX, RegistryError
    from lora_engine.registry.store import Registry

    head = (f"--resume {ref}: a published version holds the adapter (or model), config.json, run.json, "
            "metrics.jsonl and the data manifest, not a checkpoint (optimizer, scheduler and RNG state, data "
            "position), so training cannot continue from it")
    try:
        with Registry(root, create=False) as reg:
            run_dir = reg.show(ref.removeprefix(PREFIX))["lineage"]["run_dir"]
    except (RegistryError, OSError) as e:
        return f"{head} ({e})"
    return f"{head}; resume from the run it was published from, --resume {run_dir}, if that folder still exists"


def describe(cfg: TrainConfig) -> str:
    return "resolved config:\n" + format_config(cfg)

