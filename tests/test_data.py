"""MiB's selection and remapping rules pinned on a VOC-layout fixture with known classes."""

import numpy as np
import pytest
import torch
from PIL import Image

from incseg.data.datamodule import IncrementalDataModule, step_selection
from incseg.data.dataset import SeededSampler, SegmentationDataset
from incseg.data.index import scan_labels, select_test, select_train
from incseg.data.prepare import save_palette_png
from incseg.data.sources import VOCSource, make_source
from incseg.data.transforms import eval_transform
from incseg.errors import DataError
from incseg.tasks import get_task

from .conftest import TRAIN


def _ids(source, split, idx):
    return sorted(source.samples(split)[i].id for i in idx)


@pytest.fixture
def voc(voc_root):
    return VOCSource(voc_root)


def test_scan_finds_class_sets_with_void(voc, cache):
    labels = scan_labels(voc, "train", cache, progress=False)
    by_id = dict(zip([s.id for s in voc.samples("train")], labels))
    assert by_id["b"] == [0, 1, 16, 255]
    assert by_id["g"] == [0]


@pytest.mark.parametrize("task, step, overlap, expected", [
    ("15-5", 0, True, "abeh"), ("15-5", 0, False, "a"),
    ("15-5", 1, True, "bcdefh"), ("15-5", 1, False, "bcdefh"),
    ("15-5s", 1, True, "bc"), ("15-5s", 1, False, "bc"),
    ("15-5s", 2, True, "dh"), ("15-5s", 2, False, "h"),
    ("15-5s", 5, True, "df"), ("15-5s", 5, False, "df"),
    ("19-1", 0, True, "abcdeh"), ("19-1", 0, False, "abceh"),
    ("19-1", 1, True, "df"), ("19-1", 1, False, "df"),
])
def test_training_selection(voc, cache, task, step, overlap, expected):
    labels = scan_labels(voc, "train", cache, progress=False)
    idx = select_train(labels, get_task("voc", task), step, overlap)
    assert "".join(_ids(voc, "train", idx)) == expected


def test_background_only_and_void_never_select(voc, cache):
    labels = scan_labels(voc, "train", cache, progress=False)
    idx = select_train(labels, get_task("voc", "offline"), 0, True)
    assert "g" not in _ids(voc, "train", idx) and len(idx) == len(TRAIN) - 1


def test_test_selection(voc, cache):
    labels = scan_labels(voc, "test", cache, progress=False)
    t = get_task("voc", "15-5")
    assert _ids(voc, "test", select_test(labels, t, 0)) == ["t1", "t5"]
    assert _ids(voc, "test", select_test(labels, t, 1)) == ["t1", "t2", "t3", "t5"]


def _labels_of(voc, split, sid, lut):
    sample = next(s for s in voc.samples(split) if s.id == sid)
    ds = SegmentationDataset([sample], lut, eval_transform(None, "full"))
    image, mask = ds[0]
    return image, set(mask.unique().tolist())


def test_training_labels_old_future_void(voc):
    t = get_task("voc", "15-5")
    assert _labels_of(voc, "train", "b", t.train_lut(1))[1] == {0, 16}      # old 1 -> 0, void -> 0
    assert _labels_of(voc, "train", "b", t.train_lut(0))[1] == {0, 1}       # future 16 -> 0
    keep_void = t.train_lut(1, void_as_background=False)
    assert _labels_of(voc, "train", "b", keep_void)[1] == {0, 16, 255}
    s = get_task("voc", "15-5s")
    assert _labels_of(voc, "train", "d", s.train_lut(2))[1] == {0, 17}       # 20 is future


def test_test_labels_unseen_ignored_void_kept(voc):
    t = get_task("voc", "15-5")
    assert _labels_of(voc, "test", "t5", t.test_lut(0))[1] == {0, 3, 255}   # 17 unseen -> 255
    assert _labels_of(voc, "test", "t5", t.test_lut(0, "background"))[1] == {0, 3, 255}
    assert _labels_of(voc, "test", "t5", t.test_lut(1))[1] == {0, 3, 17, 255}


