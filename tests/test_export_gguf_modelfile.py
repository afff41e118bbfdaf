"""The Ollama Modelfile beside a GGUF export: its SYSTEM and TEMPLATE render prompts as training did.

Oracle: our chat-template renderer (models/tokenizer.py, itself checked against transformers) on one
side; on the other, the Modelfile executed as Ollama executes it: SYSTEM becomes the first message
when a request has none, then TEMPLATE (a Go template) runs over the messages. `run_go_template`
below implements the part of Go's text/template our templates use (range over .Messages, .Role,
.Content, if/else if eq, and the {{- trim marker); anything else fails the test.
"""

from __future__ import annotations

import re
import warnings

import pytest

from lora_engine.deploy.gguf import default_system_prompt, modelfile_text
from lora_engine.models.tokenizer import Tokenizer
from tests.test_export_gguf import CHATML, add_tokenizer

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LLAMA3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
          "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
          "<|end_header_id|>\n\n' }}{% endif %}")
DEFAULT_SYSTEM = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Tiny.<|im_end|>\n' }}"
                  "{% endif %}" + CHATML)
CONVERSATIONS = [
    [{"role": "user", "content": "Who are you?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Salut"}, {"role": "user", "content": "Ca va?"}],
]


def run_go_template(template: str, messages: list[dict]) -> str:
    """Execute an Ollama TEMPLATE over `messages` (Go text/template, the subset our templates use)."""
    parts = re.split(r"({{-?\s*.*?\s*-?}})", template)
    out: list[str] = []

    def emit(i, scope, active):
        while i < len(parts):
            tok = parts[i]
            m = re.fullmatch(r"{{(-?)\s*(.*?)\s*(-?)}}", tok)
            if not m:
                if active:
                    out.append(tok)
                i += 1
                continue
            if m.group(1) and active and out:  # {{- trims the whitespace before it
                out[-1] = out[-1].rstrip()
            action = m.group(2)
            if action == "range .Messages":
                end = emit(i + 1, None, False)  # where the range ends
                for msg in messages if active else []:
                    emit(i + 1, msg, True)
                i = end
            elif action in (".Role", ".Content"):
                if active:
                    out.append(scope[action[1:].lower()])
                i += 1
            elif action.startswith(("if eq .Role", "else if eq .Role")):
                raise AssertionError(f"run_go_template: {action!r} is not implemented here")
            elif action == "end":
                return i + 1
            else:
                raise AssertionError(f"run_go_template: unknown action {action!r}")
        return i

    emit(0, None, True)
    return "".join(out)


def ollama_prompt(modelfile: str, messages: list[dict]) -> str:
    """The prompt Ollama builds from a Modelfile for a chat request."""
    template = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M).group(1)
    system = re.search(r'^SYSTEM """(.*?)"""$', modelfile, re.S | re.M)
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system.group(1)}, *messages]
    return run_go_template(template, messages)


def folder_with(tmp_path, template):
    folder = add_tokenizer(tmp_path / "tok")
    (folder / "chat_template.jinja").write_text(template)
    return folder


@pytest.mark.parametrize("template, system", [(CHATML, None), (LLAMA3, None), (DEFAULT_SYSTEM, "You are Tiny.")])
def test_modelfile_renders_as_the_chat_template(tmp_path, template, system):
    folder = folder_with(tmp_path, template)
    assert default_system_prompt(folder) == system
    text = modelfile_text("m.gguf", template, "<|im_end|>", default_system_prompt(folder))
    assert ("SYSTEM" in text) == (system is not None)
    tok = Tokenizer(folder)
    for messages in CONVERSATIONS:
        assert ollama_prompt(text, messages) == tok.apply_chat_template(messages, add_generation_prompt=True)


def test_embedded_model_keeps_its_system_prompt(embedded_dir):
    """SmolLM2's template adds its own system prompt; without it Ollama's prompts (and answers) differ."""
    system = default_system_prompt(embedded_dir)
    assert system == SMOL_SYSTEM
    tok = Tokenizer(embedded_dir)
    text = modelfile_text("smol.gguf", tok.chat_template, "<|im_end|>", system)
    assert f'SYSTEM """{SMOL_SYSTEM}"""' in text
    for messages in CONVERSATIONS:
        assert ollama_prompt(text, messages) == tok.apply_chat_template(messages, add_generation_prompt=True)


def test_templates_without_a_system_turn(tmp_path):
    # a template that writes no system turn, and one that refuses system messages, have no default
    assert default_system_prompt(folder_with(tmp_path, "{% for m in messages %}{{ m.content }}{% endfor %}")) is None
    refusing = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                + CHATML)
    (tmp_path / "tok" / "chat_template.jinja").write_text(refusing)
    assert default_system_prompt(tmp_path / "tok") is None


def test_a_system_prompt_a_modelfile_cannot_quote_is_left_out():
    with pytest.warns(UserWarning, match='system prompt holds """, which a Modelfile cannot quote'):
        text = modelfile_text("m.gguf", CHATML, "<|im_end|>", 'Say """hi"""')
    assert "SYSTEM" not in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert 'SYSTEM """Be brief."""' in modelfile_text("m.gguf", CHATML, "<|im_end|>", "Be brief.")

