"""The model registry's store: versions of fine-tuned adapters (or merged models), promotion and rollback.

A registry is a folder:

  registry.db            SQLite (WAL): versions, their files, the history of promotions, meta
  objects/ab/abcd...     every stored file once, named by its sha256, read-only (0444)
  versions/NAME/vN/...   each version's files under their own names: hard links into objects/
                         (copies where the filesystem has no hard links)

Every change is one transaction begun with BEGIN IMMEDIATE: the write lock is taken first, so two
processes publishing at once queue behind the busy timeout instead of both reading "the last version
is v3" and both writing v4. Files are stored before the transaction (a crash leaves an unreferenced
object, never a version without its files).

History: every promotion and rollback is appended with who, when, from, to and why. Each entry holds
the digest of the one before (a chain: an edited or removed entry breaks it) and, when a registry key
is configured, an HMAC-SHA256 of its digest. Stages are replayed from the history (promote pushes,
rollback pops), so a stage cannot be changed without writing an entry. With a key, each promotion
also signs the content digest of the version it promotes: a stored file swapped together with its
recorded hash is still caught.

Threat model: the key (a file only its owner may read) stops someone who can write the registry but
does not hold the key from promoting, or from editing the history unnoticed; `verify` with the key
names every forged or unsigned entry. It cannot stop the key's holder, nor someone who deletes the
newest entries together (keep a copy of `history` elsewhere for that), and SQLite's locking needs a
local filesystem, not NFS.

Everything here returns plain data (dicts, lists, paths); the command line is lora_engine/registry.py.
Standard library only.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
import stat
import tempfile
import time
from pathlib import Path

from lora_engine.io import atomic
from lora_engine.io.digest import sha256_file

PREFIX = "registry:"
STAGES = ("production", "staging")
KEY_ENV = "LORA_ENGINE_REGISTRY_KEY"  # path of the key file
ROOT_ENV = "LORA_ENGINE_REGISTRY"
DEFAULT_MAX_REGRESSION = 2.0  # points of the general suite's score
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_KEY_ID_MSG = b"lora_engine registry key id"

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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


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


# ---- the key --------------------------------------------------------------------------------------
def read_key(path: str | os.PathLike) -> bytes:
    """The registry key in `path`: a regular file of at least 32 bytes that only its owner can read."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise RegistryError(f"key file {path} does not exist; make one with `python -m lora_engine.registry keygen "
                            f"{path}`") from None
    if not stat.S_ISREG(st.st_mode):
        raise RegistryError(f"key file {path} is not a regular file")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise RegistryError(f"key file {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()})")
    if st.st_mode & 0o077:
        raise RegistryError(f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}: others can read or write it; "
                            f"run chmod 600 {path}")
    key = path.read_bytes().strip()
    if len(key) < 32:
        raise RegistryError(f"key file {path} holds {len(key)} bytes; a key needs at least 32 (use keygen)")
    return key


