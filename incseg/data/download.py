"""Fetch a benchmark's official archives, check them, unpack them, and run ``prepare``.

The archives (URL, published checksum, the folder each must create) are data, in
``archives.yaml`` beside this file, overridable with ``download.table=PATH`` or
``INCSEG_ARCHIVES=PATH``. Per archive, in this order, each step skipped when already done:

1. free-space check for everything still to fetch and unpack (before the first byte);
2. download to ``data.root/downloads/<name>.part``; an interrupted download resumes with an
   HTTP Range request (servers that ignore Range send the whole file: it restarts);
3. checksum of the complete file, then ``.part`` renamed to ``<name>`` (a file under its final
   name has passed the check, or was placed there by hand and is checked the same way);
4. unpacked into a temporary folder inside ``data.root``, the folder ``creates`` checked, then
   renamed into place, so ``data.root/<creates>`` is complete or absent.

torchvision's ``download_and_extract_archive`` (``VOCSegmentation(download=True)``) does 2-4
without resume, free-space check or atomic unpacking; MiB's and PLOP's ``data/download_*.sh``
are plain ``wget`` + ``unzip``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from incseg.errors import ConfigError, DataError, StorageError
from incseg.io import NO_SPACE, entry_lock, make_dirs

log = logging.getLogger(__name__)

TABLE = Path(__file__).with_name("archives.yaml")
TABLE_ENV = "INCSEG_ARCHIVES"
CHUNK = 1 << 20
TIMEOUT_S = 60.0  # a firewalled node drops packets: without a timeout urlopen waits forever
HASHES = ("md5", "sha1", "sha256")


@dataclass(frozen=True)
class Archive:
    name: str
    url: str
    algo: str  # one of HASHES
    digest: str
    creates: str
    size: int = 0
    unpacked: int = 0


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def load_table(path: str | os.PathLike | None = None) -> tuple[Path, dict[str, list[Archive]]]:
    """The archive table: ``path``, else ``$INCSEG_ARCHIVES``, else the one shipped here."""
    path = Path(path or os.environ.get(TABLE_ENV) or TABLE).expanduser()
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"archive table {path} does not exist; pass download.table=PATH (or "
                          f"{TABLE_ENV}=PATH) naming a YAML file laid out as {TABLE}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"archive table {path} is not YAML ({err.__class__.__name__}); "
                          f"lay it out as {TABLE}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"archive table {path} is not a mapping of dataset names to archive "
                          f"lists; lay it out as {TABLE}")
    table: dict[str, list[Archive]] = {}
    for dataset, items in raw.items():
        table[dataset] = []
        for i, item in enumerate(items or []):
            algos = [a for a in HASHES if isinstance(item, dict) and item.get(a)]
            if (not isinstance(item, dict) or len(algos) != 1
                    or not all(item.get(k) for k in ("name", "url", "creates"))):
                raise ConfigError(
                    f"archive table {path}: entry {i} of {dataset} needs name, url, creates and "
                    f"one checksum ({' or '.join(HASHES)}); lay it out as {TABLE}")
            try:
                size = int(float(item.get("size", 0)))
                unpacked = int(float(item.get("unpacked", 0)))
            except (TypeError, ValueError):
                raise ConfigError(f"archive table {path}: size and unpacked of {item['name']} "
                                  "must be numbers of bytes") from None
            table[dataset].append(Archive(str(item["name"]), str(item["url"]), algos[0],
                                          str(item[algos[0]]).lower(), str(item["creates"]),
                                          size, unpacked))
    return path, table


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def _manual(archive: Archive, downloads: Path) -> str:
    return (f"download it by hand from {archive.url} (a browser, wget -c) into "
            f"{downloads / archive.name} and rerun")


def _free_space_check(root: Path, todo: list[Archive], downloads: Path) -> None:
    """Refuse before the first byte when the archives still to fetch and unpack do not fit."""
    need = 0
    for a in todo:
        have = 0
        for p in (downloads / a.name, downloads / f"{a.name}.part"):
            if p.is_file():
                have = p.stat().st_size
        need += max(a.size - have, 0) + a.unpacked
    free = shutil.disk_usage(root).free
    if need > free:
        raise StorageError(
            f"not enough free space in {root}: the archives {', '.join(a.name for a in todo)} "
            f"need about {_gb(need)} (download and unpacked) and {_gb(free)} is free; free some "
            "space or pass another data.root=DIR")


def fetch(archive: Archive, dest: Path, progress: bool = True) -> int:
    """Download ``archive.url`` to ``dest`` (``<name>.part``), resuming what is there.

    Returns the bytes received by this call. Raises DataError (one line) when the server cannot
    be reached or the transfer stops early; the ``.part`` file stays for the next try.
    """
    have = dest.stat().st_size if dest.exists() else 0
    request = urllib.request.Request(archive.url, headers={"User-Agent": "incseg"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the range starts at the end: the file is complete
            return 0
        raise DataError(f"cannot download {archive.url} (HTTP {err.code} {err.reason}); "
                        f"check the URL in the archive table, or {_manual(archive, dest.parent)}"
                        ) from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise DataError(f"cannot reach {archive.url} ({reason}); check the network, or "
                        f"{_manual(archive, dest.parent)}") from None
    received = 0
    with response:
        if have and response.status != 206:  # Range ignored: the whole file comes again
            have = 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=archive.name, disable=not progress or None, leave=False)
        try:
            with open(dest, "ab" if have else "wb") as out:
                while True:
                    try:
                        block = response.read(CHUNK)
                    except OSError as err:  # TimeoutError and ConnectionResetError included
                        raise DataError(
                            f"the download of {archive.url} stopped after "
                            f"{_gb(have + received)} ({err}); rerun the same command to resume "
                            f"it from {dest}") from None
                    if not block:
                        break
                    try:
                        out.write(block)
                    except OSError as err:
                        if err.errno in NO_SPACE:
                            raise StorageError(
                                f"no space left on device while downloading {dest}; free some "
                                "space and rerun the same command to resume it, or pass "
                                "another data.root=DIR") from None
                        raise
                    received += len(block)
                    bar.update(len(block))
        finally:
            bar.close()
    if total is not None and have + received < total:
        # http.client returns b"" when the connection closes early, without an exception
        raise DataError(f"the download of {archive.url} stopped after {have + received} of "
                        f"{total} bytes (the connection closed); rerun the same command to "
                        f"resume it from {dest}")
    return received


def verify(archive: Archive, path: Path) -> None:
    got = file_digest(path, archive.algo)
    if got != archive.digest:
        raise DataError(
            f"{path} has {archive.algo} {got} but {archive.name} is published with "
            f"{archive.digest}: a corrupt download or another file; delete {path} and rerun to "
            "download it again (nothing else was changed)")


def _is_archive(path: Path) -> bool:
    return zipfile.is_zipfile(path) or tarfile.is_tarfile(path)


def _extract_tar(t: tarfile.TarFile, dest: Path, archive: Archive, path: Path) -> None:
    """Refuse absolute paths, ``..``, links out of the folder and device files (CVE-2007-4559):
    tarfile's "data" filter where Python has it (3.10.12, 3.11.4, 3.12), else the same rules
    checked here."""
    if hasattr(tarfile, "data_filter"):
        t.extractall(dest, filter="data")
        return
    for m in t.getmembers():
        name = Path(m.name)
        target = Path(m.linkname) if m.issym() or m.islnk() else Path()
        if (name.is_absolute() or ".." in name.parts or target.is_absolute()
                or ".." in target.parts or m.isdev()):
            raise DataError(f"{path} holds a member outside its folder or a device file "
                            f"({m.name}); it is not {archive.name}")
    t.extractall(dest)


def unpack(archive: Archive, path: Path, root: Path) -> Path:
    """Unpack ``path`` beside the target and rename ``archive.creates`` to ``root/creates``."""
    target = root / archive.creates
    if not _is_archive(path):
        raise DataError(f"{path} is neither a tar nor a zip archive, so it is not "
                        f"{archive.name}; delete it and rerun, or fix the archive table")
    make_dirs(target.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.", suffix=".unpack", dir=root))
    try:
        try:
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as z:
                    for m in z.namelist():  # ZipFile sanitises names, but say so, don't strip
                        if m.startswith("/") or ".." in Path(m).parts:
                            raise DataError(f"{path} holds a member outside its folder ({m}); "
                                            f"it is not {archive.name}")
                    z.extractall(tmp)
            else:
                with tarfile.open(path) as t:
                    _extract_tar(t, tmp, archive, path)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as err:
            raise DataError(f"{path} cannot be unpacked ({err}); it is not a complete "
                            f"{archive.name}: delete it and rerun") from None
        except OSError as err:
            if err.errno in NO_SPACE:
                raise StorageError(f"no space left on device while unpacking {path} into "
                                   f"{root} (nothing was kept); free some space and rerun, or "
                                   "pass another data.root=DIR") from None
            raise
        made = tmp / archive.creates
        if not made.is_dir():
            top = sorted(p.name for p in tmp.iterdir())[:5]
            raise DataError(f"{path} holds no {archive.creates}/ (its top level: "
                            f"{', '.join(top) or 'nothing'}), so it is not {archive.name}; "
                            "delete it and rerun, or fix the archive table")
        os.replace(made, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def download(dataset: str, root: str | os.PathLike | None, table: str | os.PathLike | None = None,
             progress: bool = True) -> dict:
    """Fetch, verify and unpack every archive of ``dataset`` into ``root``; what was done."""
    table_path, archives = load_table(table)
    if dataset not in archives:
        hint = " (shapes is generated, not downloaded)" if dataset == "shapes" else ""
        raise ConfigError(f"nothing to download for dataset {dataset}{hint}; the archive table "
                          f"{table_path} lists: {', '.join(sorted(archives))}")
    if root is None or str(root) in ("", "None", "null"):
        raise ConfigError(f"download needs data.root=DIR, the folder the {dataset} archives are "
                          "unpacked into")
    root = make_dirs(Path(os.path.expanduser(str(root))))
    downloads = root / "downloads"
    todo = [a for a in archives[dataset] if not (root / a.creates).is_dir()]
    _free_space_check(root, todo, downloads)
    report = []
    for a in archives[dataset]:
        final, part = downloads / a.name, downloads / f"{a.name}.part"
        # two commands on the same data.root (a sweep's jobs) must not append to one .part
        with entry_lock(final):
            if (root / a.creates).is_dir():
                report.append({"archive": a.name, "status": "already unpacked"})
                continue
            received = 0
            if not final.is_file():
                received = fetch(a, part, progress)
                log.info("checking the %s of %s", a.algo, part)
                verify(a, part)
                os.replace(part, final)
            else:
                log.info("checking the %s of %s", a.algo, final)
                verify(a, final)
            log.info("unpacking %s into %s", final, root)
            unpack(a, final, root)
        report.append({"archive": a.name, "status": "unpacked", "bytes_received": received})
    return {"dataset": dataset, "root": str(root), "table": str(table_path), "archives": report}
