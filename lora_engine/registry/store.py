"""The model registry's store: versions of fine-tuned adapters (or merged models), promotion and rollback.

A registry is a folder:

  registry.db            SQLite (WAL): versions, their files, the history of promotions
  objects/ab/abcd...     every stored file once, named by its sha256, read-only (objects.py)
  versions/NAME/vN/...   each version's files under their own names: hard links into objects/
                         (copies where the filesystem has no hard links)

Every change is one transaction begun with BEGIN IMMEDIATE: the write lock is taken first, so two
processes publishing at once queue behind the busy timeout instead of both reading "the last version
is v3" and both writing v4. Files are stored before the transaction (a crash leaves an unreferenced
object, never a version without its files), and a version's folder gets its name after the commit.

The history (history.py) is a hash chain of promotions and rollbacks, signed with the registry key
when one is configured; stages are replayed from it, and a stage reference resolves only through a
history that verifies. Rows are read through rows.py: a damaged row is a RegistryError naming it.

Threat model: the key (a file only its owner may read) stops someone who can write the registry but
does not hold the key from promoting, or from editing, deleting or re-signing the history unnoticed
by anyone who checks with the key (`verify`, `promote`, and `resolve` when $LORA_ENGINE_REGISTRY_KEY
is set). It cannot stop the key's holder, nor someone who deletes the newest entries together (keep
a copy of `history` elsewhere for that), and SQLite's locking needs a local filesystem, not NFS.

Everything here returns plain data (dicts, lists, paths); the command line is lora_engine/registry/command.py.
Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path

from lora_engine.registry import checks, history, objects, rows, runfolder
from lora_engine.registry.keys import fingerprint, read_key
from lora_engine.registry.names import (
    DEFAULT_MAX_REGRESSION,
    KEY_ENV,
    ROOT_ENV,
    STAGES,
    RegistryError,
    check_name,
    content_digest,
    default_root,
    parse_ref,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    name TEXT NOT NULL, version INTEGER NOT NULL, kind TEXT NOT NULL, content TEXT NOT NULL,
    created TEXT NOT NULL, note TEXT, parent INTEGER, record TEXT NOT NULL,
    PRIMARY KEY (name, version), UNIQUE (name, content));
CREATE TABLE IF NOT EXISTS files (
    name TEXT NOT NULL, version INTEGER NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    PRIMARY KEY (name, version, path));
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY, body TEXT NOT NULL, digest TEXT NOT NULL, signature TEXT);
"""
_VERSIONS, _FILES = "registry.db, table versions", "registry.db, table files"


