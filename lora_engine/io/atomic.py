"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

Pattern: write to a temporary name in the same folder, flush and fsync the data, rename over the
final name (atomic on POSIX within one filesystem), then fsync the parent folder so the rename
itself survives a power cut. A crash (or kill -9) at any moment leaves either the old version or
the new one, never a half-written file; stray temporaries start with "." and end with ".tmp".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder so that renames and new entries in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def usual_permissions(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain open()/mkdir() would (0666/0777 less the umask).

    mkstemp and mkdtemp make owner-only (0600/0700) entries; what we publish (checkpoints,
    adapters, exports) is meant to be readable by others too.
    """
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Stream a file into place: a binary file object on a temporary beside `path`, published as `path`
    (fsync, rename, fsync of the folder) when the block succeeds.

        with atomic_file(out / "model.safetensors") as f:
            for chunk in chunks:
                f.write(chunk)

    Large files are never built in memory. If the block raises, the temporary is removed and an
    existing `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file + fsync + rename + fsync of the folder)."""
    with atomic_file(path) as f:
        f.write(data)


def copy_file(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy `src` to `dest` atomically, in chunks (the mode is the usual one, not the source's)."""
    with open(src, "rb") as fi, atomic_file(dest) as fo:
        shutil.copyfileobj(fi, fo)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and folder below `root` (bottom-up), so a later rename publishes durable data."""
    for dirpath, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name and publish it as `path` when the block succeeds.

        with atomic_dir(out / "checkpoint-00100") as tmp:
            torch.save(state, tmp / "state.pt")

    If the block raises, the temporary folder is removed and an existing `path` is left untouched.
    An existing `path` is replaced only after the new folder is complete and fsynced: it is first
    renamed aside, the new one renamed in, then the old one deleted (a crash between the two
    renames leaves the old copy under a ".old" name, which `recover_dir` puts back).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        usual_permissions(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.parent / f".{path.name}.old"
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(path, old)
    os.rename(tmp, path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(path: str | os.PathLike) -> None:
    """Undo a replacement that a crash interrupted between its two renames (see atomic_dir)."""
    path = Path(path)
    old = path.parent / f".{path.name}.old"
    if not path.exists() and old.exists():
        os.rename(old, path)


def clean_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the ".*.tmp" leftovers of interrupted writes in `folder`; returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed
