"""The command lines' shared value grammars (lora_engine/cli.py): sizes and dtypes, every accepted
spelling and the errors, and the config dataclasses that read them."""

import pytest

from lora_engine.cli import parse_dtype, parse_size


@pytest.mark.parametrize("text, want", [
    (5_000_000, 5_000_000), ("1000", 1000), ("512B", 512), ("512b", 512),
    ("2KB", 2000), ("2kb", 2000), ("3MB", 3 * 10**6), ("1.5GB", 1_500_000_000), ("6gb", 6 * 10**9),
    ("1TB", 10**12), ("2KiB", 2048), ("2kib", 2048), ("512MiB", 512 * 2**20), ("24GiB", 24 * 2**30),
    ("24 GiB", 24 * 2**30), (" 1TiB ", 2**40), (".5GiB", 2**29),
])
def test_parse_size_accepts_both_grammars(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", [0, -5, True, 1.5, None, "", "0MB", "-1GB", "5XB", "GB", "1,5GB", "1e9"])
def test_parse_size_refuses_with_the_flag_and_the_units(bad):
    with pytest.raises(ValueError, match=r"--fit .* is not a size; write a positive byte count or a number with a "
                                         r"unit, e\.g\. 24GiB, 6GB or 512MiB \(units: B, KB, MB, GB, TB, KiB, MiB"):
        parse_size(bad, "--fit")


@pytest.mark.parametrize("text, want", [
    ("fp32", "fp32"), ("float32", "fp32"), ("f32", "fp32"), ("FP32", "fp32"),
    ("bf16", "bf16"), ("bfloat16", "bf16"), ("BF16", "bf16"),
    ("fp16", "fp16"), ("float16", "fp16"), ("f16", "fp16"), (" Float16 ", "fp16"),
])
def test_parse_dtype_gives_the_short_name_for_every_alias(text, want):
    assert parse_dtype(text, "--dtype") == want


def test_parse_dtype_keeps_a_flags_other_values():
    assert parse_dtype("auto", "--precision", ("auto",)) == "auto"
    assert parse_dtype("Q8_0", "--gguf-type", ("f32", "q8_0")) == "q8_0"
    assert parse_dtype("f32", "--gguf-type", ("f32", "q8_0")) == "f32"  # a value of the flag's own wins


@pytest.mark.parametrize("bad", ["int8", "fp8", "", "auto", None])
def test_parse_dtype_refuses_naming_the_flag_and_the_spellings(bad):
    with pytest.raises(ValueError, match=r"--dtype must be one of fp32, bf16, fp16 \(or float32, bfloat16, "
                                         r"float16, f32, f16\), got "):
        parse_dtype(bad, "--dtype")


def test_every_dtype_flag_takes_the_aliases():
    from lora_engine.export import ExportArgs
    from lora_engine.generate import GenerateConfig
    from lora_engine.train.config import TrainConfig
    from lora_engine.train.planning import PlanConfig

    assert TrainConfig(precision="bfloat16").precision == "bf16"
    assert TrainConfig(precision="auto").precision == "auto"
    assert PlanConfig(model="m", precision="float32").precision == "fp32"
    assert GenerateConfig(model="m", prompt="p", dtype="float16").dtype == "fp16"
    assert ExportArgs(model="m", out="o", dtype="bfloat16").dtype == "bf16"
    assert ExportArgs(model="m", gguf="g", gguf_type="fp16").gguf_type == "f16"
    assert ExportArgs(model="m", gguf="g", gguf_type="float32").gguf_type == "f32"
    assert ExportArgs(model="m", gguf="g", gguf_type="bfloat16").gguf_type == "bf16"
    assert ExportArgs(model="m", gguf="g", gguf_type="Q4_0").gguf_type == "q4_0"
    assert ExportArgs(model="m", gguf="g", gguf_type="Q4_K_M").gguf_type == "q4_k_m"
    with pytest.raises(ValueError, match=r"--precision must be one of auto, fp32, bf16, fp16 .*got 'fp64'"):
        TrainConfig(precision="fp64")
    with pytest.raises(ValueError, match=r"--gguf-type must be one of f32, f16, bf16, q8_0, q4_0, q4_1, q6_k, "
                                         r"q5_k_m, q5_k_s, q4_k_m, q4_k_s, fp32, fp16 .*got 'q2_k'"):
        ExportArgs(model="m", gguf="g", gguf_type="q2_k")
