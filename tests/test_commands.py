"""The installed ``swin-jax`` command (``pip install swin-jax``): every tool, run outside a checkout, as a user runs it.

Each command runs with its working directory outside the repository and without it on ``PYTHONPATH``, so only
what pip installed is importable: the repository's top-level ``convert/`` must not be needed (nor installed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from parity import images

import swin_jax
from swin_jax.export import EXPORT_CONFIG, EXPORT_FILE
from swin_jax.hub import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
ARCH = "swin_tiny_patch4_window7_224"
TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 2), img_size=32, window_size=4, num_classes=10)
SWIN_JAX = shutil.which("swin-jax")


def _outside_env() -> dict[str, str]:
    """The environment without the checkout on PYTHONPATH (what a pip user has), offline."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths), HF_HUB_OFFLINE="1")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_outside_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def flax_dir(tmp_path_factory) -> Path:
    model = swin_jax.create_model(ARCH, **TINY)
    return save_pretrained(model, tmp_path_factory.mktemp("weights") / "tiny_flax")


def test_swin_jax_command_is_installed_and_lists_its_tools(tmp_path):
    assert SWIN_JAX, "the swin-jax console script is not on PATH: pip install -e . installs it"
    proc = _run([SWIN_JAX, "--help"], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: swin-jax")
    for command in ("predict", "finetune", "export", "convert"):
        assert f"    {command}" in proc.stdout
    proc = _run([SWIN_JAX, "convert", "--help"], tmp_path)
    assert proc.returncode == 0 and "usage: swin-jax convert" in proc.stdout and "timm-to-flax" in proc.stdout
    # only swin_jax is installed: no generic top-level `convert` package in site-packages
    code = "import importlib.util, swin_jax; print(importlib.util.find_spec('convert'))"
    proc = _run([sys.executable, "-c", code], tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "None", proc.stdout + proc.stderr


def test_convert_and_export_outside_a_checkout(flax_dir, tmp_path):
    timm_dir = tmp_path / "tiny_timm"
    proc = _run([SWIN_JAX, "convert", "flax-to-timm", str(flax_dir), str(timm_dir)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in timm_dir.iterdir()) == ["config.json", "model.safetensors"]
    ours = swin_jax.to_timm_state_dict(swin_jax.create_model(ARCH, pretrained=str(flax_dir)))
    back = swin_jax.to_timm_state_dict(swin_jax.create_model(ARCH, pretrained=str(timm_dir)))
    assert ours.keys() == back.keys() and all(np.array_equal(ours[k], back[k]) for k in ours)

    out = tmp_path / "served"
    proc = _run([SWIN_JAX, "export", ARCH, str(out), "--weights", str(timm_dir), "--platforms", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / EXPORT_CONFIG).read_text())["platforms"] == ["cpu"]
    import jax

    exported = jax.export.deserialize(bytearray((out / EXPORT_FILE).read_bytes()))
    assert exported.call(images((1, 32, 32, 3))).shape == (1, 10)

    # the same converter from a checkout: python -m convert is a thin entry over swin_jax.convert
    again = tmp_path / "again"
    proc = subprocess.run(
        [sys.executable, "-m", "convert", "flax-to-timm", str(flax_dir), str(again)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (again / "model.safetensors").read_bytes() == (timm_dir / "model.safetensors").read_bytes()


# torch and timm missing: what a pip user without the [dev] extra has
NO_TORCH = r"""
import importlib.abc, sys


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in ("torch", "timm", "torchvision"):
            raise ModuleNotFoundError(f"No module named {fullname!r}")
        return None


sys.meta_path.insert(0, Block())
from swin_jax.cli import main

sys.exit(main(sys.argv[1:]))
"""


def test_verify_without_torch_says_what_to_install(flax_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", NO_TORCH, "convert", "timm-to-flax", str(flax_dir), str(out)]
    proc = _run([*cmd, "--verify"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pip install 'swin-jax[dev]'" in proc.stderr and "torch" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    # without --verify the same conversion needs no torch
    proc = _run(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "flax_model.safetensors").is_file()


def test_wheel_installs_swin_jax_only(tmp_path):
    """The wheel pip would install: the package (the converter and the labels included) and the swin-jax command;
    no top-level ``convert`` package beside it. Built from a copy of the sources (a build writes into its tree)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "swin_jax", src / "swin_jax", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "convert", src / "convert", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("swin_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.startswith("swin_jax-")} == {"swin_jax"}
    assert "swin_jax/convert/cli.py" in names and "swin_jax/export.py" in names
    assert any(name.startswith("swin_jax/_labels/") for name in names)
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert "swin-jax = swin_jax.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_pickled_checkpoint_without_torch_says_what_to_install(tmp_path):
    import torch

    pth = tmp_path / "weights.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(1)}, pth)
    out = tmp_path / "out"
    proc = _run(
        [sys.executable, "-c", NO_TORCH, "convert", "timm-to-flax", str(pth), str(out), "--model", ARCH], tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pickled PyTorch checkpoint" in proc.stderr and "pip install 'swin-jax[dev]'" in proc.stderr
    assert f"swin-jax convert timm-to-flax {pth}" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
