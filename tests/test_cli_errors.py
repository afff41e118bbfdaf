"""Bad input to a command line: one `error: ...` line on stderr, exit status 2, no traceback.

The commands run as `python -m lora_engine.<cmd>`, as a user runs them. Every input here is wrong
before any model could load (most name a --model that does not exist, which must not be reached),
so each case takes about one interpreter start.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_engine.cli import CliError, run_cli, user_input
from lora_engine.data.formats import DataError

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), LORA_ENGINE_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def assert_input_error(proc, *parts):
    """Exit status 2, stderr exactly one `error:` line containing each of `parts`, no traceback."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def test_train_non_utf8_data_is_reported_before_the_model_loads(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    out = tmp_path / "run"
    # --model names nothing: the data error must come first, and no run folder is made for it.
    proc = cli("lora_engine.train", "--data", bad, "--model", tmp_path / "no-model", "--out", out, tmp_path=tmp_path)
    assert_input_error(proc, f"{bad}:2: not UTF-8", "byte 0xe9 at byte offset 30", "save the file as UTF-8")
    assert not out.exists()


def test_train_invalid_json_and_missing_val_data(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    proc = cli("lora_engine.train", "--data", bad, "--model", tmp_path / "no-model", tmp_path=tmp_path)
    assert_input_error(proc, f"{bad}:2: invalid JSON", "each line must be one JSON object")
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine"}\n')
    proc = cli("lora_engine.train", "--data", good, "--val-data", tmp_path / "val.jsonl", "--model",
               tmp_path / "no-model", tmp_path=tmp_path)
    assert_input_error(proc, "val.jsonl does not exist", "pass a JSONL or JSON file")


def test_train_missing_model_folder_names_the_flag(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine"}\n')
    proc = cli("lora_engine.train", "--data", good, "--model", tmp_path / "no-model", "--out", tmp_path / "run",
               tmp_path=tmp_path)
    assert_input_error(proc, "--model: ", "no-model", "does not exist", "pass a Hugging Face model folder")


def test_train_config_file_errors(tmp_path):
    proc = cli("lora_engine.train", "--config", tmp_path / "none.toml", tmp_path=tmp_path)
    assert_input_error(proc, "--config", "none.toml: no such file")
    bad = tmp_path / "c.toml"
    bad.write_text("learning_rate = 1\n")
    assert_input_error(cli("lora_engine.train", "--config", bad, tmp_path=tmp_path),
                       "c.toml: unknown setting 'learning_rate'")


def test_train_resume_of_a_missing_folder(tmp_path):
    proc = cli("lora_engine.train", "--resume", tmp_path / "gone", tmp_path=tmp_path)
    assert_input_error(proc, "--resume", "gone: no such folder")


def test_generate_missing_model_folder(tmp_path):
    proc = cli("lora_engine.generate", "--model", tmp_path / "no-model", "--prompt", "hi", tmp_path=tmp_path)
    assert_input_error(proc, "--model: model path", "no-model", "does not exist", "embedded model name")


def test_generate_missing_adapter_is_reported_before_the_model(tmp_path):
    proc = cli("lora_engine.generate", "--model", tmp_path / "no-model", "--adapter", tmp_path / "no-adapter",
               "--prompt", "hi", tmp_path=tmp_path)
    assert_input_error(proc, "--adapter: adapter folder", "no-adapter does not exist", "adapter_config.json")


def test_export_missing_adapter_folder(tmp_path):
    proc = cli("lora_engine.export", "--model", tmp_path / "no-model", "--adapter", tmp_path / "no-adapter",
               "--out", tmp_path / "out", tmp_path=tmp_path)
    assert_input_error(proc, "--adapter: adapter folder", "no-adapter does not exist", "adapter_config.json")
    assert not (tmp_path / "out").exists()


def test_export_adapter_folder_without_config(tmp_path):
    (tmp_path / "adapter").mkdir()
    proc = cli("lora_engine.export", "--model", tmp_path / "no-model", "--adapter", tmp_path / "adapter",
               "--out", tmp_path / "out", tmp_path=tmp_path)
    assert_input_error(proc, "--adapter: ", "has no adapter_config.json", "save_adapter")


def test_eval_missing_data_file(tmp_path):
    proc = cli("lora_engine.eval", "--model", tmp_path / "no-model", "--data", tmp_path / "nope.jsonl",
               tmp_path=tmp_path)
    assert_input_error(proc, "nope.jsonl does not exist", "pass a JSONL or JSON file")


def test_eval_missing_adapter_before_the_model(tmp_path):
    proc = cli("lora_engine.eval", "--model", tmp_path / "no-model", "--adapter", tmp_path / "no-adapter",
               tmp_path=tmp_path)
    assert_input_error(proc, "--adapter: adapter folder", "no-adapter does not exist")


def test_convert_missing_and_invalid_gguf(tmp_path):
    proc = cli("lora_engine.convert", tmp_path / "missing.gguf", tmp_path / "out", tmp_path=tmp_path)
    assert_input_error(proc, "GGUF file", "missing.gguf does not exist", "pass the path of a .gguf file")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(60))
    proc = cli("lora_engine.convert", bad, tmp_path / "out", tmp_path=tmp_path)
    assert_input_error(proc, "bad.gguf is not a GGUF file", "not b'GGUF'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]  # no output or temporary folder left


def test_data_check_missing_and_non_utf8_file(tmp_path):
    proc = cli("lora_engine.data", "check", tmp_path / "nope.jsonl", "--model", tmp_path / "no-model",
               tmp_path=tmp_path)
    assert_input_error(proc, "data file", "nope.jsonl does not exist")
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'[{"text": "\xff"}]')
    proc = cli("lora_engine.data", "check", bad, "--model", tmp_path / "no-model", tmp_path=tmp_path)
    assert_input_error(proc, f"{bad}:1: not UTF-8", "byte 0xff at byte offset 11")


def test_runs_list_missing_folder(tmp_path):
    proc = cli("lora_engine.runs", "list", tmp_path / "nowhere", tmp_path=tmp_path)
    assert_input_error(proc, "runs list", "nowhere: no such folder")


@pytest.mark.parametrize("args, message", [
    (("lora_engine.train", "--batch-size", "0"), "--batch-size must be >= 1, got 0"),
    (("lora_engine.generate", "--prompt", "x", "--top-p", "1.5"), "--top-p must be in (0, 1], got 1.5"),
    (("lora_engine.generate", "--model", "x"), "the following arguments are required: --prompt"),
    (("lora_engine.export", "--out", "o"), "--model is required"),
    (("lora_engine.eval", "--batch-size", "many"), "invalid int value: 'many'"),
    (("lora_engine.convert", "only-one"), "the following arguments are required: out_dir"),
    (("lora_engine.data", "inspect"), "invalid choice: 'inspect'"),
    (("lora_engine.runs",), "the following arguments are required: cmd"),
])
def test_usage_errors_exit_2(args, message, tmp_path):
    proc = cli(*args, tmp_path=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = cli("lora_engine.data", "check", tmp_path / "nope.jsonl", "--debug", tmp_path=tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "DataError: data file" in proc.stderr
    assert "--debug" in cli("lora_engine.data", "--help", tmp_path=tmp_path).stdout


# ---- run_cli in-process: what is an input error and what is a bug ----------------------------------
def _raiser(exc):
    def main(argv):
        raise exc
    return main


def test_run_cli_reports_input_errors_on_one_line(capsys):
    assert run_cli(_raiser(DataError("d.jsonl:3: missing field 'text'")), []) == 2
    assert capsys.readouterr().err == "error: d.jsonl:3: missing field 'text'\n"
    assert run_cli(_raiser(CliError("x.gguf does not hold a Llama model:\n  - a\n  - b")), []) == 2
    assert capsys.readouterr().err == "error: x.gguf does not hold a Llama model: a; b\n"
    assert run_cli(_raiser(FileNotFoundError("no such folder z")), []) == 2
    assert capsys.readouterr().err == "error: no such folder z\n"


def test_run_cli_lets_bugs_propagate():
    with pytest.raises(RuntimeError, match="a bug"):
        run_cli(_raiser(RuntimeError("a bug")), [])
    with pytest.raises(ValueError, match="shape"):  # a ValueError outside user_input is a bug too
        run_cli(_raiser(ValueError("shape (2, 3) vs (3, 2)")), [])
    with pytest.raises(DataError):
        run_cli(_raiser(DataError("d.jsonl: bad")), ["--debug"])


def test_run_cli_exit_status_and_debug_flag():
    seen = []
    assert run_cli(lambda argv: seen.append(argv), ["a", "--debug", "b", "--", "--debug"]) == 0
    assert seen == [["a", "b", "--", "--debug"]]  # --debug is run_cli's; after "--" it is an argument
    assert run_cli(lambda argv: 1, []) == 1
    assert run_cli(_raiser(KeyboardInterrupt()), []) == 130


def test_user_input_names_where_and_keeps_other_errors():
    with pytest.raises(CliError, match=r"^--adapter: bad JSON$"), user_input("--adapter"):
        raise ValueError("bad JSON")
    with pytest.raises(CliError, match=r"^--model: no folder$"), user_input("--model"):
        raise FileNotFoundError("no folder")
    with pytest.raises(KeyError), user_input("--model"):
        raise KeyError("a bug")
