"""`python -m lora_engine.registry`: versions of fine-tuned models, promotion, rollback, verification.

    python -m lora_engine.registry publish runs/chat --name chat --note "first try"   # prints chat@v1
    python -m lora_engine.registry promote chat@v1 --stage production --reason "beats v0 on the suite"
    python -m lora_engine.registry rollback chat --stage production --reason "bad answers in prod"
    python -m lora_engine.registry verify                      # every stored hash and history entry
    python -m lora_engine.generate --adapter registry:chat@production --prompt "Hello"

Also: list [NAME], show NAME@REF [--json], diff NAME@A NAME@B, history [NAME], keygen FILE.
The registry folder: --registry DIR, else $LORA_ENGINE_REGISTRY, else $XDG_DATA_HOME/lora_engine/registry
(~/.local/share/lora_engine/registry). With --key-file (or $LORA_ENGINE_REGISTRY_KEY) promotions and
rollbacks are signed, and once one is signed the registry refuses them without the key. The store
itself: lora_engine/io/registry.py.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys

from lora_engine.cli import CliError, add_debug_flag, run_cli
from lora_engine.io import registry as store


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lora_engine.registry", description=__doc__.splitlines()[0])
    # Given before or after the subcommand; after it they must not reset what was given before (SUPPRESS).
    for parser, default in ((ap, None), (common := argparse.ArgumentParser(add_help=False), argparse.SUPPRESS)):
        parser.add_argument("--registry", default=default, help=f"registry folder (default: ${store.ROOT_ENV}, "
                                                                f"else {store.default_root()})")
        parser.add_argument("--key-file", default=default, help=f"registry key (default: ${store.KEY_ENV})")
    add_debug_flag(ap)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("publish", parents=[common], help="store a training run as the next version of NAME")
    p.add_argument("run_dir")
    p.add_argument("--name", required=True)
    p.add_argument("--note", default=None)
    p.add_argument("--artifact", default="adapter", help="the folder inside the run to store (adapter, "
                                                         "adapter-best, or a merged model folder)")
    p = sub.add_parser("list", parents=[common], help="the versions (of NAME) and the stages they hold")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("show", parents=[common], help="one version: files, lineage, evaluation")
    p.add_argument("ref", metavar="NAME@REF")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("diff", parents=[common], help="config, data and evaluation differences of two versions")
    p.add_argument("a", metavar="NAME@A")
    p.add_argument("b", metavar="NAME@B")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("promote", parents=[common], help="make a version hold a stage")
    p.add_argument("ref", metavar="NAME@vN")
    p.add_argument("--stage", required=True, choices=store.STAGES)
    p.add_argument("--force", action="store_true", help="promote even when the regression gate refuses (recorded)")
    p.add_argument("--reason", default=None)
    p.add_argument("--max-regression", type=float, default=store.DEFAULT_MAX_REGRESSION,
                   help="largest allowed drop of the general suite's score, in points")
    p = sub.add_parser("rollback", parents=[common], help="give a stage back to the version it held before")
    p.add_argument("name")
    p.add_argument("--stage", required=True, choices=store.STAGES)
    p.add_argument("--reason", default=None)
    p = sub.add_parser("history", parents=[common], help="every promotion and rollback")
    p.add_argument("name", nargs="?")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("verify", parents=[common], help="recompute every stored hash; exit 1 naming what changed")
    p.add_argument("ref", nargs="?", metavar="NAME[@REF]")
    p = sub.add_parser("keygen", parents=[common], help="write a new registry key (mode 0600) to FILE")
    p.add_argument("file")
    return ap


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
        if b and a:
            lines.append(f"{k} ppl: {b['ppl']:.3f} -> {a['ppl']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    try:
        return _run(a)
    except store.RegistryError as e:
        raise CliError(str(e)) from e
    except sqlite3.DatabaseError as e:
        raise CliError(f"registry {a.registry or store.default_root()}: its database cannot be read ({e})") from e


def _run(a) -> int:  # noqa: C901 (one branch per subcommand)
    if a.cmd == "keygen":
        print(f"wrote {a.file} (key fingerprint {store.keygen(a.file)}); keep it private, pass it as --key-file")
        return 0
    with store.Registry(a.registry, a.key_file, create=a.cmd == "publish") as reg:
        if a.cmd == "publish":
            res = reg.publish(a.run_dir, a.name, a.note, a.artifact)
            print(res["ref"] + (" (already published: the same files)" if res["existing"] else ""))
        elif a.cmd == "list":
            rows = reg.list(a.name)
            print(json.dumps(rows, indent=2) if a.json else
                  _table(rows, ["name", "version", "kind", "stages", "created", "note"]) if rows else
                  f"no versions in {reg.root}")
        elif a.cmd == "show":
            v = reg.show(a.ref)
            print(json.dumps(v, indent=2, default=str) if a.json else _show_text(v))
        elif a.cmd == "diff":
            d = reg.diff(a.a, a.b)
            if a.json:
                print(json.dumps(d, indent=2, default=str))
            else:
                print(f"{d['a']} -> {d['b']}")
                for part in ("config", "base_model", "data", "eval", "files"):
                    for k, (x, y) in d[part].items():
                        print(f"  {part}.{k}: {x!r} -> {y!r}")
        elif a.cmd == "promote":
            e = reg.promote(a.ref, a.stage, a.force, a.reason, a.max_regression)
            gate = e["gate"] or {}
            print(f"{e['name']}@v{e['to']} now holds {e['stage']} (was {'v' + str(e['from']) if e['from'] else 'none'})"
                  + (f"; FORCED past the gate: {gate['message']}" if gate.get("message") else ""))
        elif a.cmd == "rollback":
            e = reg.rollback(a.name, a.stage, a.reason)
            print(f"{e['name']} {e['stage']}: rolled back from v{e['from']} to v{e['to']}")
        elif a.cmd == "history":
            rows = [dict(r, **{"from": f"v{r['from']}" if r["from"] else None, "to": f"v{r['to']}"})
                    for r in reg.history(a.name)]
            print(json.dumps(reg.history(a.name), indent=2) if a.json else
                  _table(rows, ["id", "time", "who", "action", "name", "stage", "from", "to", "forced", "signed",
                                "reason"]) if rows else "no promotions yet")
        elif a.cmd == "verify":
            res = reg.verify(a.ref)
            for note in res["notes"]:
                print(f"note: {note}")
            for p in res["problems"]:
                print(f"FAILED: {p}")
            print(f"{'ok' if res['ok'] else 'FAILED'}: {res['versions']} versions, {res['files']} files, "
                  f"{len(res['problems'])} problems; signatures {res['signatures']}")
            return 0 if res["ok"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
