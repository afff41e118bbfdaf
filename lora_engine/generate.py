"""Text generation with a KV cache: greedy at temperature 0, else temperature + top-k + top-p sampling.

The decoding itself is lora_engine.models.generate.decode (batched, shared with the suite scorer);
this is its command line and the text around it: chat template, streaming, the eos that ends it.

    python -m lora_engine.generate --model smollm2-135m-instruct --prompt "Hello" --chat

`le.generate` is this module whatever was imported first (lora_engine/__init__.py), and calling it
calls `generate` below: `le.generate(model, tok, "Hello", chat=True)`.
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lora_engine.cli import TORCH_NAMES, CliError, logs_to, option, option_like, parse, parse_dtype, run_cli, user_input
from lora_engine.models.generate import MAX_NEW_TOKENS, check_settings, decode
from lora_engine.registry import refs
from lora_engine.train.config import TrainConfig, resolve_device


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
    top_k: int = 0,
    stop: Sequence[str] = (),
) -> str:
    """Generate a continuation of `prompt` (a string, or chat messages when chat=True).

    stop: strings that end the text where the first of them appears; the text is cut before it (it is
    neither returned nor streamed). With `stream`, each new piece of text is passed to it as soon as it
    decodes to complete characters and cannot be the start of a stop string. Returns the generated text
    (without the prompt).
    """
    stop = _check_stop(stop)
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError("generate: the prompt encodes to no tokens; give some text")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    shown, streamed = "", []

    def show(_row: int, tok: int):  # the text so far, passed on once it ends in a whole UTF-8 character
        nonlocal shown
        if tok in tokenizer.eos_token_ids:  # it ends the text; it is not part of it
            return
        streamed.append(tok)
        now = tokenizer.decode(streamed)
        if not now.endswith("\ufffd"):
            now = _before_stop(now, stop, hold=True)
            stream(now[len(shown):])
            shown = now

    done = decode(model, [ids], max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  stop_ids=tokenizer.eos_token_ids, stop_strings=stop, tokenizer=tokenizer, generator=gen,
                  on_token=show if stream is not None else None)
    text = _before_stop(tokenizer.decode(done.text_tokens(0)), stop)
    if stream is not None and len(text) > len(shown):
        stream(text[len(shown):])
    return text


def _check_stop(stop) -> tuple[str, ...]:
    if isinstance(stop, str):  # one string, not its characters
        stop = (stop,)
    stop = tuple(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"generate: a stop string must be non-empty text, got {s!r:.60}")
    return stop


def _before_stop(text: str, stop: tuple[str, ...], hold: bool = False) -> str:
    """`text` up to the first stop string in it; with `hold`, also without an ending that may be the start
    of one (streamed text is never taken back)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    text = text[:cut]
    if hold:
        for s in stop:
            for n in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:n]):
                    text = text[:-n]
                    break
    return text


@dataclass
class GenerateConfig:
    """The command line of `python -m lora_engine.generate`; --model and --device are TrainConfig's."""

    model: str = option_like(TrainConfig, "model")
    adapter: str | None = option(None, "a LoRA adapter folder (PEFT format) to apply")
    prompt: str | None = option(None, "the prompt (with --chat, the user's message)", required=True)
    chat: bool = option(False, "wrap the prompt in the model's chat template")
    max_new_tokens: int = option(128, f"tokens to generate at most (1..{MAX_NEW_TOKENS})")
    temperature: float = option(0.0, "0 = greedy")
    top_p: float = option(1.0, "nucleus sampling: keep the smallest set of tokens with this much probability")
    top_k: int = option(0, "sample among the k likeliest tokens only (0 = all)")
    seed: int | None = option(None, "seed of the sampling (default: unseeded)")
    stop: tuple[str, ...] = option((), "end the text where this string appears (cut before it); give the flag "
                                       "once per stop string (not comma-separated: a stop string may hold a comma)")
    dtype: str | None = option(None, "weights' dtype: fp32, bf16 or fp16 (default: the checkpoint's)")
    device: str = option_like(TrainConfig, "device")
    registry: str | None = option_like(TrainConfig, "registry")

    def __post_init__(self):
        if self.dtype is not None:
            self.dtype = parse_dtype(self.dtype, "--dtype")
        if any(not s for s in self.stop):
            raise ValueError("--stop is empty; give the text that ends the generation")
        self.stop = tuple(self.stop)
        # Checked here, as decode checks them: a bad value is reported before the model loads.
        check_settings(self.max_new_tokens, self.temperature, self.top_p, self.top_k,
                       name=lambda field: "--" + field.replace("_", "-"))


@logs_to("stderr")  # stdout is the generated text
def main(argv=None):
    from lora_engine.loading import load_model
    from lora_engine.models.tokenizer import load_tokenizer

    a, _ = parse(GenerateConfig, argv, "python -m lora_engine.generate", __doc__.splitlines()[0])
    if not a.prompt:
        raise CliError("--prompt is empty; give the text to continue (with --chat, the user's message)")
    with user_input(""):
        a = refs.resolve_fields(a, ("model", "adapter"), a.registry)
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

    generate(model, tok, a.prompt, a.max_new_tokens, a.temperature, a.top_p, a.seed, a.chat, stream=show,
             top_k=a.top_k, stop=a.stop)
    sys.stdout.write("\n")


class _CallableModule(types.ModuleType):
    """This module's type: `le.generate(...)` (the module, the only thing `le.generate` can stably be,
    since importing lora_engine.generate binds it on the package) runs the function `generate`."""

    __call__ = staticmethod(generate)
    __signature__ = inspect.signature(generate)  # inspect would otherwise drop `model`, taking it for `self`


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(run_cli(main))
