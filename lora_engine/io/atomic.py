"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

Pattern: write to a temporary name in the same folder, flush and fsync the data, rename over the
final name (atomic on POSIX within one filesystem), then fsync the parent folder so the rename
itself survives a power cut. A crash (or kill -9) at any moment leaves either the old version or
the new one, never a half-written file.

Names of what a write leaves beside its target `NAME` while it runs (one writer per target at a time):

  .NAME.lora_engine-PID-XXXXXXXX.tmp   the file or folder being written by process PID
  .NAME.lora_engine-new                a complete new folder, about to replace NAME
  .NAME.lora_engine-old                the previous NAME, moved aside, about to be deleted

The next write of NAME (and `recover_dir`, which readers call) finishes or undoes an interrupted
folder swap and deletes temporaries whose process is gone; nothing else is ever deleted.

Nothing a user made is overwritten: a writer names what it writes (`Owned` for a folder, a check
for a file) and an existing target holding anything else is refused with OutputError before any
work. A folder written without an `Owned` may only be replaced by one holding at least the same
entries. A full disk, a read-only file system or a missing permission is an OutputError naming
the path, whether it shows as an OSError or as torch.save's "unexpected pos".
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TAG = "lora_engine"
_TEMP = re.compile(rf"^\.(?P<name>.+)\.{TAG}-(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")
# errno -> what to tell the user; these are the machine's state, not a bug of ours.
_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted"}
# How torch.save and safetensors report a failed write: torch says only "unexpected pos" or "file write failed".
_WRITE_FAILED = ("unexpected pos", "file write failed", "failed writing", "No space left on device", "StorageFull")


class OutputError(ValueError):
    """An output cannot be written where asked: the path holds something this writer does not write, or
    the disk refuses (full, read-only, no permission). The message names the path and what to do."""


@dataclasses.dataclass(frozen=True)
class Owned:
    """What a writer puts into its output folder, so that only such a folder is ever replaced.

    what: the folder's kind, for messages ("a model folder"). patterns: fnmatch patterns of the
    files it holds. marker: a file every such folder holds (a folder without it is someone else's).
    """

    what: str
    patterns: tuple[str, ...]
    marker: str

    def foreign(self, folder: Path) -> list[str]:
        """The entries of an existing `folder` that this writer does not write ([] for an empty folder)."""
        entries = sorted(folder.iterdir())
        if not entries:
            return []
        odd = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in entries
               if not (p.is_file() or p.is_symlink()) or not any(fnmatch.fnmatchcase(p.name, pat)
                                                                  for pat in self.patterns)]
        if not (folder / self.marker).is_file():
            odd.append(f"no {self.marker}")
        return odd


def refuse(path: Path, what: str, why: str) -> OutputError:
    """The error for an output path that holds what this writer did not write."""
    return OutputError(f"{path} {why}: it is not {what} this command writes, so it is not replaced; choose another "
                       "output path, or remove it yourself")


