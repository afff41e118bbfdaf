"""The test helpers that decide what passes: require_oracle (tests/conftest.py), the accuracy rule
and LaunchSpy (tests/kernel_utils.py). A helper that passes everything would make every test that
uses it one that cannot fail."""

import re
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ORACLES, TOLERANCE, require_oracle
from tests.kernel_utils import LaunchSpy, assert_accurate, needs_triton

# ---- require_oracle -------------------------------------------------------------------------------


def test_require_oracle_returns_the_module():
    assert require_oracle("bitsandbytes.functional") is sys.modules["bitsandbytes.functional"]


@pytest.mark.parametrize("name", ["peft", "transformers", "bitsandbytes.functional"])
def test_a_missing_oracle_fails_instead_of_skipping(name, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # makes `import name` raise ImportError
    top = name.partition(".")[0]
    with pytest.raises(pytest.fail.Exception, match=rf"{re.escape(name)} is missing .*{top} is the parity oracle "
                                                    r"for .*a test extra\. Install the extras with `pip install"):
        require_oracle(name)


def test_require_oracle_is_for_oracles_only():
    with pytest.raises(ValueError, match=r"require_oracle: 'matplotlib' is not a parity oracle \(transformers, peft, "
                                         r"bitsandbytes, trl, llama_cpp\)"):
        require_oracle("matplotlib")


def test_no_test_skips_on_a_missing_oracle():
    # pytest's importorskip on an oracle would turn a lost extra into green skips; every oracle goes
    # through require_oracle.
    pattern = re.compile(rf"importorskip\(\s*['\"]({'|'.join(ORACLES)})")
    offenders = [p.name for p in sorted(Path(__file__).parent.glob("*.py")) if pattern.search(p.read_text())]
    assert not offenders, offenders


# ---- the accuracy rule ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 1e4])
def test_the_rule_scales_with_the_data(dtype, magnitude):
    rtol, atol = TOLERANCE[{torch.float32: "kernel_fp32", torch.float16: "kernel_fp16",
                            torch.bfloat16: "kernel_bf16"}[dtype]]
    ref = torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64) * magnitude  # scale = magnitude
    allowed = rtol * ref.abs() + atol * magnitude
    assert_accurate(ref + 0.99 * allowed, ref, dtype)
    with pytest.raises(AssertionError, match=r"1 of 3 elements off; first at \(2,\)"):
        assert_accurate(ref + torch.tensor([0, 0, 1.01]) * allowed, ref, dtype)


def test_the_rule_allows_twice_torchs_own_error():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    same = ref + torch.tensor([0.1, 0.0], dtype=torch.float64)  # torch in that dtype is 0.1 off
    with pytest.raises(AssertionError, match="1 of 2 elements off; first at \\(1,\\)"):
        assert_accurate((ref + 0.199).float(), ref, same=same.float())
    assert_accurate((ref + torch.tensor([0.199, 0.0], dtype=torch.float64)).float(), ref, same=same.float())
    with pytest.raises(AssertionError, match="1 of 2 elements off"):
        assert_accurate((ref + torch.tensor([0.201, 0.0], dtype=torch.float64)).float(), ref, same=same.float())


def test_the_rule_rejects_nan_and_shape_mismatch():
    ref = torch.ones(3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="1 of 3 elements off"):
        assert_accurate(torch.tensor([1.0, float("nan"), 1.0]), ref)
    with pytest.raises(AssertionError, match=r"ours \(2,\) torch.float32, reference \(3,\)"):
        assert_accurate(torch.ones(2), ref)


def test_an_explicit_scale_replaces_max_abs():
    ref = torch.tensor([1e-3, 1.0], dtype=torch.float64)
    scale = torch.tensor([1e-3, 1.0], dtype=torch.float64)  # each element's own magnitude
    err = 0.5 * TOLERANCE["kernel_fp32"][1]
    assert_accurate((ref + err).float(), ref)  # max-abs scale 1: fine for both
    with pytest.raises(AssertionError, match=r"first at \(0,\)"):
        assert_accurate((ref + err).float(), ref, scale=scale)


# ---- LaunchSpy ------------------------------------------------------------------------------------


@needs_triton
def test_launch_spy_records_and_still_runs_the_kernel(monkeypatch):
    from lora_engine.kernels import swiglu_triton
    from tests.kernel_utils import device

    spy = LaunchSpy(monkeypatch, swiglu_triton, "_swiglu_fwd")
    g, u = torch.randn(3, 5, device=device()), torch.randn(3, 5, device=device())
    y = swiglu_triton.swiglu_forward(g, u)
    assert_accurate(y, torch.nn.functional.silu(g.double()) * u.double(), torch.float32)
    assert [(launch["grid"], launch["BLOCK"], launch["args"][3]) for launch in spy.launches] == \
        [((1,), swiglu_triton.BLOCK, 15)]