def keygen(path: str | os.PathLike) -> str:
    """Write a new random key to `path` (mode 0600, never over an existing file); returns its fingerprint."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise RegistryError(f"{path} exists; a key is never overwritten (delete it first if you mean to)") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return fingerprint(read_key(path))


def fingerprint(key: bytes) -> str:
    return hmac.new(key, _KEY_ID_MSG, hashlib.sha256).hexdigest()[:16]


def _sign(key: bytes, digest: str) -> str:
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def _who() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name (a container without a passwd entry)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def parse_ref(ref: str) -> tuple[str, str]:
    """'NAME@REF' (or 'registry:NAME@REF') -> (NAME, REF); REF is vN, latest, production or staging."""
    s = ref.removeprefix(PREFIX)
    name, sep, which = s.partition("@")
    if not sep or not which:
        raise RegistryError(f"{ref!r} is not a registry reference; write NAME@vN or NAME@STAGE "
                            f"(e.g. chat@v3, chat@production)")
    check_name(name)
    if not (re.fullmatch(r"v[1-9][0-9]*", which) or which in (*STAGES, "latest")):
        raise RegistryError(f"{ref!r}: {which!r} is neither a version (v1, v2, ...) nor latest nor a stage "
                            f"({', '.join(STAGES)})")
    return name, which


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise RegistryError(f"name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter or digit, "
                            "at most 100)")
    return name


class Registry:
    """One registry folder. `key_file` (default: the file named by $LORA_ENGINE_REGISTRY_KEY) signs
    promotions and rollbacks and lets verify check signatures."""

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
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ---- files ------------------------------------------------------------------------------------
    def _object(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2] / sha

    def version_dir(self, name: str, version: int) -> Path:
        return self.root / "versions" / name / f"v{version}"

    def _store(self, src: Path | None, data: bytes | None = None) -> tuple[str, int]:
        """Copy a file (or bytes) into objects/ under its sha256, read-only; (sha256, size)."""
        tmpdir = self.root / "objects"
        tmpdir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".incoming.", suffix=".tmp", dir=tmpdir)
        h, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as fo:
                if data is not None:
                    fo.write(data)
                    h.update(data)
                    size = len(data)
                else:
                    with open(src, "rb") as fi:
                        while block := fi.read(1 << 20):
                            fo.write(block)
                            h.update(block)
                            size += len(block)
                fo.flush()
                os.fsync(fo.fileno())
            os.chmod(tmp, 0o444)
            dest = self._object(h.hexdigest())
            dest.parent.mkdir(exist_ok=True)
            try:
                os.link(tmp, dest)  # never replaces: an existing object keeps its inode (and its links)
            except FileExistsError:
                pass
            except OSError:  # no hard links here
                if not dest.exists():
                    os.replace(tmp, dest)
            atomic.fsync_dir(dest.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return h.hexdigest(), size

    def _materialise(self, name: str, version: int, files: dict[str, str]) -> None:
        vdir = self.version_dir(name, version)
        if vdir.exists():  # left by a publish that crashed before its commit; we hold the lock
            shutil.rmtree(vdir)
        for path, sha in files.items():
            dest = vdir / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self._object(sha), dest)
            except OSError:
                shutil.copyfile(self._object(sha), dest)
                os.chmod(dest, 0o444)

    # ---- publish ----------------------------------------------------------------------------------
    def publish(self, run_dir: str | os.PathLike, name: str, note: str | None = None, artifact: str = "adapter",
                parent: int | None = None) -> dict:
        """Store a training run's `artifact` folder (an adapter, or a merged model), config.json, run.json,
        metrics.jsonl and a data manifest as the next version of `name`.

        Returns {"name", "version", "ref", "existing", "files"}; the same content published again under
        the same name returns the version that holds it, with existing=True.
        """
        check_name(name)
        run_dir = Path(run_dir)
        manifest = _read_run(run_dir)
        art = run_dir / artifact
        if (art / "adapter_config.json").is_file():
            kind = "adapter"
        elif (art / "config.json").is_file() and any(art.glob("*.safetensors")):
            kind = "model"
        else:
            raise RegistryError(f"{art} is neither an adapter folder (adapter_config.json) nor a model folder "
                                "(config.json and *.safetensors); pass --artifact with the folder inside the run")
        sources = {f"{kind}/{p.name}": p for p in sorted(art.iterdir())
                   if p.is_file() and not p.name.startswith(".")}
        for extra in ("config.json", "run.json", "metrics.jsonl"):
            if (run_dir / extra).is_file():
                sources[extra] = run_dir / extra
        data_manifest = json.dumps({"files": manifest.get("data", {}).get("sha256", {}),
                                    "stats": {k: v for k, v in manifest.get("data", {}).items() if k != "sha256"}},
                                   indent=2, sort_keys=True).encode()
        stored = {p: self._store(src) for p, src in sources.items()}
        stored["data_manifest.json"] = self._store(None, data_manifest)
        files = {p: sha for p, (sha, _) in stored.items()}
        content = content_digest(files)
        record = {
            "run_dir": str(run_dir.resolve()), "base_model": manifest.get("base_model"), "data": manifest.get("data"),
            "eval": manifest.get("eval"), "config": manifest.get("config"),
            "git_revision": manifest.get("git_revision"),
            "package_version": manifest.get("package_version"), "resumed_from": manifest.get("resumed_from"),
            "final_step": manifest.get("final_step"), "published_by": _who(), "artifact": artifact,
        }
        with self._tx() as db:
            row = db.execute("SELECT version FROM versions WHERE name=? AND content=?", (name, content)).fetchone()
            if row:
                return {"name": name, "version": row[0], "ref": f"{name}@v{row[0]}", "existing": True, "files": files}
            n = (db.execute("SELECT MAX(version) FROM versions WHERE name=?", (name,)).fetchone()[0] or 0) + 1
            if parent is not None and not db.execute("SELECT 1 FROM versions WHERE name=? AND version=?",
                                                     (name, parent)).fetchone():
                raise RegistryError(f"--parent v{parent}: {name} has no such version (latest v{n - 1})")
            par = parent if parent is not None else (n - 1 if n > 1 else None)
            db.execute("INSERT INTO versions VALUES (?,?,?,?,?,?,?,?)",
                       (name, n, kind, content, _now(), note, par, json.dumps(record, default=str)))
            db.executemany("INSERT INTO files VALUES (?,?,?,?,?)",
                           [(name, n, p, sha, size) for p, (sha, size) in stored.items()])
            try:
                self._materialise(name, n, files)
            except BaseException:
                shutil.rmtree(self.version_dir(name, n), ignore_errors=True)
                raise
        return {"name": name, "version": n, "ref": f"{name}@v{n}", "existing": False, "files": files}

    # ---- reading ----------------------------------------------------------------------------------
    def _history_rows(self) -> list[dict]:
        return [dict(json.loads(r["body"]), id=r["id"], digest=r["digest"], signature=r["signature"])
                for r in self.db.execute("SELECT * FROM history ORDER BY id")]

    def stages(self, name: str) -> dict[str, list[int]]:
        """{stage: [versions it held, oldest first; the last holds it now]}, replayed from the history."""
        out: dict[str, list[int]] = {s: [] for s in STAGES}
        for e in self._history_rows():
            if e["name"] != name:
                continue
            stack = out.setdefault(e["stage"], [])
            if e["action"] == "promote":
                stack.append(e["to"])
            elif stack:
                stack.pop()
        return out

    def _held(self, name: str) -> dict[int, list[str]]:
        held: dict[int, list[str]] = {}
        for stage, stack in self.stages(name).items():
            if stack:
                held.setdefault(stack[-1], []).append(stage)
        return held

    def resolve_version(self, name: str, which: str) -> int:
        """The version number that REF (vN, latest, a stage) names; raises when there is none."""
        check_name(name)
        latest = self.db.execute("SELECT MAX(version) FROM versions WHERE name=?", (name,)).fetchone()[0]
        if latest is None:
            known = [r[0] for r in self.db.execute("SELECT DISTINCT name FROM versions ORDER BY name")]
            raise RegistryError(f"{name}: no such model in the registry {self.root} "
                                f"(known: {', '.join(known) or 'none'})")
        if which == "latest":
            return latest
        if which in STAGES:
            stack = self.stages(name)[which]
            if not stack:
                raise RegistryError(f"{name}@{which}: no version holds {which}; promote one with "
                                    f"`promote {name}@vN --stage {which}`")
            return stack[-1]
        n = int(which[1:])
        if n > latest:
            raise RegistryError(f"{name}@{which}: no such version (latest is v{latest})")
        return n

    def _row(self, name: str, version: int) -> sqlite3.Row:
        return self.db.execute("SELECT * FROM versions WHERE name=? AND version=?", (name, version)).fetchone()

    def _files(self, name: str, version: int) -> dict[str, str]:
        return {r["path"]: r["sha256"] for r in
                self.db.execute("SELECT path, sha256 FROM files WHERE name=? AND version=? ORDER BY path",
                                (name, version))}

    def list(self, name: str | None = None) -> list[dict]:
        """One dict per version (name, version, kind, created, note, parent, stages), oldest first."""
        q, args = ("SELECT * FROM versions WHERE name=? ORDER BY version", (check_name(name),)) if name else \
            ("SELECT * FROM versions ORDER BY name, version", ())
        rows = self.db.execute(q, args).fetchall()
        if name and not rows:
            self.resolve_version(name, "latest")  # raises: no such model
        held = {n: self._held(n) for n in {r["name"] for r in rows}}
        return [{"name": r["name"], "version": r["version"], "kind": r["kind"], "created": r["created"],
                 "note": r["note"], "parent": r["parent"], "stages": held[r["name"]].get(r["version"], [])}
                for r in rows]

    def show(self, ref: str) -> dict:
        """Everything recorded of one version: name, version, stage(s), the sha256 of each file, lineage, eval."""
        name, which = parse_ref(ref)
        n = self.resolve_version(name, which)
        r = self._row(name, n)
        rec = json.loads(r["record"])
        stages = self._held(name).get(n, [])
        return {
            "name": name, "version": n, "ref": f"{name}@v{n}", "kind": r["kind"],
            "stage": stages[0] if stages else None, "stages": stages, "created": r["created"], "note": r["note"],
            "content_sha256": r["content"], "sha256": self._files(name, n), "path": str(self.version_dir(name, n)),
            "lineage": {"parent": r["parent"], "run_dir": rec.get("run_dir"), "base_model": rec.get("base_model"),
                        "data": rec.get("data"), "git_revision": rec.get("git_revision"),
                        "package_version": rec.get("package_version"), "resumed_from": rec.get("resumed_from"),
                        "published_by": rec.get("published_by")},
            "eval": rec.get("eval"), "config": rec.get("config"),
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
        """Every promotion and rollback (of `name`), oldest first: id, time, who, action, name, stage,
        from, to, reason, forced, gate, signed."""
        return [{k: e.get(k) for k in ("id", "time", "who", "action", "name", "stage", "from", "to", "reason",
                                       "forced", "gate")} | {"signed": e["signature"] is not None}
                for e in self._history_rows() if name is None or e["name"] == name]

    # ---- promote / rollback -----------------------------------------------------------------------
    def _check_key(self) -> str | None:
        """The key's fingerprint when one is configured; raises when the registry needs one that is absent or wrong."""
        row = self.db.execute("SELECT value FROM meta WHERE key='key_fingerprint'").fetchone()
        fp = fingerprint(self.key) if self.key else None
        if row and fp is None:
            raise RegistryError(f"promotions and rollbacks in {self.root} are restricted to the holders of its key "
                                f"(fingerprint {row[0]}); pass --key-file or set ${KEY_ENV}")
        if row and fp != row[0]:
            raise RegistryError(f"the key given (fingerprint {fp}) is not this registry's (fingerprint {row[0]})")
        return fp

    def _append(self, db, entry: dict) -> dict:
        fp = self._check_key()
        if fp:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('key_fingerprint', ?)", (fp,))
        last = db.execute("SELECT id, digest FROM history ORDER BY id DESC LIMIT 1").fetchone()
        body = dict(entry, id=(last[0] + 1) if last else 1, time=_now(), who=_who(), prev=last[1] if last else None,
                    key=fp)
        digest = _digest(body)
        db.execute("INSERT INTO history VALUES (?,?,?,?)", (body["id"], json.dumps(body, sort_keys=True), digest,
                                                            _sign(self.key, digest) if self.key else None))
        return body

    def promote(self, ref: str, stage: str, force: bool = False, reason: str | None = None,
                max_regression: float = DEFAULT_MAX_REGRESSION) -> dict:
        """Make the version `ref` names hold `stage`; returns the history entry.

        The gate: a version whose general-ability suite score fell by more than `max_regression` points
        (run.json eval.before/after.suite.general) is refused unless `force`, and a forced promotion
        records the gate's finding.
        """
        if stage not in STAGES:
            raise RegistryError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
        name, which = parse_ref(ref)
        with self._tx() as db:
            n = self.resolve_version(name, which)
            stack = self.stages(name)[stage]
            if stack and stack[-1] == n:
                raise RegistryError(f"{name}@v{n} already holds {stage}")
            gate = general_regression(json.loads(self._row(name, n)["record"]).get("eval") or {})
            if gate is not None and gate["drop"] > max_regression:
                gate["message"] = (f"{name}@v{n}: the general suite fell {gate['drop']:.1f} points "
                                   f"({gate['before']:.1f} -> {gate['after']:.1f}), more than --max-regression "
                                   f"{max_regression:g}")
                if not force:
                    raise RegistryError(gate["message"] + "; retrain, or pass --force to promote anyway (recorded)")
            return self._append(db, {"action": "promote", "name": name, "stage": stage,
                                     "from": stack[-1] if stack else None, "to": n, "reason": reason,
                                     "forced": bool(force), "gate": gate, "content": self._row(name, n)["content"]})

    def rollback(self, name: str, stage: str, reason: str | None = None) -> dict:
        """Give `stage` back to the version it held before the current one; returns the history entry."""
        if stage not in STAGES:
            raise RegistryError(f"--stage {stage!r}: choose one of {', '.join(STAGES)}")
        check_name(name)
        with self._tx() as db:
            self.resolve_version(name, "latest")  # raises for an unknown name
            stack = self.stages(name)[stage]
            if len(stack) < 2:
                held = f"has held only v{stack[0]}" if stack else "holds no version"
                raise RegistryError(f"{name}: {stage} {held}; there is nothing to roll back to")
            return self._append(db, {"action": "rollback", "name": name, "stage": stage, "from": stack[-1],
                                     "to": stack[-2], "reason": reason, "forced": False, "gate": None,
                                     "content": self._row(name, stack[-2])["content"]})

    # ---- verify -----------------------------------------------------------------------------------
    def verify_version(self, name: str, version: int) -> list[str]:
        """Problems with one version's files: modified, missing or added (in versions/ and objects/)."""
        problems = []
        files = self._files(name, version)
        vdir = self.version_dir(name, version)
        if content_digest(files) != self._row(name, version)["content"]:
            problems.append(f"{name}@v{version}: the recorded file hashes do not match its content digest (the "
                            "database was edited)")
        for path, sha in files.items():
            for where in (vdir / path, self._object(sha)):
                if not where.is_file():
                    problems.append(f"{where}: missing")
                elif (got := sha256_file(where)) != sha:
                    problems.append(f"{where}: modified (sha256 {got[:12]}..., recorded {sha[:12]}...)")
        if vdir.is_dir():
            for p in sorted(vdir.rglob("*")):
                if not p.is_dir() and p.relative_to(vdir).as_posix() not in files:
                    problems.append(f"{p}: added (not part of {name}@v{version})")
        return problems

    def verify_history(self) -> tuple[list[str], str]:
        """(problems with the history chain and signatures, how signatures were checked)."""
        problems, prev, signed_seen = [], None, False
        fp = fingerprint(self.key) if self.key else None
        contents = {(r["name"], r["version"]): r["content"] for r in self.db.execute("SELECT * FROM versions")}
        for r in self.db.execute("SELECT * FROM history ORDER BY id"):
            where = f"history entry {r['id']}"
            try:
                body = json.loads(r["body"])
            except json.JSONDecodeError:
                problems.append(f"{where}: not valid JSON (edited)")
                continue
            if body.get("id") != r["id"] or _digest(body) != r["digest"]:
                problems.append(f"{where}: its digest does not match its content (edited)")
            if body.get("prev") != prev:
                problems.append(f"{where}: does not follow entry {r['id'] - 1} (an entry was removed, inserted or "
                                "reordered)")
            prev = r["digest"]
            if body.get("content") != contents.get((body.get("name"), body.get("to"))):
                problems.append(f"{where}: {body.get('name')}@v{body.get('to')}'s content is not what was promoted")
            if self.key is None:
                continue
            if r["signature"] is None:
                if signed_seen:
                    problems.append(f"{where}: unsigned, after signed entries (written without the key)")
                continue
            signed_seen = True
            if not hmac.compare_digest(r["signature"], _sign(self.key, r["digest"])):
                problems.append(f"{where}: the signature does not match (forged, or signed with another key)")
        how = f"checked with key {fp}" if fp else "not checked (no key given)"
        return problems, how

    def verify(self, ref: str | None = None) -> dict:
        """Recompute every stored hash (of one model, or one version, or all); check the history.

        Returns {"ok", "problems": [one line per file or entry], "versions", "files", "signatures", "notes"}.
        """
        if ref is None:
            targets = [(r["name"], r["version"]) for r in self.db.execute("SELECT name, version FROM versions")]
        elif "@" in ref.removeprefix(PREFIX):
            name, which = parse_ref(ref)
            targets = [(name, self.resolve_version(name, which))]
        else:
            self.resolve_version(check_name(ref), "latest")
            targets = [(ref, r[0]) for r in self.db.execute("SELECT version FROM versions WHERE name=?", (ref,))]
        problems, notes, nfiles = [], [], 0
        for name, n in targets:
            problems += self.verify_version(name, n)
            nfiles += len(self._files(name, n))
        if ref is None:
            known = {r[0] for r in self.db.execute("SELECT DISTINCT sha256 FROM files")}
            known_versions = {(n, f"v{v}") for n, v in targets}
            for p in sorted((self.root / "objects").rglob("*")) if (self.root / "objects").is_dir() else []:
                if p.is_dir() or (p.name.startswith(".incoming.") and p.name.endswith(".tmp")):
                    continue
                if p.name not in known:
                    if p.name.startswith(p.parent.name) and sha256_file(p) == p.name:
                        notes.append(f"{p}: stored but in no version (an interrupted publish)")
                    else:
                        problems.append(f"{p}: added (not a stored object)")
            vroot = self.root / "versions"
            for d in sorted(vroot.glob("*/*")) if vroot.is_dir() else []:
                if (d.parent.name, d.name) not in known_versions:
                    problems.append(f"{d}: added (no such version recorded)")
        hist, how = self.verify_history()
        problems = list(dict.fromkeys(problems))  # an object shared by versions is reported once
        return {"ok": not problems and not hist, "problems": problems + hist, "versions": len(targets),
                "files": nfiles, "signatures": how, "notes": notes}

    def resolve(self, ref: str) -> Path:
        """The verified local folder of the artifact (adapter/ or model/) that 'registry:NAME@REF' names."""
        name, which = parse_ref(ref)
        n = self.resolve_version(name, which)
        problems = self.verify_version(name, n)
        if problems:
            raise RegistryError(f"{ref} ({name}@v{n}) failed verification, so it was not loaded: "
                                + "; ".join(problems) + f"; run `python -m lora_engine.registry verify {name}`")
        return self.version_dir(name, n) / self._row(name, n)["kind"]