def check_dir_replaceable(path: str | os.PathLike, owned: Owned) -> None:
    """Raise OutputError unless `path` is absent, an empty folder, or a folder of exactly `owned`'s files."""
    path = Path(path)
    recover_dir(path)
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_dir() or path.is_symlink():
        raise refuse(path, owned.what, "is a file" if path.is_file() else "is not a folder")
    odd = owned.foreign(path)
    if odd:
        shown = ", ".join(odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
        raise refuse(path, owned.what, f"holds {shown}")


def check_file_replaceable(path: str | os.PathLike, owned: Callable[[Path], bool], what: str) -> None:
    """Raise OutputError unless `path` is absent or a file that `owned(path)` recognises as `what`."""
    path = Path(path)
    if path.is_dir():
        raise refuse(path, what, "is a folder")
    if path.exists() and not owned(path):
        raise refuse(path, what, "exists and its content is not that")


def starts_with(prefix: bytes) -> Callable[[Path], bool]:
    """A file check for check_file_replaceable: the file's first bytes are `prefix` (a format's magic)."""
    def check(path: Path) -> bool:
        with open(path, "rb") as f:
            return f.read(len(prefix)) == prefix
    return check


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


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{TAG}-{os.getpid()}-"


def disk_error(e: BaseException, path: Path) -> OutputError | None:
    """The OutputError for a write that failed because of the disk (full, read-only, ...), else None."""
    if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
        where = e.filename or path
        return OutputError(f"cannot write {where}: {_DISK_ERRNOS[e.errno]}; free space, or choose another output path")
    if isinstance(e, (RuntimeError, OSError)) and any(s in str(e) for s in _WRITE_FAILED):
        free = _free_bytes(path.parent)
        why = "no space left on the device" if free is not None and free < 2**20 else "the write failed"
        return OutputError(f"cannot write {path}: {why} ({_free_text(free)} free there; the writer said: "
                           f"{str(e).strip().splitlines()[-1][:200]}); free space, or choose another output path")
    return None


def _raise_disk_error(e: BaseException, path: Path) -> None:
    disk = disk_error(e, path)
    if disk is not None:
        raise disk from e


def _free_bytes(folder: Path) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _free_text(n: int | None) -> str:
    return "unknown space" if n is None else f"{n / 2**20:.1f} MiB"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, owned: Callable[[Path], bool] | None = None,
                what: str = "") -> Iterator[BinaryIO]:
    """Stream a file into place: a binary file object on a temporary beside `path`, published as `path`
    (fsync, rename, fsync of the folder) when the block succeeds.

        with atomic_file(out / "model.safetensors") as f:
            for chunk in chunks:
                f.write(chunk)

    Large files are never built in memory. If the block raises, the temporary is removed and an
    existing `path` is left untouched. owned(path) -> bool, for a file the user named: an existing
    `path` is replaced only if it says the file is `what` (see check_file_replaceable); without it,
    the caller owns `path` (a file inside its own output folder).
    """
    path = Path(path)
    if owned is not None:
        check_file_replaceable(path, owned, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_temporaries(path.parent, path.name)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as e:
        _raise_disk_error(e, path)
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        usual_permissions(tmp)
        if owned is not None:
            check_file_replaceable(path, owned, what)  # again: it may have appeared while we wrote
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        disk = disk_error(e, path)
        if disk is not None:
            raise disk from e
        raise


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


def _aside(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{TAG}-{kind}"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, owned: Owned | None = None) -> Iterator[Path]:
    """Build a folder under a temporary name and publish it as `path` when the block succeeds.

        with atomic_dir(out / "checkpoint-00100") as tmp:
            save_file(tensors, tmp / "trainable.safetensors")

    If the block raises, the temporary folder is removed and an existing `path` is left untouched.
    An existing `path` is replaced only if it holds what this writer writes: `owned`'s files
    (checked before the block runs and again before the swap), or, without `owned`, no entry the
    new folder lacks. The swap happens only after the new folder is complete and fsynced: the new
    folder is renamed to .NAME.lora_engine-new, the old one aside, the new one in, then the old one
    deleted; a kill between any two steps leaves the old or the new folder, which the next write
    of `path` (or recover_dir) puts back under `path`.
    """
    path = Path(path)
    if owned is not None:
        check_dir_replaceable(path, owned)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(path)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    except OSError as e:
        _raise_disk_error(e, path)
        raise
    try:
        yield tmp
        usual_permissions(tmp)
        fsync_tree(tmp)
        if owned is not None:
            check_dir_replaceable(path, owned)
        elif path.is_dir():
            missing = sorted(p.name for p in path.iterdir() if not (tmp / p.name).exists())
            if missing:
                raise refuse(path, "a folder", f"holds {', '.join(missing[:5])}, which this write does not")
        elif path.exists():
            raise refuse(path, "a folder", "is a file")
        _swap(tmp, path)
    except BaseException as e:
        disk = disk_error(e, path)
        shutil.rmtree(tmp, ignore_errors=True)
        if disk is not None:
            raise disk from e
        raise


def _swap(tmp: Path, path: Path) -> None:
    new, old = _aside(path, "new"), _aside(path, "old")
    os.rename(tmp, new)  # from here on the new folder is known complete: recovery may roll forward
    fsync_dir(path.parent)
    if path.exists():
        os.rename(path, old)
    os.rename(new, path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)


def recover_dir(path: str | os.PathLike) -> None:
    """Finish or undo a folder swap (see atomic_dir) that a kill interrupted, and delete dead temporaries.

    Without `path`: the complete new folder goes in if it is there, else the old one comes back.
    With `path` in place: what a finished or abandoned swap left beside it is deleted. Readers of a
    folder that atomic_dir writes call this first; it never touches anything but our own names.
    """
    path = Path(path)
    new, old = _aside(path, "new"), _aside(path, "old")
    legacy = path.parent / f".{path.name}.old"  # what versions before the -new step left
    if not path.exists() and not path.is_symlink():
        for src in (new, old, legacy):
            if src.is_dir():
                os.rename(src, path)
                break
    if path.exists():
        for leftover in (new, old):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
    clean_temporaries(path.parent, path.name)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # a write of ours still running (another thread); our failures remove their own
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def clean_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove the temporaries that interrupted writes left in `folder` (of target `name` only, if given).

    Only our own names (.NAME.lora_engine-PID-XXXXXXXX.tmp) whose process PID is gone: a write
    running now in another process keeps its temporary. Returns what was removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*.{TAG}-*.tmp"):
        m = _TEMP.match(p.name)
        if not m or (name is not None and m.group("name") != name) or _alive(int(m.group("pid"))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        removed.append(p)
    return removed