def test_datamodule_batches(voc, cache):
    t = get_task("voc", "15-5")
    dm = IncrementalDataModule(voc, t, 1, crop=16, batch_size=2, num_workers=0, cache_dir=cache,
                               progress=False, rotation=30)
    dm.setup()
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 3  # 6 images, batch 2, drop_last
    allowed = {0, 16, 17, 18, 19, 20, 255}
    for image, mask in batches:
        assert image.dtype == torch.float32 and image.shape == (2, 3, 16, 16)
        assert mask.dtype == torch.int64 and mask.shape == (2, 16, 16)
        assert set(mask.unique().tolist()) <= allowed
    # ImageNet-normalised: not in [0, 1]
    assert batches[0][0].min() < 0
    test = list(dm.test_dataloader())
    assert sum(len(b[0]) for b in test) == 4


class _Replay(torch.utils.data.Dataset):
    """Stand-in replay set: item ``(index, seed)`` -> (image, mask) holding the index."""

    def __len__(self):
        return 4

    def __getitem__(self, item):
        i = item[0] if isinstance(item, tuple) else item
        return torch.full((3, 16, 16), float(i)), torch.full((16, 16), i, dtype=torch.long)


def _batches(loader):
    out = []
    for b in loader:
        b = b[0] if isinstance(b, tuple) else b  # CombinedLoader yields (batch, idx, loader_idx)
        out.append({k: [t.clone() for t in v] for k, v in b.items()} if isinstance(b, dict)
                   else [t.clone() for t in b])
    return out


def test_replay_dataset_by_constructor_or_attribute(voc, cache):
    t = get_task("voc", "15-5")
    kw = dict(crop=16, batch_size=2, num_workers=0, cache_dir=cache, progress=False)
    assert IncrementalDataModule(voc, t, 1, **kw).replay_dataset is None
    replay = _Replay()
    a = IncrementalDataModule(voc, t, 1, replay_dataset=replay, **kw)
    assert a.replay_dataset is replay
    b = IncrementalDataModule(voc, t, 1, **kw)
    b.replay_dataset = replay  # how protocol.py sets it today
    ba, bb = _batches(a.train_dataloader()), _batches(b.train_dataloader())
    assert len(ba) == len(bb) == 3 and set(ba[0]) == {"real", "replay"}
    for x, y in zip(ba, bb):
        for k in ("real", "replay"):
            assert all(torch.equal(u, v) for u, v in zip(x[k], y[k]))


def test_datamodule_takes_rank_and_world_size_from_the_trainer(voc, cache):
    from types import SimpleNamespace

    t = get_task("voc", "15-5")
    dm = IncrementalDataModule(voc, t, 1, crop=16, batch_size=2, num_workers=0, cache_dir=cache,
                               progress=False)
    single = dm.train_dataloader().sampler
    assert (single.num_replicas, single.rank) == (1, 0)
    assert dm.test_dataloader().sampler.__class__.__name__ == "SequentialSampler"
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)  # what DDP rank 1 sees
    train = dm.train_dataloader().sampler
    assert (train.num_replicas, train.rank) == (2, 1)
    assert list(dm.test_dataloader().sampler) == list(range(1, 4, 2))  # every 2nd, no padding


def test_sampler_depends_only_on_seed_step_epoch():
    a = SeededSampler(10, seed=1, step=2)
    b = SeededSampler(10, seed=1, step=2)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    b.set_epoch(4)
    assert list(a) != list(b)
    assert sorted(i for i, _ in a) == list(range(10))
    # two replicas split one permutation
    r0 = SeededSampler(10, 1, 2, num_replicas=2, rank=0)
    r1 = SeededSampler(10, 1, 2, num_replicas=2, rank=1)
    assert sorted([i for i, _ in r0] + [i for i, _ in r1]) == list(range(10))


