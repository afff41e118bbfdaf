"""`--config run.yaml` beside TOML: the same checks, flags over the file, and the run's config.yaml read back."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lora_engine.cli import ConfigError, load_config, parse, to_yaml
from lora_engine.train.config import TrainConfig
from lora_engine.train.distributed import Dist
from lora_engine.train.setup import open_out

FLAGS = ["--lr", "0.0002", "--r", "8", "--max-steps", "7", "--no-plot", "--target-modules", "q_proj,v_proj",
         "--val-data", "v.jsonl"]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", ["run.yaml", "run.yml", "RUN.YAML"])
def test_yaml_file_is_read_by_its_extension(tmp_path, name):
    f = write(tmp_path / name, "lr: 2.0e-4\nr: 8\nmax-steps: 7\nplot: false\ntarget_modules: q_proj,v_proj\n"
                               "val_data: v.jsonl\n")
    assert parse(TrainConfig, ["--config", f])[0] == parse(TrainConfig, FLAGS)[0]


def test_file_and_flags_resolve_as_flags_alone(tmp_path):
    """Half the settings in a file, the other half and an override as flags: the flags-only config."""
    f = write(tmp_path / "run.yaml", "lr: 0.5\nr: 8\nmax_steps: 7\n")
    cfg, explicit = parse(TrainConfig, ["--config", f, "--lr", "0.0002", "--no-plot", "--target-modules",
                                        "q_proj,v_proj", "--val-data", "v.jsonl"])
    assert cfg == parse(TrainConfig, FLAGS)[0]
    assert explicit == {"lr", "plot", "target_modules", "val_data"}  # the file's values are not flags
    toml = write(tmp_path / "run.toml", "lr = 0.5\nr = 8\nmax_steps = 7\n")
    assert parse(TrainConfig, ["--config", toml, *FLAGS])[0] == cfg


def test_yaml_reads_exponents_without_a_dot_as_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` as a string; a float field takes it as the number it spells.
    f = write(tmp_path / "run.yaml", "lr: 1e-3\nweight_decay: 0\n")
    cfg = parse(TrainConfig, ["--config", f])[0]
    assert cfg.lr == 1e-3 and cfg.weight_decay == 0.0 and isinstance(cfg.weight_decay, float)


def test_empty_yaml_sets_nothing(tmp_path):
    assert load_config(write(tmp_path / "e.yaml", ""), TrainConfig) == {}


@pytest.mark.parametrize("text, match", [
    ("learning_rate: 0.1\n", r"c.yaml: unknown setting 'learning_rate'; known: .*batch_size"),
    ("r: eight\n", r"c.yaml: r must be int, got 'eight'"),
    ("r: true\n", r"c.yaml: r must be int, got True"),
    ("lr: fast\n", r"c.yaml: lr must be float, got 'fast'"),
    ("- r: 8\n", r"c.yaml: a config file is one mapping of name: value lines, got a list"),
    ("r: [8\n", r"c.yaml: invalid YAML: "),
])
def test_bad_yaml_names_the_file_and_key(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        parse(TrainConfig, ["--config", write(tmp_path / "c.yaml", text)])


def test_missing_config_file_says_what_to_pass(tmp_path):
    with pytest.raises(ConfigError, match=r"--config .*nope.yaml: no such file; .*TOML.*\.yaml"):
        load_config(tmp_path / "nope.yaml", TrainConfig)


def test_saved_yaml_reruns_to_the_same_config(tmp_path):
    """open_out writes config.yaml beside config.json; --config config.yaml resolves to the run's config."""
    cfg = dataclasses.replace(parse(TrainConfig, FLAGS)[0], out=str(tmp_path / "run"), auto_memory="6GiB",
                              lora_alpha=16.0, min_lr_ratio=1e-5, data="d.jsonl")
    open_out(cfg, Dist())
    saved = tmp_path / "run" / "config.yaml"
    assert saved.is_file() and (tmp_path / "run" / "config.json").is_file()
    assert parse(TrainConfig, ["--config", str(saved)])[0] == cfg
    assert to_yaml(cfg) == saved.read_text()


def test_yaml_keeps_tuples_as_lists(tmp_path):
    @dataclasses.dataclass
    class C:
        names: tuple[str, ...] = ()
        n: int | None = None

    f = write(tmp_path / "c.yaml", to_yaml(C(names=("a", "b"))))
    assert load_config(f, C) == {"names": ("a", "b"), "n": None}
    with pytest.raises(ConfigError, match=r"c.yaml: names must be a list of str, got 'a'"):
        load_config(write(tmp_path / "c.yaml", "names: a\n"), C)
