"""The registry's files: objects/ab/abcd... (each stored file once, by sha256) and versions/NAME/vN/.

Publishing copies regular files only. A symbolic link is refused, never followed (O_NOFOLLOW, and
the opened file must be a regular one): a link in a run folder could otherwise publish, say,
~/.ssh/id_ed25519 under an adapter's name. An object keeps no more read permission than its source
had (a private 0600 file is stored 0400, a 0644 one 0444), and never any write permission.

A version's folder is built as versions/NAME/.vN.tmp and renamed to vN only after the database
commit that records it. A crash before the commit leaves a .tmp folder that no version claims; one
after it leaves a recorded version whose folder still has its .tmp name. `recover` (run by publish
and verify) removes the first and renames the second, and until then verify reports both as an
interrupted publish, not as tampering.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

from lora_engine.io import atomic
from lora_engine.registry.names import RegistryError

_PENDING = re.compile(r"\.(v[1-9][0-9]*)\.tmp")


def object_path(root: Path, sha: str) -> Path:
    return root / "objects" / sha[:2] / sha


def read_only_mode(mode: int) -> int:
    """The read bits of `mode`, and no others: what a stored object gets from its source."""
    return stat.S_IMODE(mode) & 0o444


def open_source(src: Path) -> tuple[int, int]:
    """(fd, mode) of a regular file to publish; a symbolic link or anything else not a file is refused."""
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        if e.errno == errno.ELOOP or src.is_symlink():
            raise RegistryError(f"{src} is a symbolic link (to {os.readlink(src)}); publish stores regular files "
                                "only and never follows a link: put a copy of the file there instead") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise RegistryError(f"{src} is not a regular file; publish stores regular files only")
    return fd, st.st_mode


def store(root: Path, src: Path | None, data: bytes | None = None, mode: int = 0o444) -> tuple[str, int]:
    """Copy a file (or bytes, given `mode`) into objects/ under its sha256, read-only; (sha256, size)."""
    tmpdir = root / "objects"
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
                fi_fd, mode = open_source(src)
                with os.fdopen(fi_fd, "rb") as fi:
                    while block := fi.read(1 << 20):
                        fo.write(block)
                        h.update(block)
                        size += len(block)
            fo.flush()
            os.fsync(fo.fileno())
        mode = read_only_mode(mode)
        os.chmod(tmp, mode)
        dest = object_path(root, h.hexdigest())
        dest.parent.mkdir(exist_ok=True)
        try:
            os.link(tmp, dest)  # never replaces: an existing object keeps its inode (and its links)
        except FileExistsError:
            # The same bytes stored before, perhaps from a less private source: keep the stricter mode.
            os.chmod(dest, read_only_mode(dest.stat().st_mode) & mode)
        except OSError:  # no hard links here
            if not dest.exists():
                os.replace(tmp, dest)
        atomic.fsync_dir(dest.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return h.hexdigest(), size


def pending_dir(root: Path, name: str, version: int) -> Path:
    return root / "versions" / name / f".v{version}.tmp"


def materialise(root: Path, name: str, version: int, files: dict[str, str]) -> Path:
    """Build the folder of a version being published under its pending name; returns it."""
    tmp = pending_dir(root, name, version)
    # Left by a publish that crashed before its commit, or put there by hand: no version claims them,
    # and we hold the lock.
    for old in (tmp, root / "versions" / name / f"v{version}"):
        if old.exists():
            shutil.rmtree(old)
    for path, sha in files.items():
        dest = tmp / path
        dest.parent.mkdir(parents=True, exist_ok=True)
        obj = object_path(root, sha)
        try:
            os.link(obj, dest)
        except OSError:
            shutil.copyfile(obj, dest)
            os.chmod(dest, read_only_mode(obj.stat().st_mode))
    return tmp


def finish(root: Path, name: str, version: int) -> None:
    """Give a committed version's folder its final name (durably). Runs after the commit, without the lock:
    another process's `recover` may have done it first."""
    final = root / "versions" / name / f"v{version}"
    try:
        os.rename(pending_dir(root, name, version), final)
    except FileNotFoundError:
        if not final.is_dir():
            raise
    atomic.fsync_dir(final.parent)


def pending(root: Path) -> list[tuple[str, int, Path]]:
    """(name, version, folder) of every version folder an interrupted publish left under its pending name."""
    vroot = root / "versions"
    out = []
    for d in sorted(vroot.glob("*/.v*.tmp")) if vroot.is_dir() else []:
        m = _PENDING.fullmatch(d.name)
        if m and d.is_dir():
            out.append((d.parent.name, int(m.group(1)[1:]), d))
    return out


def recover(root: Path, recorded: set[tuple[str, int]]) -> list[str]:
    """Finish or undo what interrupted publishes left (call holding the write lock); one note for each."""
    notes = []
    for name, n, d in pending(root):
        if (name, n) in recorded and not (root / "versions" / name / f"v{n}").exists():
            finish(root, name, n)
            notes.append(f"{name}@v{n}: an interrupted publish had recorded it; its folder is now in place")
        else:
            shutil.rmtree(d)
            notes.append(f"{d}: removed, left by an interrupted publish of {name}@v{n}")
    return notes
