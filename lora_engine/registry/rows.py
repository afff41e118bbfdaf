"""The rows of registry.db, read into checked types: a damaged or edited row is one RegistryError naming it.

SQLite stores whatever a writer puts in a column (text in an INTEGER column, a blob, NULL, a table
recreated without a column), so nothing read from the database is used before it passes here. The
paths and hashes are checked too: they become file names under the registry folder, and a row saying
`../../x` must not make `verify` read, or `resolve` load, anything outside it.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from pathlib import PurePosixPath

from lora_engine.registry.names import STAGES, RegistryError, check_name

KINDS = ("adapter", "model")
ACTIONS = ("promote", "rollback", "sign")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    kind: str
    content: str  # content_digest of its files
    created: str
    note: str | None
    parent: int | None
    record: dict  # what publish recorded beside the files (run folder, who published)


@dataclass(frozen=True)
class Entry:
    """One history entry: `body` is what its digest covers (and its signature, with a key)."""
    id: int
    body: dict
    digest: str
    signature: str | None

    @property
    def action(self) -> str:
        return self.body["action"]


def query(db: sqlite3.Connection, where: str, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    """Run a SELECT; a database that cannot answer it (damaged, a table altered) is a RegistryError."""
    try:
        return db.execute(sql, args).fetchall()
    except sqlite3.Error as e:
        raise RegistryError(f"{where}: the database cannot be read ({e}); it was damaged or edited, restore it "
                            "from a backup") from e


def _col(row: sqlite3.Row, col: str, where: str, types: tuple[type, ...], optional: bool = False):
    try:
        v = row[col]
    except (IndexError, KeyError):
        raise RegistryError(f"{where}: has no column {col!r} (the table was altered)") from None
    if v is None and optional:
        return None
    if not isinstance(v, types) or isinstance(v, bool):
        raise RegistryError(f"{where}: {col} is {v!r}, expected {' or '.join(t.__name__ for t in types)}")
    return v


def _hex64(v: str, col: str, where: str) -> str:
    if not _HEX64.fullmatch(v):
        raise RegistryError(f"{where}: {col} is {v!r}, not a sha256 (64 lowercase hex digits)")
    return v


def _json_object(text: str, col: str, where: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; deep nesting recurses
        raise RegistryError(f"{where}: {col} is not valid JSON ({str(e)[:80]})") from None
    if not isinstance(value, dict):
        raise RegistryError(f"{where}: {col} is a JSON {type(value).__name__}, expected an object")
    return value


def _rowid(row: sqlite3.Row) -> str:
    try:
        return str(row["rowid"])
    except (IndexError, KeyError):
        return "?"


def version(row: sqlite3.Row) -> Version:
    where = f"registry.db, table versions, row {_rowid(row)}"
    name = _col(row, "name", where, (str,))
    try:
        check_name(name)
    except RegistryError as e:
        raise RegistryError(f"{where}: {e}") from None
    n = _col(row, "version", where, (int,))
    where = f"registry.db, table versions, row {_rowid(row)} ({name}@v{n})"
    if n < 1:
        raise RegistryError(f"{where}: version {n} is not a positive number")
    kind = _col(row, "kind", where, (str,))
    if kind not in KINDS:
        raise RegistryError(f"{where}: kind is {kind!r}, expected one of {', '.join(KINDS)}")
    parent = _col(row, "parent", where, (int,), optional=True)
    return Version(name, n, kind, _hex64(_col(row, "content", where, (str,)), "content", where),
                   _col(row, "created", where, (str,)), _col(row, "note", where, (str,), optional=True),
                   parent, _json_object(_col(row, "record", where, (str,)), "record", where))


def file_row(row: sqlite3.Row) -> tuple[str, str, int]:
    """(path inside the version folder, sha256, size)."""
    where = f"registry.db, table files, row {_rowid(row)}"
    path = _col(row, "path", where, (str,))
    p = PurePosixPath(path)
    if not path or p.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")) or "\0" in path \
            or "\\" in path:
        raise RegistryError(f"{where}: path {path!r} is not a plain relative path inside a version folder")
    size = _col(row, "size", where, (int,))
    if size < 0:
        raise RegistryError(f"{where}: size {size} is negative")
    return path, _hex64(_col(row, "sha256", where, (str,)), "sha256", where), size


def entry(row: sqlite3.Row) -> Entry:
    """A history row, with its body checked: a damaged one raises (verify reports it as a problem)."""
    where = f"history entry {_rowid(row)}"
    i = _col(row, "id", where, (int,))
    where = f"history entry {i}"
    body = _json_object(_col(row, "body", where, (str,)), "body", where)
    digest = _hex64(_col(row, "digest", where, (str,)), "digest", where)
    signature = _col(row, "signature", where, (str,), optional=True)
    action = body.get("action")
    if action not in ACTIONS:
        raise RegistryError(f"{where}: action {action!r} is not one of {', '.join(ACTIONS)}")
    if action != "sign":
        try:
            check_name(body.get("name"))
        except RegistryError as e:
            raise RegistryError(f"{where}: {e}") from None
        if body.get("stage") not in STAGES:
            raise RegistryError(f"{where}: stage {body.get('stage')!r} is not one of {', '.join(STAGES)}")
        for k, optional in (("to", False), ("from", True)):
            v = body.get(k)
            if not ((v is None and optional) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1)):
                raise RegistryError(f"{where}: {k!r} is {v!r}, expected a version number")
    return Entry(i, body, digest, signature)

