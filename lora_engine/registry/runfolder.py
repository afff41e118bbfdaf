"""What a training run folder contributes to a published version: its artifact, config.json, run.json,
metrics.jsonl, a data manifest and the record kept beside them. Nothing here writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from lora_engine.registry.history import who
from lora_engine.registry.names import RegistryError


def read_run(run_dir: Path) -> dict:
    """The run's run.json, checked: a JSON object of a completed run whose `data` is an object."""
    p = run_dir / "run.json"
    if not p.is_file():
        raise RegistryError(f"{run_dir}: no run.json, so it is not a training run folder (pass the --out folder of "
                            "`python -m lora_engine.train`)")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise RegistryError(f"{p}: not valid JSON ({str(e)[:80]})") from e
    if not isinstance(m, dict):
        raise RegistryError(f"{p}: expected a JSON object")
    if m.get("status") != "completed":
        raise RegistryError(f"{run_dir}: the run's status is {m.get('status')!r}; only completed runs are published "
                            "(finish it with --resume)")
    if not isinstance(m.get("data") or {}, dict):
        raise RegistryError(f"{p}: data is {type(m['data']).__name__}, expected an object")
    return m


def sources(run_dir: Path, artifact: str) -> tuple[str, dict[str, Path]]:
    """(kind, {path in the version: source file}): the artifact folder's files and the run's own.

    Symbolic links are listed too, so that storing them is refused by name (objects.open_source)."""
    art = run_dir / artifact
    if art.is_symlink():
        raise RegistryError(f"{art} is a symbolic link; publish stores the folder inside the run, never a link")
    if (art / "adapter_config.json").is_file():
        kind = "adapter"
    elif (art / "config.json").is_file() and any(art.glob("*.safetensors")):
        kind = "model"
    else:
        raise RegistryError(f"{art} is neither an adapter folder (adapter_config.json) nor a model folder "
                            "(config.json and *.safetensors); pass --artifact with the folder inside the run")
    out = {f"{kind}/{p.name}": p for p in sorted(art.iterdir())
           if (p.is_file() or p.is_symlink()) and not p.name.startswith(".")}
    for extra in ("config.json", "run.json", "metrics.jsonl"):
        if (run_dir / extra).is_file() or (run_dir / extra).is_symlink():
            out[extra] = run_dir / extra
    return kind, out


def data_manifest(manifest: dict) -> bytes:
    data = manifest.get("data") or {}
    return json.dumps({"files": data.get("sha256", {}), "stats": {k: v for k, v in data.items() if k != "sha256"}},
                      indent=2, sort_keys=True).encode()


def record(run_dir: Path, manifest: dict, artifact: str) -> dict:
    """What is kept beside the files: where the run was, who published it, and a copy of its lineage
    (the gate and `show` read the lineage from the stored run.json, which the content digest covers)."""
    return {
        "run_dir": str(run_dir.resolve()), "base_model": manifest.get("base_model"), "data": manifest.get("data"),
        "eval": manifest.get("eval"), "config": manifest.get("config"), "git_revision": manifest.get("git_revision"),
        "package_version": manifest.get("package_version"), "resumed_from": manifest.get("resumed_from"),
        "final_step": manifest.get("final_step"), "published_by": who(), "artifact": artifact,
    }
