"""The README cannot rot: every ```python block runs, and every command-line option it names exists.

Each Python block runs as a fresh `python -c` in its own temporary folder (so relative paths such as
"out/adapter" land there), with this checkout first on PYTHONPATH and the session's converted
embedded model as $LORA_ENGINE_HOME; a block that raises fails the test with its stderr. Blocks keep
their sizes small themselves (a few tokens, a few steps), as a reader's first try would.

Every `python -m lora_engine.CMD [SUB] --flag` in the README (code blocks, inline code and the
measured table alike) is checked against the help text of that very command.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK_TIMEOUT_S = 900  # a block loads the 135M model and runs a few steps; minutes only on a loaded machine


def python_blocks(text: str) -> list[str]:
    """The bodies of the ```python fenced blocks of a markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def run_block(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)


def check_ran(proc: subprocess.CompletedProcess, name: str) -> None:
    if proc.returncode != 0:
        pytest.fail(f"{name} exited with {proc.returncode}:\n{proc.stderr[-4000:]}", pytrace=False)


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2, "README.md lost its Python examples (or their ```python fences)"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"block{i + 1}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs(index, embedded_dir, tmp_path):
    check_ran(run_block(BLOCKS[index], tmp_path), f"README.md's Python block {index + 1}")


def test_a_raising_block_fails(tmp_path):
    """The harness itself: a block that raises is reported with its error, not passed over."""
    proc = run_block("import lora_engine\nraise ValueError('boom in the README')", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="boom in the README"):
        check_ran(proc, "a raising block")
    assert python_blocks("text\n```python\nx = 1\n```\n```bash\nls\n```\n") == ["x = 1\n"]


# ---- command lines --------------------------------------------------------------------------------

# `-m lora_engine.CMD` and the words after it, up to the end of the inline code span, a comment or a
# table cell. SUB is the first word when CMD has subcommands.
_COMMAND = re.compile(r"-m lora_engine\.(\w+)([^`#|\n]*)")
_WITH_SUBCOMMANDS = ("data", "runs", "registry")


def readme_commands(text: str) -> dict[tuple[str, ...], set[str]]:
    """(CMD,) or (CMD, SUB) -> the --options the README gives it."""
    out: dict[tuple[str, ...], set[str]] = {}
    for cmd, rest in _COMMAND.findall(text):
        words = rest.split()
        key = (cmd, words[0]) if cmd in _WITH_SUBCOMMANDS and words and not words[0].startswith("-") else (cmd,)
        out.setdefault(key, set()).update(w.split("=")[0] for w in words if w.startswith("--"))
    return out


_HELP_OF_EACH = """
import contextlib, io, json, runpy, sys
out = {}
for key in json.loads(sys.argv[1]):
    sys.argv = ["python -m lora_engine." + key[0], *key[1:], "--help"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_module("lora_engine." + key[0], run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
    out[" ".join(key)] = buf.getvalue()
print(json.dumps(out))
"""


def test_every_command_and_option_in_the_readme_exists():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert ("train",) in commands and ("registry", "publish") in commands
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _HELP_OF_EACH, json.dumps(sorted(commands))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    check_ran(proc, "the --help of the README's commands")
    helps = json.loads(proc.stdout.strip().splitlines()[-1])
    missing = []
    for key, options in sorted(commands.items()):
        text = helps[" ".join(key)]
        if "usage:" not in text:
            missing.append(f"python -m lora_engine.{' '.join(key)} (no such command)")
        missing += [f"python -m lora_engine.{' '.join(key)} {o}" for o in sorted(options)
                    if not re.search(re.escape(o) + r"(?![\w-])", text)]
    assert not missing, "README.md names options its commands do not have:\n" + "\n".join(missing)


def test_the_option_check_can_fail():
    text = "run `python -m lora_engine.registry promote chat@v3 --stage production --nope` then\n" \
           "python -m lora_engine.train --r 8   # a comment --not-an-option\n| `python -m lora_engine.plan --fit 8GiB` |"
    assert readme_commands(text) == {("registry", "promote"): {"--stage", "--nope"}, ("train",): {"--r"},
                                     ("plan",): {"--fit"}}
