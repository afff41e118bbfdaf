"""`python -m lora_engine.registry`: versions of fine-tuned models, promotion, rollback, verification.

    python -m lora_engine.registry publish runs/chat --name chat --note "first try"   # prints chat@v1
    python -m lora_engine.registry promote chat@v1 --stage production --reason "beats v0 on the suite"
    python -m lora_engine.registry rollback chat --stage production --reason "bad answers in prod"
    python -m lora_engine.registry verify                      # every stored hash and history entry
    python -m lora_engine.generate --adapter registry:chat@production --prompt "Hello"

Also: list [NAME], show NAME@REF [--json], diff NAME@A NAME@B, history [NAME], keygen FILE, sign.
publish, promote and rollback with --mlflow-register mirror the version and the stage (an alias) into MLflow's
model registry (registry/mlflow_link.py); this registry stays the source of truth.
The registry folder: --registry DIR, else $LORA_ENGINE_REGISTRY, else $XDG_DATA_HOME/lora_engine/registry
(~/.local/share/lora_engine/registry). With --key-file (or $LORA_ENGINE_REGISTRY_KEY) the history is
signed; once a registry has adopted its key (its first keyed write, or `sign` for an older registry)
promotions and rollbacks are refused without it. Every subcommand's options come from its dataclass
below (lora_engine/cli.py); --registry and --key-file may also come before the subcommand. The store
itself: lora_engine/registry/store.py.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
from dataclasses import dataclass

from lora_engine.cli import CliError, option, parse_command
from lora_engine.registry import mlflow_link
from lora_engine.registry.keys import keygen
from lora_engine.registry.names import DEFAULT_MAX_REGRESSION, KEY_ENV, ROOT_ENV, STAGES, RegistryError
from lora_engine.registry.store import Registry

_GLOBAL = ("--registry", "--key-file")


@dataclass(kw_only=True)
class _Where:
    registry: str | None = option(None, f"registry folder (default: ${ROOT_ENV}, else "
                                        "$XDG_DATA_HOME/lora_engine/registry or ~/.local/share/lora_engine/registry)")
    key_file: str | None = option(None, f"registry key (default: ${KEY_ENV})")


@dataclass(kw_only=True)
class _MLflow:
    mlflow_register: bool = option(False, "also register the version in MLflow's model registry (publish), or move "
                                          "the MLflow alias named after the stage (promote, rollback); our "
                                          "registry stays the source of truth")
    mlflow_model: str | None = option(None, "the registered model's name in MLflow (default: the name here)")
    mlflow_tracking_uri: str | None = option(None, "MLflow tracking URI for --mlflow-register, e.g. "
                                                   "sqlite:///mlflow.db (default: $MLFLOW_TRACKING_URI)")


@dataclass
class Publish(_Where, _MLflow):
    """store a training run as the next version of NAME"""

    run_dir: str = option(help="the run folder (train's --out)", positional=True)
    name: str = option(help="the model's name in the registry", required=True)
    note: str | None = option(None, "a note shown by list and show")
    artifact: str = option("adapter", "the folder inside the run to store (adapter, adapter-best, or a merged "
                                      "model folder)")


@dataclass
class List(_Where):
    """the versions (of NAME) and the stages they hold"""

    name: str | None = option(None, "one model (default: all)", positional=True)
    json: bool = option(False, "print JSON")


@dataclass
class Show(_Where):
    """one version: files, lineage, evaluation"""

    ref: str = option(help="NAME@REF: NAME@vN, NAME@latest or NAME@STAGE", positional=True)
    json: bool = option(False, "print JSON")


@dataclass
class Diff(_Where):
    """config, data and evaluation differences of two versions"""

    a: str = option(help="NAME@A", positional=True)
    b: str = option(help="NAME@B", positional=True)
    json: bool = option(False, "print JSON")


@dataclass
class Promote(_Where, _MLflow):
    """make a version hold a stage"""

    ref: str = option(help="NAME@vN (or any NAME@REF)", positional=True)
    stage: str = option(help="the stage", required=True, choices=STAGES)
    force: bool = option(False, "promote even when the regression gate refuses (recorded)")
    reason: str | None = option(None, "why (recorded in the history)")
    max_regression: float = option(DEFAULT_MAX_REGRESSION, "largest allowed drop of the general suite's score, in "
                                                           "points")

    def __post_init__(self):
        if not (math.isfinite(self.max_regression) and self.max_regression >= 0):
            raise ValueError(f"--max-regression must be a finite number >= 0, got {self.max_regression}")


@dataclass
class Rollback(_Where, _MLflow):
    """give a stage back to the version it held before"""

    name: str = option(help="the model", positional=True)
    stage: str = option(help="the stage", required=True, choices=STAGES)
    reason: str | None = option(None, "why (recorded in the history)")


@dataclass
class History(_Where):
    """every promotion, rollback and key adoption"""

    name: str | None = option(None, "one model (default: all)", positional=True)
    json: bool = option(False, "print JSON")


@dataclass
class Verify(_Where):
    """recompute every stored hash and check the history; exit 1 naming what changed"""

    ref: str | None = option(None, "NAME or NAME@REF (default: everything)", positional=True)


@dataclass
class Keygen(_Where):
    """write a new registry key (mode 0600) to FILE"""

    file: str = option(help="where to write it (never over an existing file)", positional=True)


@dataclass
class Sign(_Where):
    """adopt the key for a registry whose history predates it (check `history` first: this attests it)"""

    reason: str | None = option(None, "why (recorded in the history)")


COMMANDS = {"publish": Publish, "list": List, "show": Show, "diff": Diff, "promote": Promote, "rollback": Rollback,
            "history": History, "verify": Verify, "keygen": Keygen, "sign": Sign}


def _hoist(argv: list[str]) -> list[str]:
    """--registry and --key-file given before the subcommand, moved after it (where its parser reads them)."""
    i, front = 0, []
    while i < len(argv) and argv[i].split("=")[0] in _GLOBAL:
        n = 1 if "=" in argv[i] else 2
        front += argv[i:i + n]
        i += n
    return argv[i:i + 1] + front + argv[i + 1:]


def _table(rows: list[dict], cols: list[str]) -> str:
    cells = [cols] + [["-" if r.get(c) in (None, [], "") else
                       ",".join(map(str, r[c])) if isinstance(r[c], list) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def _show_text(v: dict) -> str:
    lin = v["lineage"]
    lines = [f"{v['ref']}  {v['kind']}  stages: {', '.join(v['stages']) or '-'}  created {v['created']}",
             f"note: {v['note'] or '-'}", f"parent: {'v' + str(lin['parent']) if lin['parent'] else '-'}  run: "
             f"{lin['run_dir']}  git: {lin['git_revision'] or '-'}", f"folder: {v['path']}", "files:"]
    lines += [f"  {sha}  {path}" for path, sha in v["sha256"].items()]
    base = (lin.get("base_model") or {})
    lines.append(f"base model: {base.get('name_or_path')}")
    lines += [f"  {sha}  {path}" for path, sha in (base.get("sha256") or {}).items()]
    lines.append("data:")
    lines += [f"  {sha}  {path}" for path, sha in ((lin.get("data") or {}).get("sha256") or {}).items()]
    ev = v.get("eval") or {}
    for k in ("target", "general"):
        b, a = (ev.get("before") or {}).get(k), (ev.get("after") or {}).get(k)
        if isinstance(b, dict) and isinstance(a, dict) and "ppl" in b and "ppl" in a:
            lines.append(f"{k} ppl: {b['ppl']:.3f} -> {a['ppl']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = _hoist(list(sys.argv[1:] if argv is None else argv))
    cmd, a, _ = parse_command(COMMANDS, argv, "python -m lora_engine.registry", __doc__.splitlines()[0])
    try:
        return _run(cmd, a)
    except RegistryError as e:
        raise CliError(str(e)) from e
    except sqlite3.DatabaseError as e:  # the store names the row or table; this is the last net
        raise CliError(f"registry {a.registry or 'folder'}: its database cannot be read ({e})") from e


def _mirror(a, reg, ref: str, act) -> None:
    """After our registry committed `ref`: act(show(ref), model) in MLflow, printing its line; an MLflow failure
    is one line saying our registry holds the change (mlflow_link.failed), never an undo of it."""
    shown = reg.show(ref)
    model = a.mlflow_model or shown["name"]
    try:
        print(act(shown, model))
    except mlflow_link.errors() as e:
        raise mlflow_link.failed(ref, reg.root, a.mlflow_tracking_uri, e) from e


def _mirror_stage(a, reg, e: dict, mlflow) -> None:
    _mirror(a, reg, f"{e['name']}@v{e['to']}", lambda shown, model: f"MLflow: {model} alias {e['stage']} -> "
            f"version {mlflow_link.set_alias(mlflow, model, e['stage'], shown)}")


def _run(cmd: str, a) -> int:  # noqa: C901 (one branch per subcommand)
    if cmd == "keygen":
        print(f"wrote {a.file} (key fingerprint {keygen(a.file)}); keep it private, pass it as --key-file")
        return 0
    mlflow = mlflow_link.client(a.mlflow_tracking_uri) if getattr(a, "mlflow_register", False) else None
    with Registry(a.registry, a.key_file, create=cmd == "publish") as reg:
        if cmd == "publish":
            res = reg.publish(a.run_dir, a.name, a.note, a.artifact)
            print(res["ref"] + (" (already published: the same files)" if res["existing"] else ""))
            if mlflow is not None:
                _mirror(a, reg, res["ref"], lambda shown, model: f"MLflow: {model} version "
                        f"{mlflow_link.register(mlflow, model, shown)[0]}")
        elif cmd == "list":
            rows = reg.list(a.name)
            print(json.dumps(rows, indent=2) if a.json else
                  _table(rows, ["name", "version", "kind", "stages", "created", "note"]) if rows else
                  f"no versions in {reg.root}")
        elif cmd == "show":
            v = reg.show(a.ref)
            print(json.dumps(v, indent=2, default=str) if a.json else _show_text(v))
        elif cmd == "diff":
            d = reg.diff(a.a, a.b)
            if a.json:
                print(json.dumps(d, indent=2, default=str))
            else:
                print(f"{d['a']} -> {d['b']}")
                for part in ("config", "base_model", "data", "eval", "files"):
                    for k, (x, y) in d[part].items():
                        print(f"  {part}.{k}: {x!r} -> {y!r}")
        elif cmd == "promote":
            e = reg.promote(a.ref, a.stage, a.force, a.reason, a.max_regression)
            gate = e["gate"] or {}
            print(f"{e['name']}@v{e['to']} now holds {e['stage']} (was {'v' + str(e['from']) if e['from'] else 'none'})"
                  + (f"; FORCED past the gate: {gate['message']}" if gate.get("message") else ""))
            if mlflow is not None:
                _mirror_stage(a, reg, e, mlflow)
        elif cmd == "rollback":
            e = reg.rollback(a.name, a.stage, a.reason)
            print(f"{e['name']} {e['stage']}: rolled back from v{e['from']} to v{e['to']}")
            if mlflow is not None:
                _mirror_stage(a, reg, e, mlflow)
        elif cmd == "sign":
            e = reg.sign(a.reason)
            print(f"history entry {e['id']}: the registry adopts key {e['key']}, attesting the {e['id'] - 1} "
                  "entries before it")
        elif cmd == "history":
            hist = reg.history(a.name)
            rows = [dict(r, **{k: f"v{r[k]}" if r[k] else None for k in ("from", "to")}) for r in hist]
            print(json.dumps(hist, indent=2) if a.json else
                  _table(rows, ["id", "time", "who", "action", "name", "stage", "from", "to", "forced", "signed",
                                "reason"]) if rows else "no promotions yet")
        elif cmd == "verify":
            res = reg.verify(a.ref)
            for note in res["notes"]:
                print(f"note: {note}")
            for p in res["problems"]:
                print(f"FAILED: {p}")
            print(f"{'ok' if res['ok'] else 'FAILED'}: {res['versions']} versions, {res['files']} files, "
                  f"{len(res['problems'])} problems; signatures {res['signatures']}")
            return 0 if res["ok"] else 1
    return 0
