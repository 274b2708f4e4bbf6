"""``python -m swin_jax predict``: top-k against timm on a real photo, and the errors meant for people.

Offline: the weights are a small randomized timm Swin converted locally (parity.jax_from_timm ->
swin_jax.hub.save_pretrained); timm's own eval transform and forward give the reference.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import timm
import timm.data
import torch
from hub_cache import hub_env
from parity import jax_from_timm, small_logit_scales_, timm_model
from PIL import Image

from swin_jax.cli import main
from swin_jax.data import imagenet_class_names
from swin_jax.hub import save_pretrained

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = "swin_tiny_patch4_window7_224"
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))
PROB_TOL = 1e-4
LINE = re.compile(r"^  (\d\.\d{4})  (.+)$")


def _sharpen_head_(tm: torch.nn.Module, scale: float = 8.0) -> torch.nn.Module:
    """Scale the classifier so the top classes get probabilities far from 0 (1e-4 then is a tight check)."""
    with torch.no_grad():
        tm.head.fc.weight.mul_(scale)
        tm.head.fc.bias.mul_(scale)
    return tm


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Two real photos as PNG files: the cat (chelsea) and a cup of coffee."""
    d = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee"):
        path = d / f"{name}.png"
        Image.fromarray(getattr(skimage.data, name)()).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(timm model, Flax checkpoint dir) for a small randomized 1000-class Swin-T."""
    tm = _sharpen_head_(timm_model(TINY, **SMALL))
    out = save_pretrained(jax_from_timm(tm, TINY, **SMALL), tmp_path_factory.mktemp("ckpt") / "swin_t_flax")
    return tm, out


def _run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    if env is None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "swin_jax", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def _parse(stdout: str) -> dict[str, list[tuple[float, str]]]:
    """The printed report: image path -> [(prob, class name), ...] in printed order."""
    out: dict[str, list[tuple[float, str]]] = {}
    current = None
    for line in stdout.splitlines():
        match = LINE.match(line)
        if match:
            assert current is not None, f"a class line before any image path: {line!r}"
            out[current].append((float(match.group(1)), match.group(2)))
        else:
            assert line and not line.startswith(" "), f"unexpected line {line!r} in:\n{stdout}"
            current = line
            out[current] = []
    return out


def _timm_probs(tm: torch.nn.Module, paths: list[Path]) -> np.ndarray:
    """timm's class probabilities with timm's own eval transform on the same files."""
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=tm))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return torch.softmax(tm(x), dim=-1).numpy()


def _assert_topk(printed: list[tuple[float, str]], probs: np.ndarray, names: list[str], k: int) -> None:
    order = np.argsort(-probs, kind="stable")[:k]
    assert [n for _, n in printed] == [names[i] for i in order], "top-k classes differ from timm's"
    for (p, name), i in zip(printed, order):
        assert abs(p - probs[i]) <= PROB_TOL, f"{name}: printed {p}, timm {probs[i]:.6f}"


# ----------------------------------------------------------------------------------------------------------
# predictions
# ----------------------------------------------------------------------------------------------------------


def test_predict_matches_timm(converted, photos):
    tm, ckpt = converted
    res = _run_cli("predict", *map(str, photos), "--model", TINY, "--weights", str(ckpt), "--top-k", "3")
    assert res.returncode == 0, res.stderr
    report = _parse(res.stdout)
    assert list(report) == [str(p) for p in photos]
    probs = _timm_probs(tm, photos)
    names = imagenet_class_names(1000)
    for path, p in zip(photos, probs):
        _assert_topk(report[str(path)], p, names, 3)
    # the sharpened head makes the check meaningful: the top class is far above chance
    assert max(p for p, _ in report[str(photos[0])]) > 0.05


def test_predict_swinv2_cr_matches_timm(photos, tmp_path, capsys):
    """Another family through the command: SwinV2-CR (cosine attention, as SwinV2), at its tag's input size and crop
    (logit scales at most e: fp32 is then exact enough for the probabilities' 1e-4)."""
    name, kw = "swinv2_cr_small_ns_224", dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    tm = _sharpen_head_(small_logit_scales_(timm_model(name, **kw)))
    ckpt = save_pretrained(jax_from_timm(tm, name, **kw), tmp_path / "ckpt")
    assert main(["predict", *map(str, photos), "--model", name, "--weights", str(ckpt), "--top-k", "2"]) == 0
    report = _parse(capsys.readouterr().out)
    names = imagenet_class_names(1000)
    for path, p in zip(photos, _timm_probs(tm, photos)):
        _assert_topk(report[str(path)], p, names, 2)


def test_predict_unknown_class_count_and_top_k_bound(tmp_path, photos, capsys):
    """A 10-class head: classes are printed as 'class <i>', and --top-k is bounded to num_classes."""
    tm = _sharpen_head_(timm_model(TINY, seed=1, num_classes=10, **SMALL))
    ckpt = save_pretrained(jax_from_timm(tm, TINY, num_classes=10, **SMALL), tmp_path / "ten")
    code = main(["predict", str(photos[0]), "--model", TINY, "--weights", str(ckpt), "--top-k", "50"])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = _parse(out.out)
    assert len(report[str(photos[0])]) == 10
    _assert_topk(report[str(photos[0])], _timm_probs(tm, photos[:1])[0], [f"class {i}" for i in range(10)], 10)


# ----------------------------------------------------------------------------------------------------------
# errors for people: one message, no traceback, exit code 2
# ----------------------------------------------------------------------------------------------------------


def _assert_error(code: int, stderr: str, *needles: str) -> None:
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    assert "error:" in stderr
    for needle in needles:
        assert needle.lower() in stderr.lower(), f"{needle!r} not in:\n{stderr}"


def test_missing_image_is_named(converted, photos, tmp_path):
    _, ckpt = converted
    missing = tmp_path / "no_such_cat.jpg"
    res = _run_cli("predict", str(photos[0]), str(missing), "--model", TINY, "--weights", str(ckpt))
    _assert_error(res.returncode, res.stderr, str(missing), "no such file")
    assert res.stdout == ""


def test_unreadable_image_is_named(converted, tmp_path, capsys):
    _, ckpt = converted
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    code = main(["predict", str(fake), "--model", TINY, "--weights", str(ckpt)])
    _assert_error(code, capsys.readouterr().err, str(fake))


def test_offline_hub_without_cache(photos, tmp_path):
    """Default model, pretrained=True, HF_HUB_OFFLINE=1 and an empty cache: says so, and how to pass a local file."""
    res = _run_cli("predict", str(photos[0]), env=hub_env(tmp_path / "hf_home"))
    _assert_error(res.returncode, res.stderr, "offline", "timm/swin_base_patch4_window7_224.ms_in22k_ft_in1k")
    assert "--weights" in res.stderr and "local" in res.stderr


def test_unknown_model_suggests_close_matches(photos, capsys):
    code = main(["predict", str(photos[0]), "--model", "swin_tiny_patch4_window7"])
    _assert_error(code, capsys.readouterr().err, "unknown model", "swin_tiny_patch4_window7_224")


def test_bad_weights_file(photos, tmp_path, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")  # a header promising more than the file holds
    code = main(["predict", str(photos[0]), "--model", TINY, "--weights", str(bad)])
    _assert_error(code, capsys.readouterr().err, str(bad), "safetensors")


def test_missing_weights_path(photos, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = main(["predict", str(photos[0]), "--model", TINY, "--weights", str(missing)])
    _assert_error(code, capsys.readouterr().err, str(missing))


@pytest.mark.parametrize("top_k", ["0", "-3", "five"])
def test_top_k_must_be_positive(photos, top_k, capsys):
    code = main(["predict", str(photos[0]), "--top-k", top_k])
    _assert_error(code, capsys.readouterr().err, "--top-k")
