"""Fuzzing every file reader with malformed input: each must accept it or raise one of the engine's errors.

The readers: training and preference records (JSONL/JSON), safetensors headers, GGUF headers and
metadata, adapter configs and adapter tensors, chat templates. "The engine's errors" are what the commands turn into one
`error:` line and exit status 2 (lora_engine.cli.user_errors); anything else escaping is a bug.

Every example runs under limits: an address-space cap a few GB above what the process already maps
(a blow-up is a MemoryError, not a dead machine) and a wall-clock alarm (a hang is a TimeoutError).
Hitting either fails the test, even if a reader caught the MemoryError and wrapped it in its own error.
The number of examples follows the hypothesis profile (tests/conftest.py), times EXAMPLES_FACTOR.
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_engine.cli import user_errors
from lora_engine.data.pipeline import load_examples
from lora_engine.io.safetensors import StoredTensor, read_safetensors_header
from lora_engine.lora.adapter import load_adapter
from lora_engine.models.chat_template import compile_template, render
from lora_engine.models.tokenizer import load_tokenizer
from lora_engine.sources.gguf import GGUFFile, build_tokenizer, hf_config, tensor_plan, tokenizer_files

EXAMPLES_FACTOR = 5  # the ci profile's 20 -> 100 examples a test, two or three tests a reader
SECONDS = 20  # per example: the slowest legitimate one takes well under a second
EXTRA_MEMORY = 3 << 30  # bytes above what the process maps when the example starts

FUZZ = settings(settings.default, max_examples=settings.default.max_examples * EXAMPLES_FACTOR, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


class _OverTime(BaseException):
    """Raised by the alarm; a BaseException so that no reader's `except Exception` can swallow it."""


@contextlib.contextmanager
def _limits():
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped + EXTRA_MEMORY
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))

    def alarm(signum, frame):
        raise _OverTime(f"over {SECONDS} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def accepts_or_refuses(fn, *args, **kwargs):
    """fn(*args) under the limits: its result, or None when it raised one of the engine's errors."""
    try:
        with _limits():
            return fn(*args, **kwargs)
    except user_errors() as e:
        chain, cause = [], e
        while cause is not None:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        # RecursionError is the documented answer to deep nesting (JSON, a recursive macro); MemoryError never is.
        assert not any(isinstance(c, MemoryError) for c in chain), f"a reader hit the memory limit and wrapped it: {e}"
        assert str(e), f"{type(e).__name__} without a message"
        return None


# ---- data records ---------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["text", "instruction", "input", "output", "prompt", "completion", "messages", "role",
                        "content", "x"])
messages = st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system"])
                                                        | json_values, "content": st.text(max_size=20) | json_values}),
                    max_size=4)
records = st.dictionaries(keys, json_values | messages | st.text(max_size=30), max_size=4)
lines = st.one_of(
    records.map(lambda r: json.dumps(r, ensure_ascii=False)),
    records.map(lambda r: json.dumps(r).replace("\\u", "\\ud800\\u", 1)),  # lone surrogates
    st.integers(1, 3000).map(lambda n: '{"text": ' + "[" * n + "]" * n + "}"),  # deep nesting
    st.text(max_size=40),
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tests.test_tokenizer import _tiny
    from tests.test_train_support import CHATML

    return load_tokenizer(_tiny(tmp_path_factory.mktemp("tok"), {"chat_template": CHATML, "eos_token": "</s>"}))


@FUZZ
@given(body=st.lists(lines, min_size=1, max_size=5), bom=st.booleans(), junk=st.binary(max_size=4),
       suffix=st.sampled_from([".jsonl", ".json"]), fmt=st.sampled_from(["auto", "chat", "text", "alpaca"]))
def test_data_records(tmp_path, tokenizer, body, bom, junk, suffix, fmt):
    path = tmp_path / f"d{suffix}"
    raw = "\n".join(body).encode("utf-8", "surrogatepass")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + raw + junk)
    accepts_or_refuses(load_examples, path, tokenizer, fmt)


sides = st.text(max_size=20) | messages | json_values
preference_lines = st.fixed_dictionaries({"prompt": sides, "chosen": sides, "rejected": sides}).map(json.dumps) | lines


@FUZZ
@given(body=st.lists(preference_lines, min_size=1, max_size=5))
def test_preference_records(tmp_path, tokenizer, body):
    from lora_engine.data.formats import read_records
    from lora_engine.data.preference import pairs_from_records

    path = tmp_path / "p.jsonl"
    path.write_bytes("\n".join(body).encode("utf-8", "surrogatepass"))
    accepts_or_refuses(lambda: pairs_from_records(read_records(path), tokenizer))


