"""Command lines from one config dataclass: every field becomes a flag, `--config file.toml` (or .yaml) overlays.

Precedence: dataclass defaults < the config file (TOML, or YAML by its .yaml/.yml extension) < flags given
on the command line; `to_yaml` writes a resolved config back as a YAML file that `--config` takes. Field metadata
(see `option`) may carry `help`, `choices`, `positional` (an argument, not a flag) and `required`;
booleans get --x / --no-x (BooleanOptionalAction). Field names use underscores, flags dashes; the
config file may use either. Validation lives in the dataclass's __post_init__, so a bad value from
either source gets the same message. `parse` reads one command line, `parse_command` one with
subcommands (`runs list DIR`); `option_like` declares a field with another dataclass's default and
help, so two commands share one declaration of a setting.

Every command runs as `sys.exit(run_cli(main))`, and its exit status tells a scheduler what happened:

    0    finished (EXIT_OK)
    1    a bug: an unexpected exception, shown with its traceback (EXIT_BUG)
    2    bad input: one line `error: ...` on stderr (EXIT_USER_ERROR); a flag, a file, a folder, a
         chat template the sandbox refused, an output path that holds someone else's files, a full
         or read-only disk. `--debug` shows the traceback of input errors too.
    130  interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: 128 + the signal's number, as a shell
         reports a process the signal ended (EXIT_INTERRUPTED, EXIT_TERMINATED, interrupted_status).
         A command that stops cleanly on a signal (train saves a checkpoint first) returns
         interrupted_status(signal) itself; elsewhere run_cli turns the signal into the status,
         after the writes under way have removed their temporaries.

The library speaks through `logging` (loggers under "lora_engine"); a command shows those
messages as plain lines with `log_to` (a command's own results it prints).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import re
import signal
import sys
import threading
import types
import typing
from pathlib import Path

# Exit statuses (see the module docstring): 2 is argparse's for bad usage, and bad input is bad usage
# found a little later; 128 + N is what a shell reports for a process that signal N ended.
EXIT_OK = 0
EXIT_BUG = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
DEBUG_FLAG = "--debug"


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the file and key."""


class CliError(ValueError):
    """Something the user gave a command line is wrong; the message says what, where and what to do."""


# OSErrors a user's path causes; their message names the path. Other OSErrors (a full disk, say)
# are not the user's input and keep their traceback.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)


# The engine's own input errors, by module, so that reporting one imports nothing (loading imports torch).
_ENGINE_ERRORS = (("lora_engine.data.formats", "DataError"), ("lora_engine.io.safetensors", "CheckpointError"),
                  ("lora_engine.train.checkpoint", "ResumeError"), ("lora_engine.io.atomic", "OutputError"),
                  ("lora_engine.registry.names", "RegistryError"),
                  ("lora_engine.train.distributed", "DistributedError"))


class Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt for SIGINT, so that writes clean up."""


def interrupted_status(sig: int | str) -> int:
    """The exit status for a command stopped by signal `sig` (a number or a name like "SIGTERM"): 128 + N."""
    return 128 + int(signal.Signals[sig] if isinstance(sig, str) else signal.Signals(sig))


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input, not a bug: each is raised only with a message for the user.

    An engine error type is looked up only if its module was imported: if it was not, nothing raised one.
    """
    engine = [getattr(sys.modules[m], name, None) for m, name in _ENGINE_ERRORS if m in sys.modules]
    return (CliError, ConfigError, *[t for t in engine if t is not None], *_PATH_ERRORS)


def _disk_message(e: BaseException) -> str | None:
    """One line for an OSError of a full or read-only disk (not the user's input, but not a bug either)."""
    if not isinstance(e, OSError):
        return None
    from lora_engine.io.atomic import disk_error

    disk = disk_error(e, Path(e.filename or "."))
    return str(disk) if disk is not None else None


