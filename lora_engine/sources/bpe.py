"""`byte_level_bpe`: the tokenizer.json of a llama.cpp byte-level BPE vocabulary (the GGUF converter uses it).

It follows llama.cpp's pre-tokenizer, not transformers' GGUF converter: for `smollm` every number
character is its own pre-token, which transformers drops, so the two differ on inputs like
" 12 34  56" or Eastern Arabic digits (tests/test_tokenizer.py pins both behaviours).
"""

from __future__ import annotations

# llama.cpp's pre-tokenizer names byte_level_bpe reproduces. smollm (like starcoder, refact,
# command-r) cuts out every \p{N} character first, then applies the GPT-2 regex; gpt-2 is the regex alone.
BYTE_LEVEL_PRE_TOKENIZERS = ("smollm", "gpt-2")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


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
