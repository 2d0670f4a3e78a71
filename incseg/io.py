"""Atomic files, content keys and locks: the primitives every cache and result file uses.

A file that matters (checkpoint, cache entry, results) is written to a temporary sibling and
renamed into place, so a reader sees either the old complete file or the new complete file,
never a prefix — even when the process is killed (SIGKILL) in the middle of the write.

A write that fails for a reason the user can fix (a full disk, a read-only or foreign folder, a
file where a folder should be) raises :class:`incseg.errors.StorageError` with one line that
names the file and the fix; the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

from incseg import __version__, faults
from incseg.errors import StorageError

#: errno values that mean "this location cannot be written", not "the code is wrong"
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
NOT_A_FOLDER = frozenset({errno.ENOTDIR, errno.EEXIST})
STORAGE_ERRNOS = NO_SPACE | NOT_WRITABLE | NOT_A_FOLDER

WHERE_HINT = "paths.cache_dir=DIR for caches, hydra.run.dir=DIR for run outputs"


def is_storage_error(err: BaseException) -> bool:
    """Whether ``err`` says "this location cannot be written" rather than "the code is wrong".

    EEXIST counts only when a *file* is in the way (``mkdir -p`` over a file); EEXIST for an
    existing folder is a bug in the caller, and keeps its traceback.
    """
    if not isinstance(err, OSError) or err.errno not in STORAGE_ERRNOS:
        return False
    if err.errno == errno.EEXIST:
        if err.filename is None:
            return False
        blocker = _blocker(Path(err.filename))
        return blocker.exists() and not blocker.is_dir()
    return True


def storage_error(err: OSError, path: str | os.PathLike | None = None) -> StorageError:
    """A one-line :class:`StorageError` for an ``OSError`` met while writing ``path``.

    ``path`` defaults to the file the error names; an error raised by a write on an open file
    (a logger's ``fh.write``) names none, hence the fallback wording.
    """
    target = path if path is not None else err.filename
    culprit = err.filename if err.filename is not None else target
    what = str(target) if target is not None else "a file of this run"
    if err.errno in NO_SPACE:
        return StorageError(f"no space left on device while writing {what}; free some space "
                            f"or write elsewhere ({WHERE_HINT})")
    if err.errno in NOT_WRITABLE:
        who = f"{culprit} is not writable" if culprit is not None else "it is not writable"
        return StorageError(f"cannot write {what}: {who} ({err.strerror}); fix its permissions "
                            f"or write elsewhere ({WHERE_HINT})")
    if err.errno in NOT_A_FOLDER and culprit is not None:
        return StorageError(f"cannot write {what}: {_blocker(Path(culprit))} is a file where "
                            f"a folder is needed; remove it or write elsewhere ({WHERE_HINT})")
    return StorageError(f"cannot write {what}: {err.strerror or err}; write elsewhere "
                        f"({WHERE_HINT})")


@contextlib.contextmanager
def _reported(path: str | os.PathLike) -> Iterator[None]:
    """Turn a storage ``OSError`` inside the block into a :class:`StorageError` for ``path``."""
    try:
        yield
    except OSError as err:
        if not is_storage_error(err):
            raise
        raise storage_error(err, path) from None


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p path`` with a one-line :class:`StorageError` when it cannot be created."""
    path = Path(path)
    with _reported(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def ensure_writable_dir(path: str | os.PathLike, what: str, fix: str) -> Path:
    """Create ``path`` if needed and prove that a file can be written in it, before any work
    starts (fail fast, not after an hour of training). ``fix`` names the setting to change."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if not is_storage_error(err):
            raise
        if err.errno in NO_SPACE:
            reason = "no space left on device"
        elif err.errno in NOT_A_FOLDER:
            reason = f"{_blocker(path)} is a file, not a folder"
        else:
            reason = f"{err.filename or path} is not writable: {err.strerror}"
        raise StorageError(f"the {what} {path} cannot be written ({reason}); use {fix}") from None
    return path


def _blocker(path: Path) -> Path:
    """The nearest existing ancestor of ``path`` (itself included) that is not a folder: the
    file that makes ``mkdir -p path`` fail with ENOTDIR or EEXIST."""
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            return p
    return path


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
    make_dirs(path.parent)
    with _reported(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _reported(path):
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            faults.before_rename(path)
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        faults.after_write(path)
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
    make_dirs(path.parent)
    with _reported(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with _reported(path):
            yield tmp
            _fsync_dir(tmp)
            if path.exists():
                # Someone else finished the same entry first (content-keyed: same content).
                shutil.rmtree(tmp)
            else:
                faults.before_rename(path)
                os.replace(tmp, path)
        _fsync_dir(path.parent)
        faults.after_write(path)
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
    lock = Path(str(path) + ".lock")
    make_dirs(lock.parent)
    # FileLock creates its file only on acquire, deep inside a `with`; touch it here so an
    # unwritable cache folder is reported (one line) where the entry is named.
    with _reported(path), open(lock, "a"):
        pass
    return FileLock(str(lock), timeout=timeout)
