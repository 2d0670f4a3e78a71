"""``python -m incseg.predict``: masks in dataset ids, overlays, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from incseg.checkpoints import save_model
from incseg.data.prepare import voc_colormap
from incseg.models import build_model
from incseg.predict import main
from incseg.viz import load_segmenter, predict_ids, to_input

# A MiB-style reordered 15-5: step 1 introduces 20, 19, 18, 17, 16 in that order, so channel 16
# is class 20. Writing channel indices instead of class ids would show up as 16 here.
STEPS = [list(range(16)), [20, 19, 18, 17, 16]]
SIZES = {"a.png": (40, 30), "b.jpg": (33, 47), "c.jpeg": (64, 64)}  # (width, height)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
       "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}


def _model(force_channel: int | None = None):
    torch.manual_seed(0)
    model = build_model("bisenet_r18", [16, 5])
    if force_channel is not None:
        # Main head = constant logits: every pixel's argmax is `force_channel`.
        with torch.no_grad():
            for k, conv in enumerate(model.head.convs):
                conv.weight.zero_()
                conv.bias.zero_()
                offset = sum(model.classes_per_step[:k])
                if offset <= force_channel < offset + conv.out_channels:
                    conv.bias[force_channel - offset] = 10.0
    return model


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "notes.txt").write_text("not an image")  # ignored: not jpg/jpeg/png
    return folder


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "incseg.predict", *args], capture_output=True,
                          text=True, env=ENV, timeout=300)


def test_predict_cli_writes_masks_in_dataset_ids(tmp_path):
    ckpt = tmp_path / "step1.pt"
    save_model(ckpt, _model(), "bisenet_r18", STEPS, 1)
    inp, out = _images(tmp_path / "in"), tmp_path / "out"
    proc = _run(f"checkpoint={ckpt}", f"input={inp}", f"output={out}", "model=bisenet_r18")
    assert proc.returncode == 0, proc.stderr
    assert '"images": 3' in proc.stdout
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{Path(n).stem}_{k}.png" for n in SIZES for k in ("mask", "overlay"))
    model, class_ids, _ = load_segmenter(ckpt)
    for name, (w, h) in SIZES.items():
        with Image.open(out / f"{Path(name).stem}_mask.png") as im:
            assert im.mode == "P" and im.size == (w, h)
            mask = np.asarray(im)
        assert set(np.unique(mask)) <= set(range(21))
        with Image.open(out / f"{Path(name).stem}_overlay.png") as im:
            assert im.mode == "RGB" and im.size == (w, h)
        # the CLI and the library agree pixel for pixel (same normalisation, same mapping)
        with Image.open(tmp_path / "in" / name) as im:
            image = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(
            mask, predict_ids(model, to_input(image), class_ids, out_size=(h, w))[0])


def test_channel_maps_to_dataset_id_and_overlay_blends(tmp_path):
    """Channel 16 (first of step 1) is class 20; overlay = round(0.5 image + 0.5 colour(20))."""
    ckpt = tmp_path / "step1.pt"
    save_model(ckpt, _model(force_channel=16), "bisenet_r18", STEPS, 1)
    inp, out = _images(tmp_path / "in"), tmp_path / "out"
    main([f"checkpoint={ckpt}", f"input={inp}", f"output={out}", "size=32"])
    with Image.open(out / "a_mask.png") as im:
        mask = np.asarray(im)
    assert mask.shape == (30, 40) and (mask == 20).all()
    assert tuple(voc_colormap()[20]) == (0, 64, 128)
    with Image.open(inp / "a.png") as im:
        image = np.asarray(im.convert("RGB")).astype(np.float64)
    with Image.open(out / "a_overlay.png") as im:
        over = np.asarray(im).astype(np.float64)
    expected = np.rint(0.5 * image + 0.5 * np.array([0, 64, 128]))
    np.testing.assert_array_equal(over, expected)


def test_bad_checkpoint_path_is_one_error_line(tmp_path):
    inp = _images(tmp_path / "in")
    proc = _run(f"checkpoint={tmp_path / 'nope.pt'}", f"input={inp}", f"output={tmp_path / 'o'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope.pt" in lines[0]
    assert not (tmp_path / "o").exists()


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_user_errors(tmp_path, capsys):
    inp = _images(tmp_path / "in")
    ckpt = tmp_path / "step1.pt"
    save_model(ckpt, _model(), "bisenet_r18", STEPS, 1)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    out = tmp_path / "out"
    assert "not an incseg model checkpoint" in _error(
        capsys, [f"checkpoint={foreign}", f"input={inp}", f"output={out}"])
    assert "model=bisenet_r18" in _error(
        capsys, [f"checkpoint={ckpt}", f"input={inp}", f"output={out}", "model=bisenet_r50"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no .jpg/.jpeg/.png images" in _error(
        capsys, [f"checkpoint={ckpt}", f"input={empty}", f"output={out}"])
    assert "missing output=" in _error(capsys, [f"checkpoint={ckpt}", f"input={inp}"])
    assert "unknown key 'colour'" in _error(
        capsys, [f"checkpoint={ckpt}", f"input={inp}", f"output={out}", "colour=red"])
    assert "size=3" in _error(
        capsys, [f"checkpoint={ckpt}", f"input={inp}", f"output={out}", "size=3"])
    # an unreadable image stops the run before any output is written
    (inp / "z_broken.png").write_bytes(b"\x89PNG not really")
    assert "z_broken.png" in _error(
        capsys, [f"checkpoint={ckpt}", f"input={inp}", f"output={out}"])
    assert not out.exists() or not any(out.iterdir())
