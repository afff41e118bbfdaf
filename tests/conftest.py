"""Shared test settings: hypothesis profiles, the one tolerance table of the project, and the tiny models
and data files most tests run on (tiny_config; the fixtures folder, data and base).

Profiles: `dev` (default, quick), `ci` (selected by .ci/run with HYPOTHESIS_PROFILE=ci: more
examples, derandomized so a CI failure reproduces). Deadlines are off everywhere: the Triton
interpreter's timing says nothing about the kernel.
"""

import importlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Session fixtures for the embedded model: converted once into a private $LORA_ENGINE_HOME.
from tests.embedded_fixture import embedded_dir, embedded_gguf, embedded_home  # noqa: F401

# The tiny Llama of the tests that build a model in code (no checkpoint): 2 layers, grouped-query
# attention (4 query heads over 2 KV heads) of head_dim 8, so every code path of the decoder runs, at
# sizes the Triton interpreter and hypothesis can afford.
_TINY = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-5}
# The sizes of tests/hf_models.py's random checkpoints (its _BASE as a llama): a model built in code
# that matches, or deliberately differs from, one loaded from such a checkpoint.
_TINY_WIDE = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def tiny_config(wide: bool = False, **overrides):
    """A ModelConfig of the tiny Llama above (`wide`: hf_models' sizes); `overrides` replace fields."""
    from lora_engine import ModelConfig

    return ModelConfig(**((_TINY_WIDE if wide else _TINY) | overrides))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random 2-layer Llama with a real tokenizer (tests/test_train_support.py), one per test module:
    what the training tests run on. (test_io's `folder` is its own, a plain tmp_path.)"""
    from tests.test_train_support import save_tokenizer_files, tiny_model_folder

    return save_tokenizer_files(tiny_model_folder(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 chat records as a JSONL file, one per test module (test_amp and test_precision use fewer)."""
    from tests.test_train_support import chat_records, write_jsonl

    return write_jsonl(tmp_path_factory.mktemp("data") / "chat.jsonl", chat_records(40))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random llama checkpoint folder (tests/hf_models.py), one per test module; each test loads
    its own copy of the model from it."""
    from tests.hf_models import make_hf_model

    folder = tmp_path_factory.mktemp("llama")
    make_hf_model("llama", folder)
    return folder


settings.register_profile(
    "dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# The one tolerance table of the project: (rtol, atol) per kind of comparison, each with its reason.
# u_d below is the unit in the last place of dtype d at 1.0: 2**-23 fp32, 2**-10 fp16, 2**-7 bf16.
TOLERANCE = {
    # Our model against transformers in fp32 on CPU (torch.testing.assert_close): the same operations
    # in the same order, but attention may take a different SDPA path (GQA broadcast vs repeat_kv)
    # and BLAS may block the reductions differently; observed differences are ~1e-6 on logits of
    # magnitude ~1.
    "logits_fp32": (1e-5, 2e-5),
    # Kernels: the scale-aware rule of tests/kernel_utils.py, |ours - fp64| <= 2 |torch_d - fp64|
    # + rtol |fp64| + atol * scale, scale = max |fp64| over the tensor (or |a| @ |b| for a product).
    # rtol is one rounding of the element on store: u_d covers round-to-nearest (u_d / 2) and the
    # Triton interpreter's truncating bf16 store (up to u_d: it truncates fp32 -> bf16 where a GPU
    # rounds to nearest even, docs/triton_interpreter.md). atol covers what does not
    # scale with the element but with the tensor: a sum whose terms are up to `scale` and cancel to a
    # small element carries the summation-order and intermediate-rounding errors of the large terms,
    # and ours rounds intermediates in other places than torch does (fp32 accumulators where torch
    # rounds to d, and the reverse, e.g. the cross-entropy gradient block kept in d). Observed worst
    # atol needed over the CPU kernel tests (the ci profile and three random dev runs, rtol as here):
    # fp32 4.9e-7, fp16 1.2e-4, bf16 3.4e-3 of the scale; the entries leave margins of 8x, 4x, 2.3x.
    # fp32: only the summation order differs; 32 ulps of the scale.
    "kernel_fp32": (2**-23, 2**-18),
    # fp16 (11 significant bits): half an ulp of the scale.
    "kernel_fp16": (2**-10, 2**-11),
    # bf16 (8 significant bits): one ulp of the scale; the interpreter's truncating stores err all
    # one way, so errors of summed intermediates add up instead of cancelling.
    "kernel_bf16": (2**-7, 2**-7),
    # Losses of a tiny fp32 model trained 20 AdamW steps with the Triton kernels vs the reference
    # (tests/test_kernels_train.py, assert_close): each op differs by summation order only (~1e-7
    # relative) and Adam's normalised steps do not amplify that much in 20 steps; observed <= 1e-6
    # on losses ~4.
    "train_fp32": (1e-5, 1e-5),
    # Training under autocast against the same steps in fp32 (tests/test_amp.py): rtol is a relative
    # error, norm-wise per adapter gradient tensor (atol unused). A rounding to bf16 (8 significant
    # bits) errs by at most 2**-8 relative, to fp16 (11 bits) by 2**-11; call it e. Autocast rounds
    # at every cast and every GEMM output: a value of that 2-layer model goes through about 16
    # roundings from the embedding to the loss (per layer: the normed input, the q/k/v outputs,
    # attention, o_proj's input and output, gate/up, down's input and output; then the head's inputs
    # and logits), and a gradient through as many again on the way back: 32 e in the worst case,
    # ~sqrt(32) e ~ 6 e when the roundings are independent. The tolerance, 16 e, lies between.
    # Observed on the reference: <= 0.013 and 0.0016 (~3 e). Under TRITON_INTERPRET the kernels'
    # bf16 stores truncate instead of rounding (errors all one way, so they add up): observed 0.027
    # (7 e); on a GPU they round. A wrong kernel (a dropped term, a wrong scale or cast) is off by O(1).
    "amp_grad_bf16": (16 * 2**-8, 0.0),
    "amp_grad_fp16": (16 * 2**-11, 0.0),
    # The autocast loss (~4.3, a mean over 16 tokens of logsumexp minus the target logit) against
    # fp32, relative: a smooth average whose per-token errors are roundings of both signs that the
    # mean cancels further, so it is as accurate as one or two roundings of the loss itself: 2 e
    # (observed <= 5e-4 bf16 and 3e-5 fp16).
    "amp_loss_bf16": (2 * 2**-8, 0.0),
    "amp_loss_fp16": (2 * 2**-11, 0.0),
    # A LoRA step with the frozen base stored in bf16 (--precision bf16, and auto on a bf16 CPU) against
    # fp64 (tests/test_precision.py), relative and norm-wise per adapter gradient like amp_grad_bf16.
    # Besides autocast's ~16 roundings forward (see there) the residual stream is bf16 too: the
    # embedding's output and the two residual adds of each layer, 5 more in that 2-layer model, and as
    # many on the way back: ~42 e in the worst case, ~sqrt(42) e ~ 6.5 e when independent; 16 e lies
    # between. Observed over 12 random batches: <= 0.020 (5 e), 1.0-1.55x autocast's own error on fp32
    # weights. A wrong cast or a dropped term is off by O(1).
    "bf16_storage_grad": (16 * 2**-8, 0.0),
}


def make_run_folder(root) -> list[str]:
    """What `train --out root` leaves (config.json beside checkpoints/, adapter/, metrics.jsonl, run.json), for
    the tests that a writer refuses it; returns its entries, relative to root, sorted."""
    (root / "checkpoints" / "step-00000002").mkdir(parents=True)
    (root / "checkpoints" / "step-00000002" / "meta.json").write_text("{}")
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text("{}")
    for name, text in (("config.json", "{}"), ("metrics.jsonl", '{"step": 1}\n'), ("run.json", "{}")):
        (root / name).write_text(text)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def tol(kind: str) -> dict:
    rtol, atol = TOLERANCE[kind]
    return {"rtol": rtol, "atol": atol}


# The parity oracles: test extras (pyproject.toml [test]; scripts/setup.sh installs them).
ORACLES = {"transformers": "logits, configs, tokenizers", "peft": "adapter files",
           "bitsandbytes": "NF4 bytes and dequantized weights", "trl": "the GRPO losses and advantages",
           "llama_cpp": "GGUF files as llama.cpp loads and runs them"}


def require_oracle(module: str):
    """import_module(module), a parity oracle; missing, the test fails instead of skipping.

    A skipped parity test proves nothing, and a CI whose environment lost an extra would pass
    without ever comparing against the real library.
    """
    top = module.partition(".")[0]
    if top not in ORACLES:
        raise ValueError(f"require_oracle: {module!r} is not a parity oracle ({', '.join(ORACLES)})")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} is missing ({e}): {top} is the parity oracle for {ORACLES[top]}, a test extra. "
                    "Install the extras with `pip install -e '.[test]'` (scripts/setup.sh does).", pytrace=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cpu_without_bf16(monkeypatch):
    """--precision auto asks the CPU (train/precision.py): bf16 where it multiplies bf16 natively (and an
    explicit bf16 or fp16 warns where it does not). Every test sees a CPU with neither, so that no test
    depends on the machine it runs on (CI may have either); tests/test_precision.py sets the
    capabilities per case and tests both branches and the detection."""
    from lora_engine.train import precision

    monkeypatch.setattr(precision, "cpu_bf16_matmul", lambda: None)
    monkeypatch.setattr(precision, "cpu_fp16_matmul", lambda: None)


@pytest.fixture
def reg_dir(tmp_path, monkeypatch):
    """An empty registry folder, made the default ($LORA_ENGINE_REGISTRY), with no key in the environment."""
    from lora_engine.registry import names

    d = tmp_path / "registry"
    monkeypatch.setenv(names.ROOT_ENV, str(d))
    monkeypatch.delenv(names.KEY_ENV, raising=False)
    return d