@contextlib.contextmanager
def user_input(where: str):
    """Treat a ValueError or path error raised inside as a problem of the input `where` (a flag, a file).

    For calls that read what the user named, whose ValueErrors are documented as "this file is not
    valid" (load_model, load_adapter, convert_gguf...). Elsewhere a ValueError stays a bug.
    """
    try:
        yield
    except CliError:
        raise
    except (ValueError, *_PATH_ERRORS) as e:
        raise CliError(f"{where}: {e}" if where else str(e)) from e


# Byte units of parse_size: decimal (KB = 10**3) and binary (KiB = 2**10), as transformers and the
# memory plan spell them; a bare number is bytes.
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str, what: str = "size") -> int:
    """A byte count as a user writes it -> bytes: 5000000, "5000000", "500MB" (10**6), "24GiB" (2**30),
    "1.5gb" (units in any case, a space allowed before the unit). ValueError naming `what` (a flag,
    an argument) for anything else, zero and negative sizes included."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", size) if isinstance(size, str) else None
    unit = m.group(2).lower() if m else None
    if m is None or unit not in SIZE_UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"{what} {size!r} is not a size; write a positive byte count or a number with a unit, "
                         "e.g. 24GiB, 6GB or 512MiB (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    return int(float(m.group(1)) * SIZE_UNITS[unit])


# The one dtype vocabulary of the command lines (--precision, --dtype, --gguf-type): the short names,
# with torch's and config.json's (float32, ...) and GGUF's (f32, f16) accepted as aliases.
DTYPES = ("fp32", "bf16", "fp16")
DTYPE_ALIASES = {"float32": "fp32", "f32": "fp32", "bfloat16": "bf16", "float16": "fp16", "f16": "fp16"}
TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # a short name -> torch's


def parse_dtype(value: str, flag: str, others: tuple[str, ...] = ()) -> str:
    """A dtype as a user spells it -> its short name: "bfloat16", "BF16" -> "bf16"; "float32", "f32" ->
    "fp32". `others` are the flag's other values (auto, q8_0, ...), returned as given (lower case).
    ValueError naming the flag and the accepted spellings otherwise."""
    v = value.strip().lower() if isinstance(value, str) else value
    if v in DTYPES or v in others:
        return v
    if v in DTYPE_ALIASES:
        return DTYPE_ALIASES[v]
    names = ", ".join(dict.fromkeys((*others, *DTYPES)))
    raise ValueError(f"{flag} must be one of {names} (or float32, bfloat16, float16, f32, f16), got {value!r}")


def add_debug_flag(ap: argparse.ArgumentParser) -> None:
    """List --debug in --help (run_cli takes it off the command line before the parser sees it)."""
    ap.add_argument(DEBUG_FLAG, action="store_true", default=argparse.SUPPRESS,
                    help="on an input error, show the Python traceback too (for bug reports)")


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run `main(argv)` as a command: its exit status, with input errors reported as `error: ...`.

    main may return an int (the exit status) or anything else (status 0). Input errors (see
    user_errors) and OSErrors of a full or read-only disk print one line on stderr and give status 2;
    with --debug they are re-raised. SIGINT (Ctrl-C) gives status 130 and SIGTERM 143, without a
    traceback. Every other exception propagates: it is a bug (status 1).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:end]
    argv = [a for i, a in enumerate(argv) if not (i < end and a == DEBUG_FLAG)]
    try:
        with _sigterm_raises():
            rc = main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as e:
        disk = _disk_message(e)
        if debug or not (isinstance(e, user_errors()) or disk):
            raise
        print(f"error: {_one_line(disk or str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else EXIT_OK


@contextlib.contextmanager
def _sigterm_raises():
    """While a command runs, SIGTERM raises Terminated (Python's default would end the process at once,
    leaving the temporaries of a write under way). Only the main thread may set a handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise Terminated

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _one_line(msg: str) -> str:
    """A multi-line message (a list of problems) joined so that the report stays one line."""
    out = ""
    for line in (x.strip().removeprefix("- ") for x in msg.splitlines()):
        if line:
            sep = "" if not out else " " if out.endswith(":") else "; "
            out += sep + line
    return out