class Registry:
    """One registry folder. `key_file` (default: the file named by $LORA_ENGINE_REGISTRY_KEY) signs
    the history and lets verify, promote, rollback and resolve check its signatures."""

    def __init__(self, root: str | os.PathLike | None = None, key_file: str | os.PathLike | None = None,
                 create: bool = True):
        self.root = Path(root) if root is not None else default_root()
        key_file = key_file or os.environ.get(KEY_ENV) or None
        self.key = read_key(key_file) if key_file else None
        if not (self.root / "registry.db").is_file():
            if not create:
                raise RegistryError(f"no registry at {self.root} (no registry.db); publish a run first, or pass "
                                    f"--registry DIR (default: ${ROOT_ENV} or {default_root()})")
            self.root.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.root / "registry.db", timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        try:
            self._open()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise RegistryError(f"{self.root / 'registry.db'}: the registry's database cannot be read ({e})") from e

    def _open(self):
        # Switching a new database to WAL needs an exclusive lock that the busy timeout does not wait for
        # (several processes creating the registry at once): retry for as long as that timeout would.
        deadline = time.monotonic() + 60
        while True:
            try:
                self.db.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.db.execute("PRAGMA synchronous=FULL")
        with self._tx():
            for statement in _SCHEMA.split(";"):  # not executescript: it would COMMIT first
                if statement.strip():
                    self.db.execute(statement)

    def close(self):
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def _tx(self):
        """One transaction holding the write lock from its start (BEGIN IMMEDIATE)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException as e:
            self.db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):  # a table altered under us: the message names it
                raise RegistryError(f"{self.root / 'registry.db'}: cannot be written ({e}); it was damaged or "
                                    "edited") from e
            raise
        self.db.execute("COMMIT")

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / "versions" / name / f"v{version}"

    # ---- rows -------------------------------------------------------------------------------------
    def versions(self, name: str | None = None) -> list[rows.Version]:
        q = "SELECT rowid, * FROM versions" + (" WHERE name=?" if name else "")
        vs = [rows.version(r) for r in rows.query(self.db, _VERSIONS, q, (name,) if name else ())]
        return sorted(vs, key=lambda v: (v.name, v.version))

    def version(self, name: str, n: int) -> rows.Version:
        v = next((v for v in self.versions(name) if v.version == n), None)
        if v is None:
            raise RegistryError(f"{name}@v{n}: no such version")
        return v

    def files(self, name: str, version: int) -> dict[str, str]:
        got = [rows.file_row(r) for r in rows.query(self.db, _FILES, "SELECT rowid, * FROM files WHERE name=? AND "
                                                                     "version=?", (name, version))]
        return {path: sha for path, sha, _ in sorted(got)}

    def contents(self) -> dict[tuple[str, int], str]:
        return {(v.name, v.version): v.content for v in self.versions()}

    def _run_manifest(self, name: str, n: int) -> dict:
        """The version's stored run.json, checked against its recorded sha256: what the gate and `show` read,
        so the evaluation they report is inside the content a promotion signs."""
        sha = self.files(name, n).get("run.json")
        if sha is None:
            return {}
        try:
            data = objects.object_path(self.root, sha).read_bytes()
        except OSError as e:
            raise RegistryError(f"{name}@v{n}: its run.json cannot be read ({e}); run verify") from e
        if hashlib.sha256(data).hexdigest() != sha:
            raise RegistryError(f"{name}@v{n}: its run.json was modified (sha256 differs from the recorded one); "
                                "run verify")
        try:
            m = json.loads(data)
        except ValueError as e:
            raise RegistryError(f"{name}@v{n}: its run.json is not valid JSON ({e})") from e
        return m if isinstance(m, dict) else {}

    # ---- publish ----------------------------------------------------------------------------------
    def publish(self, run_dir: str | os.PathLike, name: str, note: str | None = None, artifact: str = "adapter",
                parent: int | None = None) -> dict:
        """Store a training run's `artifact` folder (an adapter, or a merged model), config.json, run.json,
        metrics.jsonl and a data manifest as the next version of `name`.

        Returns {"name", "version", "ref", "existing", "files"}; the same content published again under
        the same name returns the version that holds it, with existing=True. Symbolic links are refused
        (objects.py); stored files keep no more read permission than their sources.
        """
        check_name(name)
        run_dir = Path(run_dir)
        manifest = runfolder.read_run(run_dir)
        kind, sources = runfolder.sources(run_dir, artifact)
        data_manifest = runfolder.data_manifest(manifest)
        stored = {p: objects.store(self.root, src) for p, src in sources.items()}
        # Derived from run.json, so as private as it.
        stored["data_manifest.json"] = objects.store(self.root, None, data_manifest,
                                                     (run_dir / "run.json").stat().st_mode)
        files = {p: sha for p, (sha, _) in stored.items()}
        content = content_digest(files)
        record = runfolder.record(run_dir, manifest, artifact)
        with self._tx() as db:
            if self.key and not history.raw_rows(db):
                history.append(db, self.key, {"action": "sign", "reason": "a new registry adopts its key"})
            versions = self.versions(name)
            objects.recover(self.root, {(v.name, v.version) for v in self.versions()})
            same = next((v.version for v in versions if v.content == content), None)
            if same is not None:
                return {"name": name, "version": same, "ref": f"{name}@v{same}", "existing": True, "files": files}
            n = max((v.version for v in versions), default=0) + 1
            if parent is not None and parent not in {v.version for v in versions}:
                raise RegistryError(f"--parent v{parent}: {name} has no such version (latest v{n - 1})")
            par = parent if parent is not None else (n - 1 if n > 1 else None)
            db.execute("INSERT INTO versions (name, version, kind, content, created, note, parent, record) "
                       "VALUES (?,?,?,?,?,?,?,?)",
                       (name, n, kind, content, history.now(), note, par, json.dumps(record, default=str)))
            db.executemany("INSERT INTO files (name, version, path, sha256, size) VALUES (?,?,?,?,?)",
                           [(name, n, p, sha, size) for p, (sha, size) in stored.items()])
            objects.materialise(self.root, name, n, files)
        objects.finish(self.root, name, n)
        return {"name": name, "version": n, "ref": f"{name}@v{n}", "existing": False, "files": files}

    # ---- reading ----------------------------------------------------------------------------------
    def stages(self, name: str) -> dict[str, list[int]]:
        """{stage: [versions it held, oldest first; the last holds it now]}, replayed from the history."""
        return history.stages(history.entries(self.db), name)

    def _held(self, name: str) -> dict[int, list[str]]:
        held: dict[int, list[str]] = {}
        for stage, stack in self.stages(name).items():
            if stack:
                held.setdefault(stack[-1], []).append(stage)
        return held

    def resolve_version(self, name: str, which: str) -> int:
        """The version number that REF (vN, latest, a stage) names; raises when there is none. A stage is
        replayed from the history only after the history verifies (with the key, when one is given)."""
        check_name(name)
        versions = self.versions(name)
        if not versions:
            known = sorted({v.name for v in self.versions()})
            raise RegistryError(f"{name}: no such model in the registry {self.root} "
                                f"(known: {', '.join(known) or 'none'})")
        latest = versions[-1].version
        if which == "latest":
            return latest
        if which in STAGES:
            problems, _ = self.verify_history()
            if problems:
                raise RegistryError(f"{name}@{which}: the registry's history does not verify, so no stage is "
                                    f"trusted: {'; '.join(problems)}; run `python -m lora_engine.registry verify`")
            stack = self.stages(name)[which]
            if not stack:
                raise RegistryError(f"{name}@{which}: no version holds {which}; promote one with "
                                    f"`promote {name}@vN --stage {which}`")
            return stack[-1]
        n = int(which[1:])
        if n not in {v.version for v in versions}:
            raise RegistryError(f"{name}@{which}: no such version (latest is v{latest})")
        return n

    def list(self, name: str | None = None) -> list[dict]:
        """One dict per version (name, version, kind, created, note, parent, stages), oldest first."""
        if name:
            self.resolve_version(name, "latest")  # raises: no such model
        vs = self.versions(name)
        held = {n: self._held(n) for n in {v.name for v in vs}}
        return [{"name": v.name, "version": v.version, "kind": v.kind, "created": v.created, "note": v.note,
                 "parent": v.parent, "stages": held[v.name].get(v.version, [])} for v in vs]

    def show(self, ref: str) -> dict:
        """Everything recorded of one version: name, version, stage(s), the sha256 of each file, lineage, eval.

        config, eval and the base model and data hashes come from the version's stored run.json."""
        name, which = parse_ref(ref)
        n = self.resolve_version(name, which)
        v, m = self.version(name, n), self._run_manifest(name, n)
        rec = v.record
        stages = self._held(name).get(n, [])
        return {
            "name": name, "version": n, "ref": f"{name}@v{n}", "kind": v.kind,
            "stage": stages[0] if stages else None, "stages": stages, "created": v.created, "note": v.note,
            "content_sha256": v.content, "sha256": self.files(name, n), "path": str(self.version_dir(name, n)),
            "lineage": {"parent": v.parent, "run_dir": rec.get("run_dir"), "base_model": m.get("base_model"),
                        "data": m.get("data"), "git_revision": m.get("git_revision"),
                        "package_version": m.get("package_version"), "resumed_from": m.get("resumed_from"),
                        "published_by": rec.get("published_by")},
            "eval": m.get("eval"), "config": m.get("config"),
        }

    def diff(self, ref_a: str, ref_b: str) -> dict:
        """What differs between two versions: {"config", "data", "base_model", "eval", "files"}, each
        {dotted key: [a's value, b's value]} (None where one side lacks the key)."""
        a, b = self.show(ref_a), self.show(ref_b)
        out = {"a": a["ref"], "b": b["ref"]}
        for part, (x, y) in {"config": (a["config"], b["config"]),
                             "data": (a["lineage"]["data"], b["lineage"]["data"]),
                             "base_model": (a["lineage"]["base_model"], b["lineage"]["base_model"]),
                             "eval": (a["eval"], b["eval"]), "files": (a["sha256"], b["sha256"])}.items():
            fx, fy = _flatten(x), _flatten(y)
            out[part] = {k: [fx.get(k), fy.get(k)] for k in sorted(set(fx) | set(fy)) if fx.get(k) != fy.get(k)}
        return out

    def history(self, name: str | None = None) -> list[dict]:
        """Every promotion, rollback and key adoption ("sign"; only when `name` is None), oldest first: id,
        time, who, action, name, stage, from, to, reason, forced, gate, signed."""
        return [{k: e.body.get(k) for k in ("time", "who", "action", "name", "stage", "from", "to", "reason",
                                            "forced", "gate")} | {"id": e.id, "signed": e.signature is not None}
                for e in history.entries(self.db) if name is None or e.body.get("name") == name]

    # ---- promote / rollback / sign ----------------------------------------------------------------
    def _open_history(self, db) -> None:
        """Check that this writer may append to the history, and that the history verifies (inside a write
        transaction). A new registry written with a key adopts it first."""
        history.check_writer(history.entries(db), self.key, str(self.root))
        if self.key and not history.raw_rows(db):
            history.append(db, self.key, {"action": "sign", "reason": "a new registry adopts its key"})
        problems, _ = self.verify_history()
        if problems:
            raise RegistryError(f"{self.root}: the history does not verify, so it takes no new entry: "
                                f"{'; '.join(problems)}")

    def promote(self, ref: str, stage: str, force: bool = False, reason: str | None = None,
                max_regression: float = DEFAULT_MAX_REGRESSION) -> dict:
        """Make the version `ref` names hold `stage`; returns the history entry.

        The gate: a version whose general-ability suite score fell by more than `max_regression` points
        (eval.before/after.suite.general of its stored run.json) is refused unless `force`, and a forced
        promotion records the gate's finding.
        """
        if stage not in STAGES:
            raise RegistryError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
        name, which = parse_ref(ref)
        with self._tx() as db:
            self._open_history(db)
            n = self.resolve_version(name, which)
            stack = self.stages(name)[stage]
            if stack and stack[-1] == n:
                raise RegistryError(f"{name}@v{n} already holds {stage}")
            if problems := self.verify_version(name, n):
                raise RegistryError(f"{name}@v{n} fails verification, so it is not promoted: {'; '.join(problems)}")
            gate = general_regression(self._run_manifest(name, n).get("eval") or {})
            if gate is not None and gate["drop"] > max_regression:
                gate["message"] = (f"{name}@v{n}: the general suite fell {gate['drop']:.1f} points "
                                   f"({gate['before']:.1f} -> {gate['after']:.1f}), more than --max-regression "
                                   f"{max_regression:g}")
                if not force:
                    raise RegistryError(gate["message"] + "; retrain, or pass --force to promote anyway (recorded)")
            return history.append(db, self.key, {"action": "promote", "name": name, "stage": stage,
                                                 "from": stack[-1] if stack else None, "to": n, "reason": reason,
                                                 "forced": bool(force), "gate": gate,
                                                 "content": self.version(name, n).content})

    def rollback(self, name: str, stage: str, reason: str | None = None) -> dict:
        """Give `stage` back to the version it held before the current one; returns the history entry."""
        if stage not in STAGES:
            raise RegistryError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
        check_name(name)
        with self._tx() as db:
            self._open_history(db)
            self.resolve_version(name, "latest")  # raises for an unknown name
            stack = self.stages(name)[stage]
            if len(stack) < 2:
                held = f"has held only v{stack[0]}" if stack else "holds no version"
                raise RegistryError(f"{name}: {stage} {held}; there is nothing to roll back to")
            return history.append(db, self.key, {"action": "rollback", "name": name, "stage": stage,
                                                 "from": stack[-1], "to": stack[-2], "reason": reason,
                                                 "forced": False, "gate": None,
                                                 "content": self.version(name, stack[-2]).content})

    def sign(self, reason: str | None = None) -> dict:
        """Adopt the key for a history that predates it: one signed entry extending the chain as it stands.

        Check `history` first: signing attests every entry before it."""
        if self.key is None:
            raise RegistryError(f"registry sign needs the key: pass --key-file or set ${KEY_ENV}")
        fp = fingerprint(self.key)
        with self._tx() as db:
            adopted = history.adopted_key(history.entries(db))
            if adopted == fp:
                raise RegistryError(f"{self.root}: its history already adopts key {fp}; nothing to sign")
            if adopted:
                raise RegistryError(f"{self.root}: its history adopts another key ({adopted}); a registry has one key")
            if problems := history.verify(db, None, self.contents()):
                raise RegistryError(f"{self.root}: the history does not verify, so it is not signed: "
                                    f"{'; '.join(problems)}")
            return history.append(db, self.key, {"action": "sign", "reason": reason})

    # ---- verify -----------------------------------------------------------------------------------
    def verify_version(self, name: str, version: int) -> list[str]:
        """Problems with one version's files: modified, missing or added (in versions/ and objects/)."""
        return checks.verify_version(self, name, version)

    def verify_history(self) -> tuple[list[str], str]:
        """(problems with the history chain and signatures, how signatures were checked)."""
        how = f"checked with key {fingerprint(self.key)}" if self.key else "not checked (no key given)"
        return history.verify(self.db, self.key, self.contents()), how

    def verify(self, ref: str | None = None) -> dict:
        """Recompute every stored hash (of one model, or one version, or all); check the history.

        Returns {"ok", "problems": [one line per file, row or entry], "versions", "files", "signatures",
        "notes"}. Leftovers of an interrupted publish are recovered (or named in notes), not problems.
        """
        return checks.verify(self, ref)

    def recover(self) -> list[str]:
        """Finish or undo interrupted publishes (notes); where the registry cannot be written, say so."""
        if not objects.pending(self.root):
            return []
        try:
            with self._tx():
                return objects.recover(self.root, {(v.name, v.version) for v in self.versions()})
        except (RegistryError, OSError) as e:
            return [f"{d}: left by an interrupted publish of {n}@v{v} (not recovered: {e})"
                    for n, v, d in objects.pending(self.root)]

    def resolve(self, ref: str) -> Path:
        """The verified local folder of the artifact (adapter/ or model/) that 'registry:NAME@REF' names.

        With the key, the whole history must verify whatever REF is (a stage always needs a history that
        verifies, with or without the key)."""
        name, which = parse_ref(ref)
        n = self.resolve_version(name, which)
        if self.key and which not in STAGES and (problems := self.verify_history()[0]):
            raise RegistryError(f"{ref}: the registry's history does not verify, so nothing is loaded from it: "
                                + "; ".join(problems))
        if not self.version_dir(name, n).exists():
            self.recover()  # its publish was interrupted after the commit
        problems = self.verify_version(name, n)
        if problems:
            raise RegistryError(f"{ref} ({name}@v{n}) failed verification, so it was not loaded: "
                                + "; ".join(problems) + f"; run `python -m lora_engine.registry verify {name}`")
        return self.version_dir(name, n) / self.version(name, n).kind


def general_regression(ev: dict) -> dict | None:
    """{"before", "after", "drop"} (points) of the general-ability suite in a run's eval record
    (eval.before.suite.general.score and eval.after's, as training records them), or None."""
    try:
        before = float(ev["before"]["suite"]["general"]["score"])
        after = float(ev["after"]["suite"]["general"]["score"])
    except (KeyError, TypeError, ValueError):
        return None
    return {"before": before, "after": after, "drop": before - after}


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d} if prefix else ({} if d is None else {"": d})
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out
