"""verify: every stored hash, every file and folder of the registry, and the history, reported as problems.

A problem is something changed that publish, promote and rollback never do (a file modified, missing
or added, a row damaged, an entry forged); what an interrupted publish leaves behind is recovered,
or reported as a note, never as a problem.
"""

from __future__ import annotations

import contextlib

from lora_engine.io.digest import sha256_file
from lora_engine.registry import history, objects, rows
from lora_engine.registry.keys import fingerprint
from lora_engine.registry.names import PREFIX, RegistryError, check_name, content_digest, parse_ref

_VERSIONS, _FILES = "registry.db, table versions", "registry.db, table files"


def verify_version(reg, name: str, version: int) -> list[str]:
    """Problems with one version's files: modified, missing or added (in versions/ and objects/)."""
    problems = []
    files = reg.files(name, version)
    vdir = reg.version_dir(name, version)
    if content_digest(files) != reg.version(name, version).content:
        problems.append(f"{name}@v{version}: the recorded file hashes do not match its content digest (the "
                        "database was edited)")
    for path, sha in files.items():
        for where in (vdir / path, objects.object_path(reg.root, sha)):
            if where.is_symlink() or not where.is_file():
                problems.append(f"{where}: missing")
            elif (got := sha256_file(where)) != sha:
                problems.append(f"{where}: modified (sha256 {got[:12]}..., recorded {sha[:12]}...)")
    if vdir.is_dir():
        for p in sorted(vdir.rglob("*")):
            if not p.is_dir() and p.relative_to(vdir).as_posix() not in files:
                problems.append(f"{p}: added (not part of {name}@v{version})")
    return problems


def verify(reg, ref: str | None = None) -> dict:
    """Recompute every stored hash (of one model, or one version, or all); check the history.

    Returns {"ok", "problems": [one line per file, row or entry], "versions", "files", "signatures",
    "notes"}. Leftovers of an interrupted publish are recovered (or named in notes), not problems.
    """
    notes = reg.recover()
    problems: list[str] = []
    contents = {}
    for r in rows.query(reg.db, _VERSIONS, "SELECT rowid, * FROM versions"):
        try:
            v = rows.version(r)
        except RegistryError as e:  # one damaged row is a problem to report, not a reason to stop
            problems.append(str(e))
        else:
            contents[(v.name, v.version)] = v.content
    if ref is None:
        targets = list(contents)
    elif "@" in ref.removeprefix(PREFIX):
        name, which = parse_ref(ref)
        targets = [(name, reg.resolve_version(name, which))]
    else:
        reg.resolve_version(check_name(ref), "latest")
        targets = [(ref, v.version) for v in reg.versions(ref)]
    nfiles = 0
    for name, n in sorted(targets):
        try:
            problems += reg.verify_version(name, n)
            nfiles += len(reg.files(name, n))
        except RegistryError as e:
            problems.append(str(e))
    if ref is None:
        problems += strays(reg, set(targets), notes)
    hist = history.verify(reg.db, reg.key, contents)
    how = f"checked with key {fingerprint(reg.key)}" if reg.key else "not checked (no key given)"
    problems = list(dict.fromkeys(problems))  # an object shared by versions is reported once
    return {"ok": not problems and not hist, "problems": problems + hist, "versions": len(targets),
            "files": nfiles, "signatures": how, "notes": notes}


def strays(reg, targets: set[tuple[str, int]], notes: list[str]) -> list[str]:
    """Files and version folders the database does not know (appends what an interrupted publish left to notes)."""
    problems = []
    known = set()
    for r in rows.query(reg.db, _FILES, "SELECT rowid, * FROM files"):
        with contextlib.suppress(RegistryError):  # the damaged row is named by its version's check
            known.add(rows.file_row(r)[1])
    oroot = reg.root / "objects"
    for p in sorted(oroot.rglob("*")) if oroot.is_dir() else []:
        if p.is_dir() or (p.name.startswith(".incoming.") and p.name.endswith(".tmp")):
            continue
        if p.name not in known:
            if p.name.startswith(p.parent.name) and not p.is_symlink() and sha256_file(p) == p.name:
                notes.append(f"{p}: stored but in no version (an interrupted publish)")
            else:
                problems.append(f"{p}: added (not a stored object)")
    pending = {d for _, _, d in objects.pending(reg.root)}
    vroot = reg.root / "versions"
    for d in sorted(vroot.glob("*/*")) if vroot.is_dir() else []:
        if d in pending:
            continue  # named in notes by _recover
        if not (d.name.startswith("v") and d.name[1:].isdigit() and (d.parent.name, int(d.name[1:])) in targets):
            problems.append(f"{d}: added (no such version recorded)")
    return problems
