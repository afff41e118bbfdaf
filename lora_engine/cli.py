"""Command lines from one config dataclass: every field becomes a flag, `--config file.toml` overlays.

Precedence: dataclass defaults < the TOML file < flags given on the command line. Field metadata
may carry `help` and `choices`; booleans get --x / --no-x (BooleanOptionalAction). Field names
use underscores, flags dashes; the TOML file may use either. Validation lives in the dataclass's
__post_init__, so a bad value from either source gets the same message.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the file and key."""


def _base_type(tp):
    """int | None -> (int, optional=True); str -> (str, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("--config", default=None, help="a TOML file of field = value overlaid on the defaults")
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        # default=SUPPRESS so that only flags actually given land in the namespace (they override
        # the TOML file); the real default is shown in the help text instead.
        kw = {"help": f"{f.metadata.get('help', '')} (default: {_default(f)!r})", "default": argparse.SUPPRESS,
              "dest": f.name}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            ap.add_argument(flag, type=tp, metavar=f.name.upper(), **kw)
    return ap


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def load_toml(path: str | Path, cls) -> dict:
    """The fields set in a TOML file, checked against the dataclass (unknown keys and wrong types raise)."""
    path = Path(path)
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(names))}")
        tp, optional = _base_type(hints[name])
        if value is None and optional:
            out[name] = None
            continue
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: {key} must be {tp.__name__}, got {value!r}")
        out[name] = value
    return out


def parse(cls, argv=None, prog: str = "", description: str = ""):
    """(config instance, names set explicitly on the command line)."""
    ap = build_parser(cls, prog, description)
    ns = vars(ap.parse_args(argv))
    config_file = ns.pop("config")
    values = {f.name: _default(f) for f in dataclasses.fields(cls)}
    if config_file:
        values.update(load_toml(config_file, cls))
    values.update(ns)
    try:
        return cls(**values), set(ns)
    except (ValueError, TypeError) as e:
        ap.error(str(e))


def format_config(cfg) -> str:
    """The resolved config, one `name = value` line per field (TOML-like, easy to copy)."""
    d = dataclasses.asdict(cfg)
    w = max(len(k) for k in d)
    return "\n".join(f"  {k:<{w}} = {v!r}" for k, v in d.items())