def _base_type(tp):
    """int | None -> (int, optional=True); str -> (str, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def option(default=dataclasses.MISSING, help: str = "", **meta):
    """A dataclass field that becomes a command-line option: `x: int = option(3, "what x is")`.

    meta: choices=[...]; positional=True (an argument given by position, no default needed);
    required=True (a flag that must be given); aliases=["--other-name", ...] (more spellings of the flag).
    """
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def option_like(cls, name: str, **meta):
    """The field `name` of dataclass `cls` (default, help, choices) for another dataclass, `meta` overriding.

    So a setting two commands share is declared once: eval's --max-length is TrainConfig's.
    """
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        raise AttributeError(f"option_like: {cls.__name__} has no field {name!r}")
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata={**f.metadata, **meta})
    return dataclasses.field(default=f.default, metadata={**f.metadata, **meta})


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=description)
    add_debug_flag(ap)
    _add_fields(ap, cls)
    return ap


def _add_fields(ap: argparse.ArgumentParser, cls) -> None:
    """--config, then one argument per field of `cls`."""
    hints = typing.get_type_hints(cls)
    ap.add_argument("--config", default=None, help="a TOML file (name = value) or YAML file (.yaml/.yml, "
                                                  "name: value) overlaid on the defaults; flags override it")
    for f in dataclasses.fields(cls):
        tp, _ = _base_type(hints[f.name])
        help_ = f.metadata.get("help", "")
        kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
        if f.metadata.get("positional"):
            # A positional with a default may be left out (`registry list [NAME]`).
            if f.default is not dataclasses.MISSING:
                kw.update(nargs="?", default=f.default)
            ap.add_argument(f.name, type=tp, help=help_, **kw)
            continue
        flag = "--" + f.name.replace("_", "-")
        # default=SUPPRESS so that only flags actually given land in the namespace (they override
        # the TOML file); the real default is shown in the help text instead.
        required = bool(f.metadata.get("required"))
        shown = required or "default" in help_  # the help says it already, in words
        kw.update(help=help_ if shown else f"{help_} (default: {_default(f)!r})", default=argparse.SUPPRESS,
                  dest=f.name, required=required)
        flags = [flag, *f.metadata.get("aliases", ())]
        if tp is bool:
            ap.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is tuple:  # tuple[str, ...]: a flag given once per value
            ap.add_argument(*flags, action="append", type=typing.get_args(tp)[0], metavar=f.name.upper(), **kw)
        else:
            ap.add_argument(*flags, type=tp, metavar=f.name.upper(), **kw)


def _default(f):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


YAML_SUFFIXES = (".yaml", ".yml")


def load_config(path: str | Path, cls) -> dict:
    """The fields set in a config file, checked against the dataclass (unknown keys and wrong types raise):
    YAML (one mapping of name: value) by a .yaml/.yml extension, else TOML (name = value)."""
    path = Path(path)
    yaml = path.suffix.lower() in YAML_SUFFIXES
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; pass the path of a TOML file of name = value lines "
                          "or a .yaml file of name: value lines")
    text = path.read_text(encoding="utf-8")
    if yaml:
        import yaml as pyyaml

        try:
            raw = pyyaml.safe_load(text)
        except pyyaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {_one_line(str(e))}") from e
        raw = {} if raw is None else raw  # an empty file sets nothing
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config file is one mapping of name: value lines, got a {type(raw).__name__}")
    else:
        if sys.version_info >= (3, 11):
            import tomllib
        else:
            import tomli as tomllib
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from e
    return _checked(path, raw, cls, yaml)


def _checked(path: Path, raw: dict, cls, yaml: bool = False) -> dict:
    """The file's settings by field name; unknown keys and values of the wrong type raise ConfigError naming both."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(names))}")
        tp, optional = _base_type(hints[name])
        if value is None and optional:
            out[name] = None
            continue
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if yaml and tp is float and isinstance(value, str):
            # YAML 1.1 (PyYAML) reads 1e-3, without a dot, as a string: take it as the number it spells.
            with contextlib.suppress(ValueError):
                value = float(value)
        if typing.get_origin(tp) is tuple:  # a repeatable flag: a list of its values
            item = typing.get_args(tp)[0]
            if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
                raise ConfigError(f"{path}: {key} must be a list of {item.__name__}, got {value!r}")
            value, tp = tuple(value), tuple
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{path}: {key} must be {tp.__name__}, got {value!r}")
        out[name] = value
    return out


