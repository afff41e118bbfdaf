"""Exit statuses a scheduler can act on (lora_engine/cli.py): 0 finished, 1 a bug, 2 bad input,
130 SIGINT, 143 SIGTERM. Each runs in a subprocess, as a scheduler sees it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_engine.cli import EXIT_BUG, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, EXIT_USER_ERROR, interrupted_status
from tests.test_cli_errors import assert_input_error, cli

ROOT = Path(__file__).resolve().parents[1]

# A command whose main is given on the command line, run through the real run_cli.
COMMAND = """
import sys, time
from pathlib import Path
from lora_engine.cli import run_cli
from lora_engine.io import atomic

def main(argv):
    what = argv[0]
    if what == "ok":
        return None
    if what == "bug":
        return 1 / 0
    if what == "disk":
        raise OSError(28, "No space left on device", argv[1])
    if what == "slow-write":  # a write under way when the signal comes
        with atomic.atomic_file(Path(argv[1])) as f:
            f.write(b"half a model")
            print("writing", flush=True)
            time.sleep(60)

sys.exit(run_cli(main))
"""


def run(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", COMMAND, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=120, **kw)


def test_the_statuses_are_the_documented_numbers():
    assert (EXIT_OK, EXIT_BUG, EXIT_USER_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED) == (0, 1, 2, 130, 143)
    assert interrupted_status("SIGINT") == 130 and interrupted_status(signal.SIGTERM) == 143
    with pytest.raises(KeyError):
        interrupted_status("SIGNOPE")


def test_finished_is_0_and_a_bug_is_1_with_its_traceback():
    assert run("ok").returncode == 0
    proc = run("bug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ZeroDivisionError" in proc.stderr


def test_a_full_disk_is_one_line_naming_the_path_and_2(tmp_path):
    proc = run("disk", tmp_path / "ckpt" / "state.pt")
    assert_input_error(proc, f"cannot write {tmp_path / 'ckpt' / 'state.pt'}: no space left on the device")


@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_gives_its_status_and_the_write_under_way_leaves_nothing(tmp_path, sig, status, word):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", COMMAND, "slow-write", str(tmp_path / "model.safetensors")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    assert [p.name.endswith(".tmp") for p in tmp_path.iterdir()] == [True]  # the temporary exists
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status and err.strip() == word and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_export_onto_a_run_folder_is_2_before_the_model_loads(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    t0 = time.time()
    proc = cli("lora_engine.export", "--model", tmp_path / "no-model", "--out", run_dir, tmp_path=tmp_path)
    assert_input_error(proc, f"--out: {run_dir} holds checkpoints/, metrics.jsonl:", "choose another output path")
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert time.time() - t0 < 60


def test_a_chat_template_the_sandbox_refuses_is_2(folder, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    proc = cli("lora_engine.generate", "--model", model, "--prompt", "hi", "--chat", "--max-new-tokens", "1",
               tmp_path=tmp_path)
    assert_input_error(proc, "the chat template of", "unsafe")
