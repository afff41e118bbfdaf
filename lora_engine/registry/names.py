"""What the registry's names mean: model names, references (NAME@vN, NAME@STAGE), the folder, the error.

Standard library only, like everything in lora_engine/registry/ but the command.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

PREFIX = "registry:"
STAGES = ("production", "staging")
KEY_ENV = "LORA_ENGINE_REGISTRY_KEY"  # path of the key file
ROOT_ENV = "LORA_ENGINE_REGISTRY"
DEFAULT_MAX_REGRESSION = 2.0  # points of the general suite's score
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class RegistryError(ValueError):
    """A registry operation was refused or its input is wrong; the message says what and what to do."""


def default_root() -> Path:
    """$LORA_ENGINE_REGISTRY, else $XDG_DATA_HOME/lora_engine/registry, else ~/.local/share/lora_engine/registry."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data) / "lora_engine" / "registry"


def content_digest(files: dict[str, str]) -> str:
    """One sha256 over a version's {path: sha256}: what 'the same content' means."""
    return hashlib.sha256("".join(f"{p}\0{s}\n" for p, s in sorted(files.items())).encode()).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RegistryError(f"name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit, "
                            "at most 100)")
    return name


def parse_ref(ref: str) -> tuple[str, str]:
    """'NAME@REF' (or 'registry:NAME@REF') -> (NAME, REF); REF is vN, latest, production or staging."""
    s = ref.removeprefix(PREFIX)
    name, sep, which = s.partition("@")
    if not sep or not which:
        raise RegistryError(f"{ref!r} is not a registry reference; write NAME@vN or NAME@STAGE "
                            f"(e.g. chat@v3, chat@production)")
    check_name(name)
    if not (re.fullmatch(r"v[1-9][0-9]{0,17}", which) or which in (*STAGES, "latest")):
        raise RegistryError(f"{ref!r}: {which!r} is neither a version (v1, v2, ...) nor latest nor a stage "
                            f"({', '.join(STAGES)})")
    return name, which