def resolve_ref(ref: str, root: str | os.PathLike | None = None) -> Path:
    """'registry:NAME@production' or 'registry:NAME@v3' -> the local folder of that version's adapter
    (or model), after checking every file of the version against its recorded sha256."""
    if not ref.startswith(PREFIX):
        raise RegistryError(f"{ref!r} is not a registry reference (registry:NAME@vN or registry:NAME@STAGE)")
    with Registry(root, create=False) as reg:
        return reg.resolve(ref)


def local_path(value: str | None, root: str | os.PathLike | None = None) -> str | None:
    """A registry reference resolved (and verified) to its local folder in the registry `root` (None:
    $LORA_ENGINE_REGISTRY, else default_root()); any other value unchanged. For commands with --registry DIR."""
    if isinstance(value, str) and value.startswith(PREFIX):
        return str(resolve_ref(value, root))
    return value


def resolve_fields(cfg, names: tuple[str, ...], root: str | os.PathLike | None = None):
    """The config dataclass `cfg` with each field in `names` that holds a registry reference replaced by its
    verified local folder (local_path); a reference that fails names its flag."""
    import dataclasses

    out = {}
    for name in names:
        try:
            out[name] = local_path(getattr(cfg, name), root)
        except RegistryError as e:
            raise RegistryError(f"--{name.replace('_', '-')}: {e}") from e
    return dataclasses.replace(cfg, **out)


def general_regression(ev: dict) -> dict | None:
    """{"before", "after", "drop"} (points) of the general-ability suite in a run's eval record
    (eval.before.suite.general.score and eval.after's, as training records them), or None."""
    try:
        before = float(ev["before"]["suite"]["general"]["score"])
        after = float(ev["after"]["suite"]["general"]["score"])
    except (KeyError, TypeError, ValueError):
        return None
    return {"before": before, "after": after, "drop": before - after}


def _read_run(run_dir: Path) -> dict:
    p = run_dir / "run.json"
    if not p.is_file():
        raise RegistryError(f"{run_dir}: no run.json, so it is not a training run folder (pass the --out folder of "
                            "`python -m lora_engine.train`)")
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RegistryError(f"{p}: not valid JSON ({e})") from e
    if not isinstance(m, dict):
        raise RegistryError(f"{p}: expected a JSON object")
    if m.get("status") != "completed":
        raise RegistryError(f"{run_dir}: the run's status is {m.get('status')!r}; only completed runs are published "
                            "(finish it with --resume)")
    return m


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _flatten(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d} if prefix else ({} if d is None else {"": d})
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out
