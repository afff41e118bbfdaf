"""What every benchmark records beside its numbers: machine, versions, git revision, date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return rev.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux) with its family and model numbers, which tell
    apart CPUs that a virtual machine names alike (a 2-core "AMD EPYC" was a Zen 4, family 25, on
    one day and a Zen 5, family 26, on another); else platform.processor() (may be "")."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor()
    if name and "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine() -> dict:
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git_revision(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "absent"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def header_lines(info: dict) -> list[str]:
    return [f"- {k}: {v}" for k, v in info.items()]


def markdown_table(rows: list[dict], float_format: str = ".3g") -> list[str]:
    """Rows of equal keys -> the lines of a markdown table; floats with `float_format`."""
    if not rows:
        return ["(not run)"]
    keys = list(rows[0])
    fmt = lambda v: format(v, float_format) if isinstance(v, float) else str(v)  # noqa: E731
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + [
        "| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
