"""Text generation with a KV cache: greedy at temperature 0, else temperature + top-p sampling.

    python -m lora_engine.generate --model smollm2-135m-instruct --prompt "Hello" --chat
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lora_engine.cli import TORCH_NAMES, logs_to, option, option_like, parse, parse_dtype, run_cli, user_input
from lora_engine.io import registry
from lora_engine.train.config import TrainConfig, resolve_device


@torch.no_grad()
def generate_tokens(
    model,
    prompt_ids: list[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | list[int] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time. The prompt is prefilled once, then one token per step."""
    if not prompt_ids:
        raise ValueError("generate: the prompt is empty; give at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    stop = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
        x = torch.tensor([prompt_ids], device=device)
        for _ in range(max_new_tokens):
            logits = model(x, cache=cache)[0, -1].float()  # (V,)
            tok = _pick(logits, temperature, top_p, generator)
            yield tok
            if tok in stop:
                return
            x = torch.tensor([[tok]], device=device)
    finally:
        model.train(was_training)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        drop = sorted_p.cumsum(0) - sorted_p >= top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate_ids(model, prompt_ids, **kw) -> list[int]:
    return list(generate_tokens(model, list(prompt_ids), **kw))


def generate(
    model,
    tokenizer,
    prompt: str | list[dict],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    stream: Callable[[str], None] | None = None,
) -> str:
    """Generate a continuation of `prompt` (a string, or chat messages when chat=True).

    With `stream`, each new piece of text is passed to it as soon as it decodes to complete
    characters. Returns the generated text (without the prompt).
    """
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer.encode(text)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out: list[int] = []
    shown = ""
    for tok in generate_tokens(model, ids, max_new_tokens, temperature, top_p, tokenizer.eos_token_ids, gen):
        if tok in tokenizer.eos_token_ids:
            break
        out.append(tok)
        now = tokenizer.decode(out)
        if stream is not None and not now.endswith("\ufffd"):  # wait for a whole UTF-8 character
            stream(now[len(shown):])
            shown = now
    text = tokenizer.decode(out)
    if stream is not None and len(text) > len(shown):
        stream(text[len(shown):])
    return text


@dataclass
class GenerateConfig:
    """The command line of `python -m lora_engine.generate`; --model and --device are TrainConfig's."""

    model: str = option_like(TrainConfig, "model")
    adapter: str | None = option(None, "a LoRA adapter folder (PEFT format) to apply")
    prompt: str | None = option(None, "the prompt (with --chat, the user's message)", required=True)
    chat: bool = option(False, "wrap the prompt in the model's chat template")
    max_new_tokens: int = option(128, "tokens to generate at most")
    temperature: float = option(0.0, "0 = greedy")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    seed: int | None = option(None, "seed of the sampling (default: unseeded)")
    dtype: str | None = option(None, "weights' dtype: fp32, bf16 or fp16 (default: the checkpoint's)")
    device: str = option_like(TrainConfig, "device")
    registry: str | None = option_like(TrainConfig, "registry")

    def __post_init__(self):
        if self.dtype is not None:
            self.dtype = parse_dtype(self.dtype, "--dtype")
        # Checked here, not first in generate_tokens: a bad value is reported before the model loads.
        if self.max_new_tokens < 0:
            raise ValueError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


@logs_to("stderr")  # stdout is the generated text
def main(argv=None):
    from lora_engine.loading import load_model
    from lora_engine.models.tokenizer import load_tokenizer

    a, _ = parse(GenerateConfig, argv, "python -m lora_engine.generate", __doc__.splitlines()[0])
    with user_input(""):
        a = registry.resolve_fields(a, ("model", "adapter"), a.registry)
    if a.adapter:
        from lora_engine.lora.adapter import read_adapter_config

        with user_input("--adapter"):
            read_adapter_config(a.adapter)  # a wrong folder is reported before the model loads
    with user_input("--model"):
        model = load_model(a.model, dtype=TORCH_NAMES.get(a.dtype), device=resolve_device(a.device))
        tok = load_tokenizer(a.model)
    if a.adapter:
        from lora_engine.lora.adapter import load_adapter

        with user_input("--adapter"):
            load_adapter(model, a.adapter)

    def show(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(model, tok, a.prompt, a.max_new_tokens, a.temperature, a.top_p, a.seed, a.chat, stream=show)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(run_cli(main))
