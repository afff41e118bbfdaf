"""Tokenizer: a Hugging Face `tokenizer.json` (via the `tokenizers` library) plus its chat template.

    tok = load_tokenizer("smollm2-135m-instruct")       # or a Hugging Face folder
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True))

Special tokens written in the text (`<|im_start|>`) are recognised as such. bos/eos/pad come from
tokenizer_config.json, special_tokens_map.json and generation_config.json, in that order of
preference. What `encode(text, add_special_tokens=True)` adds around the text is what the
post-processor of tokenizer.json adds (Llama-2's and Mistral's <s>, Llama-3's <|begin_of_text|>,
nothing for SmolLM2); `prefix_ids` / `suffix_ids` and the booleans add_bos_token / add_eos_token say
what that is. transformers 5 decides it the same way: with a tokenizer.json it drops the add_bos_token
/ add_eos_token of tokenizer_config.json (its Llama classes in transformers 4 rebuilt the
post-processor from them); where the two disagree we follow tokenizer.json and warn.

The chat template is a Jinja string from the checkpoint, i.e. untrusted input: it is rendered in
jinja2's ImmutableSandboxedEnvironment, with the globals and settings transformers gives it
(raise_exception, strftime_now, a JSON `tojson`, trim_blocks and lstrip_blocks) and limits on the
size of what it makes (models/chat_template.py); its failures raise ChatTemplateError.

`byte_level_bpe` builds the tokenizer.json of a llama.cpp byte-level vocabulary (the GGUF converter
uses it). It follows llama.cpp's pre-tokenizer, not transformers' GGUF converter: for `smollm` every
number character is its own pre-token, which transformers drops, so the two differ on inputs like
" 12 34  56" or Eastern Arabic digits (tests/test_tokenizer.py pins both behaviours).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from lora_engine.io.atomic import Owned, atomic_dir, copy_file
from lora_engine.models.chat_template import ChatTemplateError, compile_template, render

# Files `save` copies: what a Hugging Face tokenizer folder holds.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# What `save` writes: an existing folder holding anything else (a model's weights, a run) is not replaced.
TOKENIZER_OWNED = Owned("a tokenizer folder", TOKENIZER_FILES, marker="tokenizer.json")


class Tokenizer:
    """Text <-> token ids (lists of int) and chat-template rendering for one checkpoint folder."""

    def __init__(self, folder: str | os.PathLike, name_or_path: str | None = None):
        from tokenizers import Tokenizer as _Backend

        self.folder = Path(folder)
        self.name_or_path = name_or_path or str(folder)
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{self.folder} has no tokenizer.json; pass a Hugging Face folder saved with a fast tokenizer "
                "(tokenizer.save_pretrained writes it)"
            )
        try:
            self._tok = _Backend.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
        cfg = _read_json(self.folder / "tokenizer_config.json")
        special_map = _read_json(self.folder / "special_tokens_map.json")
        gen = _read_json(self.folder / "generation_config.json")

        def token(name):
            t = cfg.get(name) or special_map.get(name)
            return t.get("content") if isinstance(t, dict) else t

        self.bos_token, self.eos_token, self.pad_token = token("bos_token"), token("eos_token"), token("pad_token")
        self.unk_token = token("unk_token")
        self.bos_token_id = self._id(self.bos_token, gen.get("bos_token_id"))
        self.eos_token_id = self._id(self.eos_token, gen.get("eos_token_id"))
        extra = gen.get("eos_token_id")
        extra = extra if isinstance(extra, list) else [extra]
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in [self.eos_token_id, *extra] if i is not None))
        if self.eos_token_id is None and self.eos_token_ids:
            self.eos_token_id = self.eos_token_ids[0]
        pad = self._id(self.pad_token, gen.get("pad_token_id"))
        self.pad_token_id = pad if pad is not None else self.eos_token_id
        self.chat_template = _default_template(cfg.get("chat_template"), self.folder)
        self._compiled = None
        # What encode(text, add_special_tokens=True) puts before and after the text: what
        # transformers' tokenizer(text) adds, so a training text starts the way pretraining texts did.
        post = self._tok.post_processor
        self.prefix_ids, self.suffix_ids = _added_around(json.loads(post.__getstate__())) if post else ([], [])
        self.add_bos_token = self.bos_token_id is not None and self.prefix_ids[:1] == [self.bos_token_id]
        self.add_eos_token = self.eos_token_id is not None and self.suffix_ids[-1:] == [self.eos_token_id]
        for flag in ("add_bos_token", "add_eos_token"):
            if isinstance(cfg.get(flag), bool) and cfg[flag] != getattr(self, flag):
                warnings.warn(
                    f"{self.folder / 'tokenizer_config.json'} sets {flag}={cfg[flag]}, but the post-processor of "
                    f"tokenizer.json {'does not add' if cfg[flag] else 'adds'} that token; following tokenizer.json, "
                    "as transformers 5 does (transformers 4's Llama tokenizer classes followed the flag)",
                    stacklevel=2,
                )

    def _id(self, token: str | None, fallback):
        if token is not None and (i := self._tok.token_to_id(token)) is not None:
            return i
        if isinstance(fallback, list):  # generation_config may list several ids
            fallback = fallback[0] if fallback else None
        return fallback if isinstance(fallback, int) else None

    # ---- ids ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. add_special_tokens adds what the tokenizer's post-processor adds (BOS...)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (a list, or a 1-D tensor)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    # ---- chat -----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False,
                            tools: list[dict] | None = None, generation_spans: list | None = None) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat template; `tools`
        (OpenAI-style function definitions) is passed to it as transformers does, and left undefined when None.
        A list given as `generation_spans` receives the (start, end) characters of the template's
        `{% generation %}` blocks (what transformers' return_assistant_tokens_mask marks)."""
        if self.chat_template is None:
            raise ValueError(
                f"tokenizer {self.name_or_path} has no chat template; pass a text-format dataset or a tokenizer "
                "with one"
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("apply_chat_template expects a list of dicts like {'role': 'user', 'content': '...'}")
        try:
            # Only plain JSON data reaches the (untrusted) template: no objects with methods.
            messages = json.loads(json.dumps(messages))
            extra = {"tools": json.loads(json.dumps(tools))} if tools is not None else {}
        except RecursionError:
            raise TypeError("apply_chat_template: messages are nested too deeply") from None
        except (TypeError, ValueError) as e:
            raise TypeError(f"apply_chat_template: messages must hold only JSON data (str, numbers, lists): {e}") from e
        return render(self._template(), self.name_or_path, messages=messages,
                      add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                      eos_token=self.eos_token or "", pad_token=self.pad_token or "", unk_token=self.unk_token or "",
                      generation_spans=generation_spans, **extra)

    def _template(self):
        if self._compiled is None:
            self._compiled = compile_template(self.chat_template, self.name_or_path)
        return self._compiled

    # ---- files ----------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Copy the tokenizer files into a folder of their own, `folder`, built under a temporary name and
        swapped into place; returns it. An existing `folder` is replaced only if it is empty or holds
        nothing but tokenizer files (TOKENIZER_FILES); else OutputError, before any copy. (export's
        save_model carries these files into a model folder itself.)"""
        out = Path(folder)
        with atomic_dir(out, TOKENIZER_OWNED) as tmp:
            for name in TOKENIZER_FILES:
                if (self.folder / name).is_file():
                    copy_file(self.folder / name, tmp / name)
        return out

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, got {type(data).__name__}")
    return data


def _added_around(processor: dict) -> tuple[list[int], list[int]]:
    """(ids before, ids after) the text that a post-processor (its tokenizer.json object) adds to a
    single sequence. These five types are all the `tokenizers` library has."""
    kind = processor.get("type")
    if kind == "TemplateProcessing":
        pieces, special = processor["single"], processor["special_tokens"]
        at = next(i for i, p in enumerate(pieces) if "Sequence" in p)
        before, after = ([i for p in part for i in special[p["SpecialToken"]["id"]]["ids"]]
                         for part in (pieces[:at], pieces[at + 1:]))
        return before, after
    if kind in ("BertProcessing", "RobertaProcessing"):
        return [processor["cls"][1]], [processor["sep"][1]]
    if kind == "ByteLevel":  # offsets only
        return [], []
    if kind == "Sequence":  # each wraps the result of the one before
        before, after = [], []
        for p in processor["processors"]:
            b, a = _added_around(p)
            before, after = b + before, after + a
        return before, after
    raise ValueError(f"tokenizer.json: post-processor type {kind!r} is not supported; supported: "
                     "TemplateProcessing, BertProcessing, RobertaProcessing, ByteLevel, Sequence")


def _default_template(template, folder: Path) -> str | None:
    """The default chat template: a string, or the one named "default" in a list of named templates."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ChatTemplateError(
                f"{folder / 'tokenizer_config.json'}: chat_template lists templates {sorted(named, key=str)} but "
                "none is named 'default'"
            )
        template = named["default"]
    if template is None and (folder / "chat_template.jinja").is_file():
        try:
            return (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{folder / 'chat_template.jinja'} is not UTF-8 text: {e}") from None
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string (or a list of "
                                f"named templates), got {type(template).__name__}")
    return template


def load_tokenizer(path_or_name: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face folder or of an embedded model name ("smollm2-135m-instruct")."""
    from lora_engine.sources import embedded

    if isinstance(path_or_name, str) and path_or_name in embedded.EMBEDDED_MODELS:
        return Tokenizer(embedded.ensure_converted(path_or_name), name_or_path=path_or_name)
    folder = Path(path_or_name)
    if not folder.is_dir():
        names = ", ".join(embedded.EMBEDDED_MODELS)
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist; pass a Hugging Face model folder "
                                f"or an embedded model name ({names})")
    return Tokenizer(folder, name_or_path=str(path_or_name))
