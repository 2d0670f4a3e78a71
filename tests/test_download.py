"""`python -m incseg.data download`: archives served from 127.0.0.1, built by the tests in the
VOC / SBD / ADE20K layouts, with the checksum table overridden."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import yaml
from PIL import Image

from incseg.data.__main__ import main

from .conftest import draw_mask, write_sample
from .http_server import FileServer, closed_port

VOC_TRAIN = {"a": [1], "b": [16]}
VOC_VAL = {"t1": [1], "t2": [16], "t3": [20]}
SBD = {"s1": [3], "s2": [17, 20], "t1": [1]}  # t1 is VOC val: never in train_aug


def _tar(src: Path, mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for top in sorted(src.iterdir()):
            t.add(top, arcname=top.name)
    return buf.getvalue()


def voc_tar(tmp: Path) -> bytes:
    """VOCtrainval's layout: VOCdevkit/VOC2012 with VOC's own train/val lists and masks; the
    SBD-only images are in JPEGImages as in the real release."""
    base = tmp / "voc" / "VOCdevkit" / "VOC2012"
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "Annotations"):
        (base / d).mkdir(parents=True)
    for sid, cl in {**VOC_TRAIN, **VOC_VAL}.items():
        write_sample(base, "SegmentationClass", sid, cl)
    for sid, cl in SBD.items():
        if sid not in VOC_VAL:
            write_sample(base, "SegmentationClass", sid, cl)
            (base / "SegmentationClass" / f"{sid}.png").unlink()  # SBD's mask only
    seg = base / "ImageSets" / "Segmentation"
    (seg / "train.txt").write_text("".join(f"{s}\n" for s in VOC_TRAIN))
    (seg / "val.txt").write_text("".join(f"{s}\n" for s in VOC_VAL))
    return _tar(tmp / "voc", "w")


def sbd_tgz(tmp: Path) -> bytes:
    ds = tmp / "sbd" / "benchmark_RELEASE" / "dataset"
    (ds / "cls").mkdir(parents=True)
    for sid, cl in SBD.items():
        gt = {"Segmentation": draw_mask(cl), "Boundaries": np.zeros(1),
              "CategoriesPresent": np.array(cl)}
        scipy.io.savemat(ds / "cls" / f"{sid}.mat", {"GTcls": gt})
    (ds / "train.txt").write_text("s1\nt1\n")
    (ds / "val.txt").write_text("s2\n")
    return _tar(tmp / "sbd", "w:gz")


def ade_zip(tmp: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for split, n in (("training", 3), ("validation", 2)):
            for i in range(n):
                img, ann = io.BytesIO(), io.BytesIO()
                Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(img, "JPEG")
                Image.fromarray(np.full((16, 16), i + 1, np.uint8)).save(ann, "PNG")
                z.writestr(f"ADEChallengeData2016/images/{split}/ADE_{split}_{i}.jpg",
                           img.getvalue())
                z.writestr(f"ADEChallengeData2016/annotations/{split}/ADE_{split}_{i}.png",
                           ann.getvalue())
    return buf.getvalue()


Site = namedtuple("Site", "server table archives")


def write_table(path: Path, server: FileServer, archives: dict[str, bytes],
                creates: dict[str, str], base: str | None = None) -> Path:
    """An archive table naming the test server's URLs and the served bytes' md5s."""
    datasets = {"VOCtrainval_11-May-2012.tar": "voc", "benchmark.tgz": "voc",
                "ADEChallengeData2016.zip": "ade"}
    table: dict[str, list] = {"voc": [], "ade": []}
    for name, data in archives.items():
        table[datasets[name]].append({
            "name": name, "url": f"{base or server.base}/{name}",
            "md5": hashlib.md5(data).hexdigest(),
            "creates": creates[name], "size": len(data), "unpacked": 2 * len(data)})
    path.write_text(yaml.safe_dump(table))
    return path


CREATES = {"VOCtrainval_11-May-2012.tar": "VOCdevkit/VOC2012", "benchmark.tgz": "benchmark_RELEASE",
           "ADEChallengeData2016.zip": "ADEChallengeData2016"}


@pytest.fixture
def site(tmp_path):
    archives = {"VOCtrainval_11-May-2012.tar": voc_tar(tmp_path / "build"),
                "benchmark.tgz": sbd_tgz(tmp_path / "build"),
                "ADEChallengeData2016.zip": ade_zip(tmp_path / "build")}
    server = FileServer({f"/{k}": v for k, v in archives.items()}).start()
    table = write_table(tmp_path / "archives.yaml", server, archives, CREATES)
    yield Site(server, table, archives)
    server.stop()


def run(capsys, *args: str) -> dict:
    main(["download", *args])
    return json.loads(capsys.readouterr().out)


def fails(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["download", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_voc_download_unpacks_and_prepares_train_aug(site, tmp_path, capsys):
    root = tmp_path / "data"
    out = run(capsys, "dataset=voc", f"data.root={root}", f"download.table={site.table}")
    assert [a["status"] for a in out["archives"]] == ["unpacked", "unpacked"]
    assert out["archives"][0]["bytes_received"] == len(site.archives["VOCtrainval_11-May-2012.tar"])
    # prepare ran: train_aug = (SBD train+val | VOC train) - VOC val, SBD's masks converted
    assert out["prepare"] == {"dataset": "voc", "train_aug": 4, "val": 3, "built": True}
    seg = root / "VOCdevkit/VOC2012/ImageSets/Segmentation"
    assert (seg / "train_aug.txt").read_text().split() == ["a", "b", "s1", "s2"]
    s2 = np.asarray(Image.open(root / "VOCdevkit/VOC2012/SegmentationClassAug/s2.png"))
    assert set(np.unique(s2)) == {0, 17, 20, 255}
    assert (root / "downloads" / "benchmark.tgz").is_file()
    assert not list(root.glob(".*unpack")) and not list(root.rglob("*.part"))
    # the next command reads the dataset: per-step counts of 15-5 on it
    main(["stats", "dataset=voc", f"data.root={root}", "task=15-5",
          f"paths.cache_dir={tmp_path / 'cache'}"])
    stats = json.loads(capsys.readouterr().out)
    assert [s["train_images"] for s in stats["steps"]] == [2, 2]  # a, s1 | b, s2 (overlap)
    # a second run finds everything unpacked and sends no request
    n = len(site.server.log)
    again = run(capsys, "dataset=voc", f"data.root={root}", f"download.table={site.table}")
    assert [a["status"] for a in again["archives"]] == ["already unpacked"] * 2
    assert len(site.server.log) == n and again["prepare"]["built"] is False


def test_ade_download_unpacks_and_checks_the_layout(site, tmp_path, capsys):
    out = run(capsys, "dataset=ade", f"data.root={tmp_path / 'd'}", f"download.table={site.table}")
    assert out["prepare"] == {"dataset": "ade", "training": 3, "validation": 2, "built": False}


def test_a_cut_download_resumes_with_a_range_request(site, tmp_path, capsys):
    root, name = tmp_path / "data", "VOCtrainval_11-May-2012.tar"
    size, cut = len(site.archives[name]), len(site.archives[name]) // 3
    site.server.cut_after = cut
    line = fails(capsys, "dataset=voc", f"data.root={root}", f"download.table={site.table}")
    part = root / "downloads" / f"{name}.part"
    assert line == (f"error: the download of {site.server.base}/{name} stopped after {cut} of "
                    f"{size} bytes (the connection closed); rerun the same command to resume it "
                    f"from {part}")
    assert part.stat().st_size == cut and not (root / "VOCdevkit").exists()
    run(capsys, "dataset=voc", f"data.root={root}", f"download.table={site.table}")
    resumed = [r for r in site.server.log if r.path == f"/{name}"][1]
    assert resumed.range == f"bytes={cut}-" and resumed.status == 206
    assert resumed.bytes_sent == size - cut < size
    assert (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt").is_file()


def test_a_server_ignoring_range_restarts_the_file(site, tmp_path, capsys):
    root, name = tmp_path / "data", "ADEChallengeData2016.zip"
    (root / "downloads").mkdir(parents=True)
    (root / "downloads" / f"{name}.part").write_bytes(b"stale bytes of another try")
    site.server.honour_range = False
    out = run(capsys, "dataset=ade", f"data.root={root}", f"download.table={site.table}")
    assert out["archives"][0]["bytes_received"] == len(site.archives[name])  # all, from 0


def test_a_corrupt_archive_is_refused_and_nothing_else_is_touched(site, tmp_path, capsys):
    root, name = tmp_path / "data", "benchmark.tgz"
    good = hashlib.md5(site.archives[name]).hexdigest()
    bad = bytearray(site.archives[name])
    bad[len(bad) // 2] ^= 0xFF
    site.server.files[f"/{name}"] = bytes(bad)
    line = fails(capsys, "dataset=voc", f"data.root={root}", f"download.table={site.table}")
    part = root / "downloads" / f"{name}.part"
    assert line == (f"error: {part} has md5 {hashlib.md5(bad).hexdigest()} but {name} is "
                    f"published with {good}: a corrupt download or another file; delete {part} "
                    "and rerun to download it again (nothing else was changed)")
    assert part.read_bytes() == bytes(bad)  # kept, for the user to look at
    # the VOC archive before it was verified and unpacked; no SBD folder, no train_aug
    assert (root / "VOCdevkit/VOC2012/JPEGImages").is_dir()
    assert (root / "downloads" / "VOCtrainval_11-May-2012.tar").is_file()
    assert not (root / "benchmark_RELEASE").exists()
    assert not (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt").exists()


def test_without_network_the_line_names_the_url_and_the_manual_way(site, tmp_path, capsys):
    root = tmp_path / "data"
    base = f"http://127.0.0.1:{closed_port()}"
    table = write_table(tmp_path / "offline.yaml", site.server, site.archives, CREATES, base=base)
    line = fails(capsys, "dataset=ade", f"data.root={root}", f"download.table={table}")
    url, dest = f"{base}/ADEChallengeData2016.zip", root / "downloads/ADEChallengeData2016.zip"
    assert line == (f"error: cannot reach {url} ([Errno 111] Connection refused); check the "
                    f"network, or download it by hand from {url} (a browser, wget -c) into "
                    f"{dest} and rerun")
    # the manual way: the file placed there is checked and used, with no network
    dest.write_bytes(site.archives["ADEChallengeData2016.zip"])
    out = run(capsys, "dataset=ade", f"data.root={root}", f"download.table={table}")
    assert out["archives"][0] == {"archive": "ADEChallengeData2016.zip", "status": "unpacked",
                                  "bytes_received": 0}


def test_a_full_disk_is_refused_before_the_first_byte(site, tmp_path, capsys, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    root = tmp_path / "data"
    line = fails(capsys, "dataset=voc", f"data.root={root}", f"download.table={site.table}")
    need = 3 * (len(site.archives["VOCtrainval_11-May-2012.tar"])
                + len(site.archives["benchmark.tgz"]))
    assert line == (f"error: not enough free space in {root}: the archives "
                    "VOCtrainval_11-May-2012.tar, benchmark.tgz need about "
                    f"{need / 1e9:.1f} GB (download and unpacked) and 0.0 GB is free; free some "
                    "space or pass another data.root=DIR")
    assert site.server.log == [] and not (root / "downloads").exists()


def test_a_disk_filling_up_during_the_download_or_the_unpacking(site, tmp_path, capsys,
                                                                 monkeypatch):
    import errno

    from incseg.data import download as dl

    root, name = tmp_path / "data", "ADEChallengeData2016.zip"
    real_open = open

    class Full:  # a file whose disk fills up after the first 100 bytes
        def __init__(self, *a):
            self.fh, self.n = real_open(*a), 0

        def write(self, block):
            if self.n + len(block) > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.n += len(block)
            return self.fh.write(block)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(dl, "open", Full, raising=False)
    line = fails(capsys, "dataset=ade", f"data.root={root}", f"download.table={site.table}")
    part = root / "downloads" / f"{name}.part"
    assert line == (f"error: no space left on device while downloading {part}; free some space "
                    "and rerun the same command to resume it, or pass another data.root=DIR")
    assert part.exists()  # kept for the rerun to resume
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(zipfile.ZipFile, "extractall", full)
    line = fails(capsys, "dataset=ade", f"data.root={root}", f"download.table={site.table}")
    assert line == (f"error: no space left on device while unpacking {root / 'downloads' / name} "
                    f"into {root} (nothing was kept); free some space and rerun, or pass another "
                    "data.root=DIR")
    assert sorted(p.name for p in root.iterdir()) == ["downloads"]  # no half-unpacked folder
    assert (root / "downloads" / name).is_file()  # verified: the rerun unpacks, no download


def test_an_archive_that_is_not_what_it_claims(site, tmp_path, capsys):
    root = tmp_path / "data"
    # the right checksum in the table, but the archive holds no ADEChallengeData2016/
    wrong = voc_tar(tmp_path / "other")
    site.server.files["/ADEChallengeData2016.zip"] = wrong
    table = write_table(tmp_path / "t.yaml", site.server,
                        {**site.archives, "ADEChallengeData2016.zip": wrong}, CREATES)
    line = fails(capsys, "dataset=ade", f"data.root={root}", f"download.table={table}")
    path = root / "downloads/ADEChallengeData2016.zip"
    assert line == (f"error: {path} holds no ADEChallengeData2016/ (its top level: VOCdevkit), "
                    "so it is not ADEChallengeData2016.zip; delete it and rerun, or fix the "
                    "archive table")
    assert sorted(p.name for p in root.iterdir()) == ["downloads"]  # nothing half-unpacked
    # an HTML error page where an archive should be
    page = b"<html><body>503 Service Unavailable</body></html>"
    site.server.files["/ADEChallengeData2016.zip"] = page
    path.unlink()
    table = write_table(tmp_path / "t.yaml", site.server,
                        {**site.archives, "ADEChallengeData2016.zip": page}, CREATES)
    line = fails(capsys, "dataset=ade", f"data.root={root}", f"download.table={table}")
    assert line == (f"error: {path} is neither a tar nor a zip archive, so it is not "
                    "ADEChallengeData2016.zip; delete it and rerun, or fix the archive table")


def test_bad_requests_are_one_line(site, tmp_path, capsys, monkeypatch):
    line = fails(capsys, "dataset=shapes", f"data.root={tmp_path}", f"download.table={site.table}")
    assert line == ("error: nothing to download for dataset shapes (shapes is generated, not "
                    f"downloaded); the archive table {site.table} lists: ade, voc")
    line = fails(capsys, "dataset=voc", f"download.table={site.table}")
    assert line == ("error: download needs data.root=DIR, the folder the voc archives are "
                    "unpacked into")
    missing = tmp_path / "missing.yaml"
    write_table(missing, site.server, site.archives, CREATES, base=f"{site.server.base}/gone")
    line = fails(capsys, "dataset=ade", f"data.root={tmp_path / 'd'}", f"download.table={missing}")
    url = f"{site.server.base}/gone/ADEChallengeData2016.zip"
    assert line == (f"error: cannot download {url} (HTTP 404 Not Found); check the URL in the "
                    f"archive table, or download it by hand from {url} (a browser, wget -c) into "
                    f"{tmp_path / 'd/downloads/ADEChallengeData2016.zip'} and rerun")
    with pytest.raises(SystemExit):
        main(["stats", "dataset=voc", f"download.table={site.table}"])
    assert capsys.readouterr().err.strip() == ("error: download.table=PATH is read by `python -m "
                                               "incseg.data download` only")
    monkeypatch.setenv("INCSEG_ARCHIVES", str(tmp_path / "none.yaml"))
    line = fails(capsys, "dataset=voc", f"data.root={tmp_path}")
    assert line.startswith(f"error: archive table {tmp_path / 'none.yaml'} does not exist; pass "
                           "download.table=PATH")


def test_the_shipped_table_holds_the_published_checksums():
    from incseg.data.download import load_table

    _, table = load_table()
    got = {a.name: (a.algo, a.digest, a.creates) for d in table.values() for a in d}
    assert got == {  # torchvision's voc.py / sbd.py; GluonCV's ade20k.py
        "VOCtrainval_11-May-2012.tar": ("md5", "6cd6e144f989b92b3379bac3b3de84fd",
                                        "VOCdevkit/VOC2012"),
        "benchmark.tgz": ("md5", "82b4d87ceb2ed10f6038a1cba92111cb", "benchmark_RELEASE"),
        "ADEChallengeData2016.zip": ("sha1", "219e1696abb36c8ba3a3afe7fb2f4b4606a897c7",
                                     "ADEChallengeData2016"),
    }


# ---- ImageNet weights: torchvision's file into the torch hub cache -----------------------------

@pytest.fixture
def weights_site(tmp_path, monkeypatch):
    """torchvision's resnet18 file layout (fc included), served from 127.0.0.1 under a name that
    carries its sha256 prefix as torchvision's do, with the weights enum's URL pointed there."""
    import dataclasses
    import types

    import torch
    import torchvision

    from incseg.models import backbones

    torch.manual_seed(0)
    state = torchvision.models.resnet18(weights=None).state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    name = f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    server = FileServer({f"/models/{name}": data}).start()
    spec = backbones.RESNETS["resnet18"]
    url = f"{server.base}/models/{name}"
    monkeypatch.setitem(backbones.RESNETS, "resnet18",
                        dataclasses.replace(spec, weights=types.SimpleNamespace(url=url)))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("INCSEG_OFFLINE", raising=False)
    yield types.SimpleNamespace(server=server, state=state, name=name, url=url,
                                hub=tmp_path / "torch" / "hub" / "checkpoints")
    server.stop()


def test_imagenet_weights_are_downloaded_hash_checked_then_read_offline(weights_site,
                                                                         monkeypatch):
    import torch

    from incseg.config import compose
    from incseg.models import build_model
    from incseg.protocol.preflight import check_run

    # the run's check, before anything runs, fetches the file into the hub cache
    check_run(compose(["model=bisenet_r18", "model.pretrained=imagenet"]))
    path = weights_site.hub / weights_site.name
    assert path.is_file() and [r.status for r in weights_site.server.log] == [200]
    assert not [p for p in weights_site.hub.iterdir() if p != path]  # no .partial left
    # present: read from the cache, offline, with no second request
    weights_site.server.stop()
    monkeypatch.setenv("INCSEG_OFFLINE", "1")
    model = build_model("bisenet_r18", [21], pretrained="imagenet")
    torch.testing.assert_close(model.backbone.layer4[1].conv2.weight,
                               weights_site.state["layer4.1.conv2.weight"])
    assert len(weights_site.server.log) == 1


def test_imagenet_weights_that_do_not_match_their_hash_are_not_kept(weights_site, monkeypatch):
    import dataclasses
    import types

    from incseg.errors import ConfigError
    from incseg.models import backbones

    data = weights_site.server.files.pop(f"/models/{weights_site.name}")
    url = f"{weights_site.server.base}/models/resnet18-00000000.pth"
    weights_site.server.files["/models/resnet18-00000000.pth"] = data
    spec = backbones.RESNETS["resnet18"]
    monkeypatch.setitem(backbones.RESNETS, "resnet18",
                        dataclasses.replace(spec, weights=types.SimpleNamespace(url=url)))
    with pytest.raises(ConfigError) as e:
        backbones.pretrained_file("resnet18", "imagenet")
    got = hashlib.sha256(data).hexdigest()
    assert str(e.value) == (
        f"model.pretrained=imagenet: the file downloaded from {url} does not match the sha256 "
        f'prefix in its name (invalid hash value (expected "00000000", got "{got}")) and was '
        f"not kept; rerun to download it again, or place resnet18-00000000.pth (from {url}) in "
        f"{weights_site.hub}/, or set model.pretrained=null (or none) to train from scratch")
    assert list(weights_site.hub.iterdir()) == []


def test_imagenet_weights_offline_and_missing_is_one_line(weights_site, monkeypatch, capsys):
    import dataclasses
    import types

    from incseg.models import backbones
    from incseg.run import main as run_main

    url = f"http://127.0.0.1:{closed_port()}/models/{weights_site.name}"
    spec = backbones.RESNETS["resnet18"]
    monkeypatch.setitem(backbones.RESNETS, "resnet18",
                        dataclasses.replace(spec, weights=types.SimpleNamespace(url=url)))
    tmp = weights_site.hub.parents[2]  # the test's tmp_path
    monkeypatch.setattr("sys.argv", ["incseg.run", "experiment=smoke", "model.pretrained=imagenet",
                                     f"paths.runs_dir={tmp / 'runs'}",
                                     f"paths.cache_dir={tmp / 'cache'}"])
    with pytest.raises(SystemExit) as exc:
        run_main()
    assert exc.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        "error: model.pretrained=imagenet: the ImageNet weights of resnet18 are not in the torch "
        f"hub cache ({weights_site.hub / weights_site.name} is missing) and cannot be downloaded "
        f"([Errno 111] Connection refused); place {weights_site.name} (from {url}) in "
        f"{weights_site.hub}/, or set model.pretrained=null (or none) to train from scratch")
    assert not (tmp / "runs").exists()


def test_a_member_outside_the_archive_folder_is_refused(site, tmp_path, capsys):
    root = tmp_path / "data"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        t.addfile(info, io.BytesIO(b"evil"))
    evil = buf.getvalue()
    site.server.files["/ADEChallengeData2016.zip"] = evil
    table = write_table(tmp_path / "t.yaml", site.server,
                        {**site.archives, "ADEChallengeData2016.zip": evil}, CREATES)
    line = fails(capsys, "dataset=ade", f"data.root={root}", f"download.table={table}")
    path = root / "downloads/ADEChallengeData2016.zip"
    assert line.startswith(f"error: {path} cannot be unpacked (") and "../evil.txt" in line
    assert line.endswith("it is not a complete ADEChallengeData2016.zip: delete it and rerun")
    assert not (root / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert sorted(p.name for p in root.iterdir()) == ["downloads"]
