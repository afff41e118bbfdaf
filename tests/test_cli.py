"""Command lines from dataclasses (lora_engine/cli.py): shared settings declared once, subcommands,
positional arguments, and the log messages a command shows."""

import ast
import dataclasses
import logging
from pathlib import Path

import pytest

from lora_engine.cli import log_to, option, option_like, parse, parse_command
from lora_engine.eval import EvalConfig
from lora_engine.generate import GenerateConfig
from lora_engine.train.config import TrainConfig, quantize_method

ROOT = Path(__file__).resolve().parents[1] / "lora_engine"

# eval's flags that are training's settings: eval field -> TrainConfig field.
EVAL_FROM_TRAIN = {"model": "model", "format": "format", "max_length": "max_length", "batch_size": "eval_batch_size",
                   "general": "general_eval", "general_tokens": "general_tokens",
                   "forgetting_threshold": "forgetting_threshold", "quantize": "quantize"}


def _fields(cls):
    return {f.name: f for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("cls, shared", [(EvalConfig, EVAL_FROM_TRAIN),
                                         (GenerateConfig, {"model": "model", "device": "device"})])
def test_shared_settings_are_train_configs_fields(cls, shared):
    ours, train = _fields(cls), _fields(TrainConfig)
    for name, src in shared.items():
        assert ours[name].default == train[src].default, name
        assert ours[name].metadata == train[src].metadata, name  # help and choices too: declared once
    # The parsed command line without flags has exactly those defaults.
    argv = [] if cls is EvalConfig else ["--prompt", "x"]
    cfg, explicit = parse(cls, argv)
    defaults = TrainConfig()
    assert {n: getattr(cfg, n) for n in shared} == {n: getattr(defaults, s) for n, s in shared.items()}
    assert explicit == ({"prompt"} if cls is GenerateConfig else set())


def test_eval_keeps_its_flag_names():
    cfg, explicit = parse(EvalConfig, ["--no-general", "--batch-size", "3", "--quantize", "nf4", "--max-length", "64"])
    assert (cfg.general, cfg.batch_size, cfg.quantize, cfg.max_length) == (False, 3, "nf4", 64)
    assert explicit == {"general", "batch_size", "quantize", "max_length"}


def _quantize_none_comparisons(source: str) -> list[int]:
    """Lines comparing a `quantize` name or attribute with the string "none"."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = {x.attr if isinstance(x, ast.Attribute) else getattr(x, "id", None) for x in sides}
            if "quantize" in names and any(isinstance(x, ast.Constant) and x.value == "none" for x in sides):
                lines.append(node.lineno)
    return sorted(lines)


def test_the_none_quantize_choice_is_mapped_in_one_place():
    """quantize_method maps it; no module compares a `quantize` value with "none" itself (eval and the
    loop each did)."""
    assert quantize_method("none") is None and quantize_method("nf4") == "nf4"
    found = [f"{p.relative_to(ROOT.parent)}:{line}" for p in sorted(ROOT.rglob("*.py"))
             for line in _quantize_none_comparisons(p.read_text(encoding="utf-8"))]
    assert not found, f"map --quantize with train.config.quantize_method instead: {found}"
    old = 'x = 1\nkw = {"quantize": a.quantize} if a.quantize != "none" else {}\nif quantize == "none": pass\n'
    assert _quantize_none_comparisons(old) == [2, 3]  # the walk finds the forms that were there


def test_option_like_copies_a_field_and_names_a_missing_one():
    f = option_like(TrainConfig, "lr", help="another help")
    assert f.default == 1e-3 and f.metadata["help"] == "another help"
    with pytest.raises(AttributeError, match="option_like: TrainConfig has no field 'learning_rate'"):
        option_like(TrainConfig, "learning_rate")


@dataclasses.dataclass
class _Copy:
    """copy SRC to DST"""

    src: str = option(help="from", positional=True)
    dst: str = option(help="to", positional=True)
    times: int = option(1, "how often")

    def __post_init__(self):
        if self.times < 1:
            raise ValueError(f"--times must be >= 1, got {self.times}")


@dataclasses.dataclass
class _Show:
    """show NAME"""

    name: str | None = option(None, "what to show", required=True)


def test_parse_command_subcommands_positionals_and_required_flags(capsys):
    assert parse_command({"copy": _Copy, "show": _Show}, ["copy", "a", "b", "--times", "2"]) == \
        ("copy", _Copy("a", "b", 2), {"src", "dst", "times"})
    assert parse_command({"copy": _Copy, "show": _Show}, ["show", "--name", "x"]) == ("show", _Show("x"), {"name"})
    for argv, message in ((["copy", "a"], "the following arguments are required: dst"),
                          (["show"], "the following arguments are required: --name"),
                          (["copy", "a", "b", "--times", "0"], "--times must be >= 1, got 0"),
                          (["move"], "invalid choice: 'move'"),
                          ([], "the following arguments are required: cmd")):
        with pytest.raises(SystemExit):
            parse_command({"copy": _Copy, "show": _Show}, argv)
        assert message in capsys.readouterr().err, argv


def test_log_to_shows_engine_messages_while_a_command_runs(capsys):
    engine = logging.getLogger("lora_engine")
    handlers, level = list(engine.handlers), engine.level
    log = logging.getLogger("lora_engine.train.loop")
    with log_to("stdout"):
        log.info("step 1/2")
        logging.getLogger("somebody.else").warning("not ours")
    log.info("after the command: not shown")
    captured = capsys.readouterr()
    assert captured.out == "step 1/2\n" and "not ours" not in captured.out
    assert engine.handlers == handlers and engine.level == level
    with pytest.raises(ValueError, match="stream_name must be 'stdout' or 'stderr'"), log_to("stdin"):
        pass
