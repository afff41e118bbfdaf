"""Tokenizer: a Hugging Face `tokenizer.json` (via the `tokenizers` library) plus its chat template.

    tok = load_tokenizer("smollm2-135m-instruct")       # or a Hugging Face folder
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True))

Special tokens written in the text (`<|im_start|>`) are recognised as such. bos/eos/pad come from
tokenizer_config.json, special_tokens_map.json and generation_config.json, in that order of
preference. The chat template is a Jinja string from the checkpoint, i.e. untrusted input: it is
rendered in jinja2's ImmutableSandboxedEnvironment, with the globals and settings transformers
gives it (raise_exception, strftime_now, a JSON `tojson`, trim_blocks and lstrip_blocks).

`byte_level_bpe` builds the tokenizer.json of a llama.cpp byte-level vocabulary (the GGUF converter
uses it). It follows llama.cpp's pre-tokenizer, not transformers' GGUF converter: for `smollm` every
number character is its own pre-token, which transformers drops, so the two differ on inputs like
" 12 34  56" or Eastern Arabic digits (tests/test_tokenizer.py pins both behaviours).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

# Files `save` copies: what a Hugging Face tokenizer folder holds.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# llama.cpp's pre-tokenizer names byte_level_bpe reproduces. smollm (like starcoder, refact,
# command-r) cuts out every \p{N} character first, then applies the GPT-2 regex; gpt-2 is the regex alone.
BYTE_LEVEL_PRE_TOKENIZERS = ("smollm", "gpt-2")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


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
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the checkpoint's chat template."""
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
        except (TypeError, ValueError) as e:
            raise TypeError(f"apply_chat_template: messages must hold only JSON data (str, numbers, lists): {e}") from e
        import jinja2

        try:
            return self._template().render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token or "",
                eos_token=self.eos_token or "", pad_token=self.pad_token or "", unk_token=self.unk_token or "",
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template of {self.name_or_path} failed: {e}") from e

    def _template(self):
        if self._compiled is None:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                # Jinja's own tojson escapes HTML characters, which would change the rendered text.
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            try:
                self._compiled = env.from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(
                    f"the chat template of {self.name_or_path} is not valid Jinja (line {e.lineno}): {e.message}"
                ) from e
        return self._compiled

    # ---- files ----------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Copy the tokenizer files into `folder` (created), each written atomically."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            src = self.folder / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                tmp = out / f".{name}.tmp"
                with open(src, "rb") as fi, open(tmp, "wb") as fo:
                    shutil.copyfileobj(fi, fo)
                    fo.flush()
                    os.fsync(fo.fileno())
                os.replace(tmp, out / name)
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


def _default_template(template, folder: Path) -> str | None:
    """The default chat template: a string, or the one named "default" in a list of named templates."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(
                f"{folder / 'tokenizer_config.json'}: chat_template lists templates {sorted(named)} but none is "
                "named 'default'"
            )
        return named["default"]
    if template is None and (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template


def load_tokenizer(path_or_name: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a Hugging Face folder or of an embedded model name ("smollm2-135m-instruct")."""
    from lora_engine.sources import embedded

    if isinstance(path_or_name, str) and path_or_name in embedded.EMBEDDED_MODELS:
        return Tokenizer(embedded.ensure_converted(path_or_name), name_or_path=path_or_name)
    folder = Path(path_or_name)
    if not folder.is_dir():
        names = ", ".join(embedded.EMBEDDED_MODELS)
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist (embedded models: {names})")
    return Tokenizer(folder, name_or_path=str(path_or_name))


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (`bytes_to_unicode`): how byte-level BPE spells bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], extra = chr(256 + extra), extra + 1
    return table


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int] | None = None,
                   pre_tokenizer: str = "gpt-2", bos_id: int | None = None, eos_id: int | None = None,
                   add_bos: bool = False, add_eos: bool = False):
    """A `tokenizers.Tokenizer` for a byte-level BPE vocabulary as llama.cpp stores it.

    tokens: id -> token, spelled in GPT-2's byte alphabet; merges: "left right" strings, best first;
    token_types: llama.cpp's per-token types (3 = control -> special added token, 4 = user-defined ->
    added token matched whole); add_bos/add_eos: what encode(add_special_tokens=True) adds.
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    if pre_tokenizer not in BYTE_LEVEL_PRE_TOKENIZERS:
        raise ValueError(f"pre-tokenizer {pre_tokenizer!r} is not supported; supported: "
                         f"{', '.join(BYTE_LEVEL_PRE_TOKENIZERS)}")
    types = token_types or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(types)} token types")
    for name, i in (("bos", bos_id), ("eos", eos_id)):
        if i is not None and not 0 <= i < len(tokens):
            raise ValueError(f"{name} token id {i} is outside the vocabulary of {len(tokens)} tokens")
    # A token outside the byte alphabet (llama.cpp writes some added tokens raw) is respelled byte
    # by byte, as transformers' converter does, so the BPE model stays consistent.
    alphabet = byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode()), i)
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"merge {i} {merge!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    tok = Backend(models.BPE(vocab=vocab, merges=pairs, dropout=None, fuse_unk=False,
                             continuing_subword_prefix="", end_of_word_suffix=""))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre_tokenizer == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == CONTROL and set(t) <= spelled])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab])
    add = [i for i, flag in ((bos_id, add_bos), (eos_id, add_eos)) if i is not None and flag]
    if add:
        first = [tokens[bos_id]] if add_bos and bos_id is not None else []
        last = [tokens[eos_id]] if add_eos and eos_id is not None else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(first + ["$A"] + last),
            pair=" ".join(first + ["$A"] + last + first + ["$B:1"] + last),
            special_tokens=[(tokens[i], i) for i in add],
        )
    return tok
