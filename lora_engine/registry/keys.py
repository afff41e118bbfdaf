"""The registry key: a private file whose HMAC-SHA256 signs every history entry.

The key is symmetric: whoever checks a signature holds the key and could forge one. It protects
against someone who can write the registry folder but cannot read the key file (mode 0600, owned
by its user); see lora_engine/registry/history.py for what a signature covers.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from lora_engine.registry.names import RegistryError

_KEY_ID_MSG = b"lora_engine registry key id"


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
    """A short public name of the key (an HMAC of a fixed message: it reveals nothing of the key)."""
    return hmac.new(key, _KEY_ID_MSG, hashlib.sha256).hexdigest()[:16]


def sign(key: bytes, digest: str) -> str:
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def signed(key: bytes, digest: str, signature: str | None) -> bool:
    """Whether `signature` is `key`'s signature of `digest` (compared in constant time)."""
    return isinstance(signature, str) and hmac.compare_digest(signature, sign(key, digest))