# ---- safetensors headers ----------------------------------------------------------------------------
anything = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=6) | st.floats()
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I32", "U8", "BOOL", "Q4", ""]) | anything,
    "shape": st.lists(st.integers(-2, 2**40) | anything, max_size=4) | anything,
    "data_offsets": st.lists(st.integers(-64, 2**40) | anything, max_size=3) | anything,
}) | anything


@FUZZ
@given(header=st.dictionaries(st.text(max_size=6), entries, max_size=4), data=st.binary(max_size=96),
       declared=st.none() | st.integers(0, 2**64 - 1), cut=st.integers(0, 200))
def test_safetensors_headers(tmp_path, header, data, declared, cut):
    blob = json.dumps(header).encode()
    raw = struct.pack("<Q", len(blob) if declared is None else declared) + blob + data
    path = tmp_path / "m.safetensors"
    path.write_bytes(raw if cut > len(raw) else raw[: len(raw) - cut] if cut % 3 == 0 else raw)

    def read_all():
        parsed, start = read_safetensors_header(path)
        return [StoredTensor(n, path, info, start).read() for n, info in parsed.items()]

    accepts_or_refuses(read_all)


# ---- GGUF -------------------------------------------------------------------------------------------
LLAMA_KEYS = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "attention.key_length", "rope.dimension_count", "vocab_size",
              "rope.freq_base", "attention.layer_norm_rms_epsilon", "expert_count"]
typed = st.one_of(
    st.tuples(st.just("uint32"), st.integers(0, 2**32 - 1)), st.tuples(st.just("int32"), st.integers(-(2**31), 2**31 - 1)),
    st.tuples(st.just("float32"), st.floats(width=32)), st.tuples(st.just("string"), st.text(max_size=8)),
    st.tuples(st.just("bool"), st.booleans()), st.tuples(st.just("array"), st.lists(st.integers(0, 9), max_size=3)),
    st.tuples(st.just("uint32"), st.sampled_from([0, 1, 2, 4, 8, 16, 32])),
)


def _write_gguf(path, meta: dict, tok_meta: dict, tensors: list[tuple[str, tuple[int, ...]]]):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    add = {"uint32": w.add_uint32, "int32": w.add_int32, "float32": w.add_float32, "string": w.add_string,
           "bool": w.add_bool, "array": w.add_array}
    for key, (kind, value) in meta.items():
        add[kind](f"llama.{key}", value)
    for key, (kind, value) in tok_meta.items():
        add[kind](f"tokenizer.ggml.{key}", value)
    for name, shape in tensors:
        w.add_tensor(name, np.zeros(shape, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _convert_steps(path):
    g = GGUFFile(path)
    try:
        cfg = hf_config(g)
        tensor_plan(g, cfg)
        build_tokenizer(g)
        tokenizer_files(g, cfg)
    finally:
        g.close()


tensor_names = st.sampled_from(["token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight",
                                "blk.0.attn_norm.weight", "blk.7.ffn_up.weight", "rope_freqs.weight", "x"])


@FUZZ
@given(meta=st.dictionaries(st.sampled_from(LLAMA_KEYS), typed, max_size=len(LLAMA_KEYS)),
       tok_meta=st.dictionaries(st.sampled_from(["model", "pre", "tokens", "merges", "token_type", "bos_token_id",
                                                 "unknown_token_id"]), typed, max_size=5),
       tensors=st.dictionaries(tensor_names, st.lists(st.integers(1, 8), min_size=1, max_size=2).map(tuple),
                               max_size=4))
def test_gguf_metadata(tmp_path, meta, tok_meta, tensors):
    path = _write_gguf(tmp_path / "m.gguf", meta, tok_meta, list(tensors.items()))
    accepts_or_refuses(_convert_steps, path)


GOOD_META = {"block_count": ("uint32", 1), "embedding_length": ("uint32", 8), "feed_forward_length": ("uint32", 16),
             "attention.head_count": ("uint32", 2), "attention.layer_norm_rms_epsilon": ("float32", 1e-5)}
GOOD_TOK = {"model": ("string", "gpt2"), "tokens": ("array", ["a", "b", "ab"]), "merges": ("array", ["a b"])}


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    tensors = [("token_embd.weight", (3, 8)), ("output_norm.weight", (8,)), ("blk.0.attn_q.weight", (8, 8))]
    return _write_gguf(tmp_path_factory.mktemp("g") / "m.gguf", GOOD_META, GOOD_TOK, tensors).read_bytes()


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=8)), min_size=1, max_size=6),
       cut=st.integers(0, 64))
