"""Registry references where a path is expected: 'registry:NAME@production' or 'registry:NAME@v3' becomes
the local folder of that version's adapter (or merged model), verified before anything loads it.

What "verified" means is Registry.resolve's: every file of the version against its recorded sha256;
for a stage, the history that gave it the stage (signatures too when $LORA_ENGINE_REGISTRY_KEY names
the key); with the key, the whole history whatever the reference.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from lora_engine.registry.names import PREFIX, RegistryError
from lora_engine.registry.store import Registry


def resolve_ref(ref: str, root: str | os.PathLike | None = None) -> Path:
    """'registry:NAME@production' or 'registry:NAME@v3' -> the verified local folder of that version's adapter
    (or model) in the registry `root` (None: $LORA_ENGINE_REGISTRY, else the default folder)."""
    if not ref.startswith(PREFIX):
        raise RegistryError(f"{ref!r} is not a registry reference (registry:NAME@vN or registry:NAME@STAGE)")
    with Registry(root, create=False) as reg:
        return reg.resolve(ref)


def local_path(value: str | None, root: str | os.PathLike | None = None) -> str | None:
    """A registry reference resolved (and verified) to its local folder in the registry `root`; any other
    value unchanged. For commands with --registry DIR."""
    if isinstance(value, str) and value.startswith(PREFIX):
        return str(resolve_ref(value, root))
    return value


def resolve_fields(cfg, names: tuple[str, ...], root: str | os.PathLike | None = None):
    """The config dataclass `cfg` with each field in `names` that holds a registry reference replaced by its
    verified local folder (local_path); a reference that fails names its flag."""
    out = {}
    for name in names:
        try:
            out[name] = local_path(getattr(cfg, name), root)
        except RegistryError as e:
            raise RegistryError(f"--{name.replace('_', '-')}: {e}") from e
    return dataclasses.replace(cfg, **out)
