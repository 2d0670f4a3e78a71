"""The suite as a user installs it: a wheel (not an editable install) in a fresh virtual
environment, run from a folder that is not the clone.

The slow test builds the wheel from a copy of the files a release ships, installs it with
``--no-deps --no-index`` into a new venv and lends that venv the heavy dependencies of the
interpreter running the tests through a ``.pth`` line (its site-packages folder), so torch is
not downloaded again and nothing reaches the internet. A ``.pth`` path line does not run the
``.pth`` files of the folder it adds, so a development checkout's editable install stays out
of it: ``incseg`` is imported from the wheel, which the test checks.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("incseg-run", "incseg-data", "incseg-report", "incseg-predict")


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_one_version_in_pyproject_citation_and_changelog():
    version = _pyproject()["project"]["version"]
    assert yaml.safe_load((ROOT / "CITATION.cff").read_text())["version"] == version
    first = re.search(r"^## \[(\d+\.\d+\.\d+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert first is not None and first.group(1) == version


def test_the_licence_is_the_declared_one():
    assert _pyproject()["project"]["license"] == {"text": "MIT"}
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the incseg authors" in text


def test_console_scripts_name_the_python_m_entry_points():
    scripts = _pyproject()["project"]["scripts"]
    assert sorted(scripts) == sorted(SCRIPTS)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name
        assert module.replace("incseg.", "incseg-").split(".")[0] == name  # incseg.run: incseg-run


def test_no_upper_pin_on_a_patch_release():
    """torch and torchvision: a lower bound the code needs, at most a major-release ceiling."""
    deps = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0]: d
            for d in _pyproject()["project"]["dependencies"]}
    for name in ("torch", "torchvision"):
        assert ">=" in deps[name] and "<=" not in deps[name] and "==" not in deps[name]
        ceiling = re.search(r"<(\d+(?:\.\d+)*)", deps[name])
        assert ceiling is None or re.fullmatch(r"\d+", ceiling.group(1)), deps[name]


def _copy_release_files(dst: Path) -> None:
    """What a wheel is built from: the package and the files pyproject.toml names."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, dst / name)
    shutil.copytree(ROOT / "incseg", dst / "incseg",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_runs_the_smoke_protocol_from_another_folder(tmp_path):
    pytest.importorskip("setuptools")
    src, wheels, venv, work = (tmp_path / d for d in ("src", "wheels", "venv", "work"))
    _copy_release_files(src)
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(NO_ALBUMENTATIONS_UPDATE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")

    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "-w", str(wheels), str(src)], tmp_path, env)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("incseg-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n for n in names if n.startswith("incseg/conf/") and n.endswith(".yaml")}
    assert shipped == {p.relative_to(src).as_posix() for p in (src / "incseg/conf").rglob("*.yaml")}
    assert "incseg/py.typed" in names and not any(n.startswith(("tests/", "experiments/"))
                                                  for n in names)

    made = _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    assert made.returncode == 0, made.stderr[-2000:]
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    installed = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index",
                      str(wheel)], tmp_path, env)
    assert installed.returncode == 0, installed.stderr[-2000:]
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                      "['purelib'])"], work, env).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "zz_incseg_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))

    where = _run([str(python), "-c", "import incseg, incseg.config as c; "
                  "print(incseg.__file__); print(c.CONF_DIR)"], work, env)
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(Path(line).is_relative_to(site) for line in where.stdout.split()), where.stdout

    run = _run([str(python), "-m", "incseg.run", "experiment=smoke",
                f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}"],
               work, env)
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.splitlines()
    assert table[0].split("|")[0].split() == ["shapes", "15-5", "mib", "seed0"]
    assert [ln.split("|")[0].strip() for ln in table[1:]] == ["step 0", "step 1", "final"]
    assert (tmp_path / "run" / "results.json").is_file()
    assert list(work.iterdir()) == []  # nothing written where the user stands

    for script in SCRIPTS:
        shown = _run([str(bin_dir / script), "--help"], work, env)
        assert shown.returncode == 0 and shown.stdout.startswith("usage:"), (script, shown.stderr)

    # a user's own config folder still adds options beside the shipped ones
    own = tmp_path / "myconf" / "method"
    own.mkdir(parents=True)
    mib = yaml.safe_load((src / "incseg/conf/method/mib.yaml").read_text())
    (own / "mymib.yaml").write_text(yaml.safe_dump({**mib, "name": "mymib", "kd_weight": 5}))
    cfg = _run([str(bin_dir / "incseg-run"), f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
                "method=mymib", "--cfg", "job"], work, env)
    assert cfg.returncode == 0, cfg.stderr[-2000:]
    method = yaml.safe_load(cfg.stdout)["method"]
    assert (method["name"], method["kd_weight"]) == ("mymib", 5)