def test_gguf_bytes(tmp_path, gguf_bytes, edits, cut):
    data = bytearray(gguf_bytes)
    for at, blob in edits:  # overwrite bytes anywhere: counts, lengths, types, offsets, names
        at %= len(data)
        data[at : at + len(blob)] = blob
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(data[: len(data) - cut]))
    accepts_or_refuses(_convert_steps, path)


# ---- adapters ---------------------------------------------------------------------------------------
CONFIG_FIELDS = {
    "r": st.integers(-2, 6) | anything, "lora_alpha": st.floats() | anything, "lora_dropout": st.floats() | anything,
    "target_modules": st.sampled_from(["q_proj", ".*", r".*\.(q|v)_proj", "(.*.*.*.*.*.*.*.*)*z", "(a)\\1", "[",
                                       "x{99999}"]) | st.lists(st.sampled_from(["q_proj", "v_proj", "lm_head", ""])
                                                               | anything, max_size=3) | anything,
    "use_rslora": anything, "use_dora": anything, "rank_pattern": st.dictionaries(st.text(max_size=6), anything)
    | anything, "alpha_pattern": anything, "modules_to_save": st.lists(st.text(max_size=8), max_size=2) | anything,
    "peft_type": st.just("LORA") | anything, "bias": st.just("none") | anything,
}
LAYER_KEY = "base_model.model.model.layers.{}.self_attn.{}_proj.{}.weight"
tensor_specs = st.dictionaries(
    st.builds(LAYER_KEY.format, st.integers(0, 2), st.sampled_from("qvk"), st.sampled_from(["lora_A", "lora_B"]))
    | st.text(max_size=10),
    st.tuples(st.sampled_from([torch.float32, torch.bfloat16, torch.int32, torch.uint8, torch.bool]),
              st.lists(st.integers(0, 70), max_size=3)), max_size=5)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from tests.hf_models import make_hf_model

    folder = tmp_path_factory.mktemp("base")
    make_hf_model("llama", folder)
    return folder


@FUZZ
@given(config=st.fixed_dictionaries({}, optional=CONFIG_FIELDS).map(
           lambda d: {"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "r": 4, **d}),
       tensors=tensor_specs, raw_config=st.none() | st.text(max_size=20))
def test_adapter_files(tmp_path, tiny_base, config, tensors, raw_config):
    from lora_engine import load_model
    from lora_engine.io.safetensors import save_tensors

    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(raw_config if raw_config is not None else json.dumps(config))
    save_tensors(folder / "adapter_model.safetensors",
                 {k: torch.zeros(shape, dtype=dtype) for k, (dtype, shape) in tensors.items()})
    accepts_or_refuses(load_adapter, load_model(tiny_base), folder, verbose=False)


# ---- chat templates ---------------------------------------------------------------------------------
PIECES = ["{{ 'a' * N }}", "{{ 'ab' ~ 'c' * N }}", "{{ range(N)|list|length }}", "{{ 'x'|center(N) }}",
          "{{ '%Ns' % 1 }}", "{{ '{:>N}'.format(1) }}", "{{ N ** N }}", "{{ [1] * N }}", "{{ 'a'|indent(N) }}",
          "{% for m in messages %}{{ m['role'] }}{{ m.content }}{% endfor %}", "{{ messages[N] }}",
          "{{ raise_exception('no') }}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "{{ x.y }}",
          "{{ ''.__class__.__mro__ }}", "{{ messages|tojson }}", "{% if %}", "{{", "}}", "{% endfor %}",
          "{{ 'a'|replace('a', 'bb' * N) }}", "{{ ('a' * N)|wordwrap(N) }}", "{{ 1 / 0 }}", "{{ strftime_now('%Y') }}"]
templates = st.lists(st.tuples(st.sampled_from(PIECES), st.sampled_from(["0", "3", "99", "100000", "10**9", "10**11",
                                                                         "-1"])), max_size=4) \
    .map(lambda ps: "".join(p.replace("N", n) for p, n in ps))


@FUZZ
@given(template=templates | st.text(alphabet="{}%#'\"()[]|~*+-. abcx0123456789", max_size=40),
       msgs=st.lists(st.fixed_dictionaries({"role": st.text(max_size=5), "content": st.text(max_size=20)}), max_size=3))
def test_chat_templates(template, msgs):
    def run():
        return render(compile_template(template, "fuzz"), "fuzz", messages=msgs, add_generation_prompt=True)

    out = accepts_or_refuses(run)
    assert out is None or len(out) <= 10_000_000
