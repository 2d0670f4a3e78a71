"""Atomic files, content keys and locks: the primitives every cache and result file uses.

A file that matters (checkpoint, cache entry, results) is written to a temporary sibling and
renamed into place, so a reader sees either the old complete file or the new complete file,
never a prefix — even when the process is killed (SIGKILL) in the middle of the write.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from incseg import __version__


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the directory entry is flushed too.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` when the block succeeds.

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; rename it onto ``path`` (which must not exist) on success.

    Used for cache entries that are folders of many files (the ``shapes`` dataset, replay sets):
    the entry appears complete or not at all.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        if path.exists():
            # Someone else finished the same entry first (content-keyed: same content).
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def stable_hash(obj: Any, length: int = 16) -> str:
    """A short hex digest of a JSON-serialisable object, independent of dict key order."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def content_key(kind: str, params: Any, length: int = 16) -> str:
    """Cache key of an entry of ``kind``: a hash of everything it depends on, version included."""
    return stable_hash({"kind": kind, "version": __version__, "params": params}, length)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir(configured: str | os.PathLike | None = None) -> Path:
    """The cache directory: the configured one, else ``$INCSEG_CACHE``, else ~/.cache/incseg."""
    if configured:
        return Path(os.path.expanduser(str(configured)))
    env = os.environ.get("INCSEG_CACHE")
    if env:
        return Path(os.path.expanduser(env))
    return Path.home() / ".cache" / "incseg"


def entry_lock(path: str | os.PathLike, timeout: float = -1) -> FileLock:
    """A lock file beside a cache entry, so parallel sweep jobs fill it once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=timeout)