def test_augmentation_is_reproducible_from_sample_seed(voc):
    from incseg.data.transforms import train_transform

    t = get_task("voc", "15-5")
    ds = SegmentationDataset(voc.samples("train"), t.train_lut(1), train_transform(16, rotation=20))
    x1, m1 = ds[(1, 123)]
    ds[(2, 7)]
    x2, m2 = ds[(1, 123)]
    x3, _ = ds[(1, 124)]
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    assert not torch.equal(x1, x3)


# ---- bad input -------------------------------------------------------------------------------

def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist; pass data.root"):
        make_source("voc", tmp_path / "nope")
    with pytest.raises(DataError, match="data.root is not set"):
        make_source("voc", None)


def test_missing_list_file(voc, voc_root):
    (voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt").unlink()
    with pytest.raises(DataError, match="train_aug.txt is missing.*prepare"):
        voc.check_split("train")


def test_missing_mask_named(voc, voc_root):
    (voc_root / "VOCdevkit/VOC2012/SegmentationClassAug/c.png").unlink()
    with pytest.raises(DataError, match="c.png"):
        voc.check_split("train")


def test_mask_value_outside_classes_names_file(voc, voc_root, cache):
    bad = np.zeros((24, 24), np.uint8)
    bad[2, 2] = 42
    save_palette_png(bad, voc_root / "VOCdevkit/VOC2012/SegmentationClassAug/e.png")
    with pytest.raises(DataError, match=r"e\.png holds values \[42\]"):
        scan_labels(voc, "train", cache, progress=False)


def test_image_mask_size_mismatch(voc, voc_root, cache):
    save_palette_png(np.zeros((20, 24), np.uint8),
                     voc_root / "VOCdevkit/VOC2012/SegmentationClassAug/f.png")
    with pytest.raises(DataError, match="f.png is 24x20 but its image"):
        scan_labels(voc, "train", cache, progress=False)


def test_corrupt_mask(voc, voc_root, cache):
    (voc_root / "VOCdevkit/VOC2012/SegmentationClassAug/a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="a.png cannot be read"):
        scan_labels(voc, "train", cache, progress=False)


def test_rgb_mask_rejected(voc, voc_root, cache):
    Image.new("RGB", (24, 24)).save(voc_root / "VOCdevkit/VOC2012/SegmentationClassAug/a.png")
    with pytest.raises(DataError, match="RGB image"):
        scan_labels(voc, "train", cache, progress=False)


def test_step_without_training_images(voc, cache):
    t = get_task("voc", "custom", [[0, 1, 5], [2]])  # class 2 occurs in no image
    with pytest.raises(DataError, match="step 1 of task custom .* has no training images"):
        step_selection(voc, t, 1, True, cache, progress=False)


def test_scan_cache_reused_and_invalidated(voc, voc_root, cache, monkeypatch):
    scan_labels(voc, "train", cache, progress=False)
    import incseg.data.index as index

    def boom(*a, **k):
        raise AssertionError("re-read a mask although the index is cached")

    monkeypatch.setattr(index, "_scan_one", boom)
    assert len(scan_labels(voc, "train", cache, progress=False)) == len(TRAIN)
    # editing a mask changes its fingerprint: the index is rebuilt (and hits the patched reader)
    path = voc_root / "VOCdevkit/VOC2012/SegmentationClassAug/a.png"
    save_palette_png(np.zeros((24, 24), np.uint8), path)
    import os
    os.utime(path, ns=(1, 1))
    with pytest.raises(AssertionError, match="re-read"):
        scan_labels(voc, "train", cache, progress=False)


def test_corrupt_index_entry_is_rebuilt(voc, cache):
    scan_labels(voc, "train", cache, progress=False)
    entry = next((cache / "index").glob("voc-train-*.json"))
    entry.write_text("{truncated")
    labels = scan_labels(voc, "train", cache, progress=False)
    assert len(labels) == len(TRAIN)
