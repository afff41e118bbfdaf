"""Run lineage: `run.json` in every output folder, and `python -m lora_engine.runs list DIR`.

run.json holds the sha256 of the base weight files and of the data files, the resolved config,
the package version, the git revision (when the code runs from a git checkout), the run it
resumed from, the evaluation results, start and end times, and the final status.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lora_engine.cli import CliError, option, parse_command
from lora_engine.io import atomic
from lora_engine.io.digest import sha256_file

MANIFEST = "run.json"


def hash_files(paths) -> dict[str, str]:
    return {str(p): sha256_file(p) for p in paths}


def model_weight_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("config.json"))


def git_revision() -> str | None:
    """The commit of the source tree this package runs from, '+dirty' when modified; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_manifest(config: dict, base_files: dict, data_files: dict, resumed_from: str | None) -> dict:
    from lora_engine import __version__

    return {
        "status": "running", "started": now(), "ended": None, "config": config,
        "base_model": {"name_or_path": config.get("model"), "sha256": base_files},
        "data": {"sha256": data_files}, "package_version": __version__, "git_revision": git_revision(),
        "resumed_from": resumed_from, "eval": {}, "final_step": None, "error": None,
    }


def write_manifest(out: str | Path, manifest: dict) -> None:
    atomic.write_json(Path(out) / MANIFEST, manifest)


def read_manifest(folder: str | Path) -> dict:
    p = Path(folder) / MANIFEST
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read the run manifest ({e})") from e


def find_runs(root: str | Path) -> list[Path]:
    root = Path(root)
    if (root / MANIFEST).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(MANIFEST) if "checkpoints" not in p.parts)


def _short(h: dict) -> str:
    """First 8 hex digits of each file's sha256; for more than two files, their count and one digest of all."""
    if len(h) > 2:
        return f"{len(h)} files {hashlib.sha256(''.join(sorted(h.values())).encode()).hexdigest()[:8]}"
    return ",".join(v[:8] for v in h.values()) or "-"


def format_runs(root: str | Path) -> str:
    rows = [("run", "status", "started", "steps", "base sha256", "data sha256", "target ppl", "general ppl",
             "resumed from")]
    for run in find_runs(root):
        try:
            m = read_manifest(run)
        except ValueError as e:
            rows.append((str(run), f"unreadable: {e}", "", "", "", "", "", "", ""))
            continue
        ev = m.get("eval") or {}
        after, before = ev.get("after", {}), ev.get("before", {})
        ppl = lambda k, b=before, a=after: (f"{b[k]['ppl']:.2f}->{a[k]['ppl']:.2f}" if k in b and k in a
                                            else f"{b[k]['ppl']:.2f}" if k in b else "-")
        rows.append((str(run), str(m.get("status")), str(m.get("started")), str(m.get("final_step")),
                     _short(m.get("base_model", {}).get("sha256", {})), _short(m.get("data", {}).get("sha256", {})),
                     ppl("target"), ppl("general"), str(m.get("resumed_from") or "-")))
    if len(rows) == 1:
        return f"no runs (no {MANIFEST}) under {root}"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@dataclass
class ListArgs:
    """list the runs under DIR"""

    dir: str = option(help="the folder that holds the runs (searched recursively for run.json)", positional=True)


def main(argv=None):
    _, a, _ = parse_command({"list": ListArgs}, argv, "python -m lora_engine.runs",
                            "List training runs and their lineage.")
    if not Path(a.dir).is_dir():
        raise CliError(f"runs list {a.dir}: no such folder; pass the folder that holds the runs (e.g. runs)")
    print(format_runs(a.dir))