def to_yaml(cfg) -> str:
    """A resolved config as a YAML file of name: value lines, in field order, that `--config` reads back."""
    import yaml

    d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)


def parse(cls, argv=None, prog: str = "", description: str = ""):
    """(config instance, names set explicitly on the command line)."""
    ap = build_parser(cls, prog, description)
    return _config(ap, cls, vars(ap.parse_args(argv)))


def parse_command(commands: dict[str, type], argv=None, prog: str = "", description: str = ""):
    """(subcommand, config instance, names set explicitly) for `prog SUBCOMMAND ...`, one dataclass a subcommand.

    A subcommand's help is the first line of its dataclass's docstring.
    """
    ap = argparse.ArgumentParser(prog=prog, description=description)
    add_debug_flag(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    parsers = {}
    for name, cls in commands.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        parsers[name] = sub.add_parser(name, help=doc, description=doc)
        _add_fields(parsers[name], cls)
    ns = vars(ap.parse_args(argv))
    name = ns.pop("cmd")
    cfg, explicit = _config(parsers[name], commands[name], ns)
    return name, cfg, explicit


def _config(ap: argparse.ArgumentParser, cls, ns: dict):
    config_file = ns.pop("config")
    ns.pop("debug", None)
    values = {f.name: _default(f) for f in dataclasses.fields(cls)}
    given = set(ns)
    if config_file:
        from_file = load_config(config_file, cls)
        values.update(from_file)
        given |= set(from_file)
    values.update(ns)
    # A config class that takes `given` (an InitVar: TrainConfig) learns which fields the user set, file or flag.
    extra = {"given": frozenset(given)} if "given" in getattr(cls, "__dataclass_fields__", {}) else {}
    try:
        return cls(**values, **extra), set(ns)
    except (ValueError, TypeError) as e:
        ap.error(str(e))


@contextlib.contextmanager
def log_to(stream_name: str = "stderr", level: int = logging.INFO):
    """While a command runs, show the engine's log messages (logger "lora_engine") as plain lines.

    stream_name: "stdout" or "stderr", looked up when the command starts (so a captured or
    redirected stream is the one written to). The handler and level are removed afterwards.
    """
    if stream_name not in ("stdout", "stderr"):
        raise ValueError(f"log_to: stream_name must be 'stdout' or 'stderr', got {stream_name!r}")
    logger = logging.getLogger("lora_engine")
    handler = logging.StreamHandler(getattr(sys, stream_name))
    handler.setFormatter(logging.Formatter("%(message)s"))
    old_level = logger.level
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > level:
        logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def logs_to(stream_name: str = "stderr"):
    """Decorator form of log_to for a command's `main(argv)`."""
    def wrap(main):
        @functools.wraps(main)
        def command(argv=None):
            with log_to(stream_name):
                return main(argv)
        return command
    return wrap


def format_config(cfg) -> str:
    """The resolved config, one `name = value` line per field (TOML-like, easy to copy)."""
    d = dataclasses.asdict(cfg)
    w = max(len(k) for k in d)
    return "\n".join(f"  {k:<{w}} = {v!r}" for k, v in d.items())
