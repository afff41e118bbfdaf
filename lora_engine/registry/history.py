"""The registry's history: every promotion, rollback and key adoption, as a hash chain, signed with the key.

Each entry's body holds the digest of the entry before it (`prev`), so an edited, removed, inserted
or reordered entry breaks the chain. Stages are replayed from the entries (promote pushes, rollback
pops): a stage cannot change without an entry, and a stage reference resolves through this history.

With a key, the history is the registry's only record that a key governs it (nothing in an editable
table says so): the first keyed write appends a `sign` entry (the genesis of a new registry, or,
through `registry sign`, the adoption of a history that predates the key), signed like every entry
after it. A verifier holding the key then requires that entry, and a valid signature on it and on
every later one; the entries before it are covered by the chain that the signed entry extends.
So deleting the history (all of it, or the adoption), clearing a signature, or rewriting an entry
with a recomputed digest is a problem for `verify`, and a refusal for promote, rollback and resolve.

What a key cannot catch: the newest entries deleted together (the chain ends earlier but still
holds; keep a copy of `history` elsewhere), and a verifier without the key (it checks the chain
only). Promotions sign the content digest of the version they promote, which covers its run.json,
so the evaluation record the regression gate read is signed too.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import sqlite3
import time

from lora_engine.registry import keys, rows
from lora_engine.registry.names import STAGES, RegistryError


def digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def who() -> str:
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name (a container without a passwd entry)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def raw_rows(db: sqlite3.Connection) -> list[sqlite3.Row]:
    return rows.query(db, "registry.db, table history", "SELECT * FROM history ORDER BY id")


def entries(db: sqlite3.Connection) -> list[rows.Entry]:
    """Every entry, checked (a damaged one raises RegistryError naming it)."""
    return [rows.entry(r) for r in raw_rows(db)]


def stages(history: list[rows.Entry], name: str) -> dict[str, list[int]]:
    """{stage: [versions it held, oldest first; the last holds it now]}, replayed from the history."""
    out: dict[str, list[int]] = {s: [] for s in STAGES}
    for e in history:
        if e.action == "sign" or e.body["name"] != name:
            continue
        stack = out[e.body["stage"]]
        if e.action == "promote":
            stack.append(e.body["to"])
        elif stack:
            stack.pop()
    return out


def adopted_key(history: list[rows.Entry]) -> str | None:
    """The fingerprint of the key the history's first `sign` entry names (whether or not its signature holds)."""
    return next((e.body.get("key") for e in history if e.action == "sign"), None)


def verify(db: sqlite3.Connection, key: bytes | None, contents: dict[tuple[str, int], str]) -> list[str]:
    """Problems with the chain, the signatures (with `key`) and the content each promotion signed.

    `contents`: {(name, version): content digest} of the versions as recorded now.
    """
    problems: list[str] = []
    prev, adoption = None, None
    fp = keys.fingerprint(key) if key else None
    for r in raw_rows(db):
        try:
            e = rows.entry(r)
        except RegistryError as err:
            problems.append(f"{err} (edited)")
            prev = dict(zip(r.keys(), r)).get("digest")  # the next entry should still follow it
            continue
        where = f"history entry {e.id}"
        if e.body.get("id") != e.id or digest(e.body) != e.digest:
            problems.append(f"{where}: its digest does not match its content (edited)")
        if e.body.get("prev") != prev:
            problems.append(f"{where}: does not follow entry {e.id - 1} (an entry was removed, inserted or "
                            "reordered)")
        prev = e.digest
        if e.action != "sign" and e.body.get("content") != contents.get((e.body["name"], e.body["to"])):
            problems.append(f"{where}: {e.body['name']}@v{e.body['to']}'s content is not what was promoted")
        if key is None:
            continue
        if adoption is None and e.action == "sign" and e.body.get("key") == fp:
            adoption = e.id
        if adoption is None:
            continue  # before the key was adopted: covered by the chain the adoption signed
        if e.signature is None:
            problems.append(f"{where}: unsigned (written without the key)")
        elif not keys.signed(key, e.digest, e.signature):
            problems.append(f"{where}: the signature does not match (forged, or signed with another key)")
    if key is not None and adoption is None:
        problems.append(f"history: no entry adopts key {fp}, so nothing in it is signed: the history was deleted "
                        "or replaced, or it predates the key (check `registry history`, then run `registry sign "
                        "--key-file ...`)")
    return problems


def check_writer(history: list[rows.Entry], key: bytes | None, where: str) -> None:
    """Refuse a write to a history that a key governs, from someone without that key."""
    adopted = adopted_key(history)
    fp = keys.fingerprint(key) if key else None
    if adopted and fp is None:
        raise RegistryError(f"promotions and rollbacks in {where} are restricted to the holders of its key "
                            f"(fingerprint {adopted}); pass --key-file or set $LORA_ENGINE_REGISTRY_KEY")
    if adopted and fp != adopted:
        raise RegistryError(f"the key given (fingerprint {fp}) is not this registry's (fingerprint {adopted})")


def append(db: sqlite3.Connection, key: bytes | None, entry: dict) -> dict:
    """Append one entry after the last (signed with `key` when given); returns its body. Call inside a write
    transaction, after the caller has checked the history."""
    last = rows.query(db, "registry.db, table history", "SELECT id, digest FROM history ORDER BY id DESC LIMIT 1")
    last_id, last_digest = (last[0][0], last[0][1]) if last else (0, None)
    body = dict(entry, id=last_id + 1, time=now(), who=who(), prev=last_digest,
                key=keys.fingerprint(key) if key else None)
    d = digest(body)
    db.execute("INSERT INTO history VALUES (?,?,?,?)", (body["id"], json.dumps(body, sort_keys=True), d,
                                                        keys.sign(key, d) if key else None))
    return body
