"""Tests for swin_jax.data: eval preprocessing, data config and ImageNet labels, checked against timm."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from swin_jax.data import (
    EvalTransform,
    create_transform,
    imagenet_class_names,
    imagenet_synsets,
    resolve_data_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
PHOTO_NAMES = ("chelsea", "astronaut", "coffee", "camera")


def _cfg(size, crop_pct, crop_mode="center", interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD):
    return dict(
        input_size=size,
        interpolation=interpolation,
        mean=mean,
        std=std,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
    )


CONFIGS = {
    "swin224": _cfg((3, 224, 224), 0.9),
    "swin384": _cfg((3, 384, 384), 1.0),
    "nonsquare": _cfg((3, 192, 256), 0.9),
    "nonsquare_tall_border": _cfg((3, 256, 160), 1.0, "border"),
    "squash": _cfg((3, 224, 224), 0.9, "squash"),
    "squash_nonsquare": _cfg((3, 160, 224), 0.95, "squash"),
    "border": _cfg((3, 224, 224), 0.9, "border", mean=INCEPTION_MEAN, std=INCEPTION_STD),
    "bilinear": _cfg((3, 224, 224), 0.875, interpolation="bilinear"),
    "zero_pad": _cfg((3, 224, 224), 1.15),  # crop_pct > 1: resized image smaller than crop -> padding
}


# ------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def timm_data():
    pytest.importorskip("torch")
    return pytest.importorskip("timm.data")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    skd = pytest.importorskip("skimage.data")
    imgs = {name: Image.fromarray(getattr(skd, name)()) for name in PHOTO_NAMES}
    assert imgs["camera"].mode == "L"
    out = {name: img.convert("RGB") for name, img in imgs.items()}  # camera: grayscale -> RGB
    out["small_odd"] = imgs["chelsea"].crop((151, 47, 151 + 101, 47 + 67))  # 101x67, smaller than any crop
    out["very_wide"] = imgs["astronaut"].crop((0, 200, 512, 237))  # 512x37
    out["very_tall"] = imgs["coffee"].crop((300, 0, 323, 400))  # 23x400
    return out


def _timm_hwc(timm_data, cfg: dict, img: Image.Image) -> np.ndarray:
    return timm_data.create_transform(**cfg)(img).permute(1, 2, 0).numpy()


def _assert_parity(ours: np.ndarray, ref: np.ndarray, cfg: dict) -> None:
    h, w = cfg["input_size"][-2:]
    assert ours.shape == (h, w, 3)
    assert ours.dtype == np.float32
    assert ref.shape == ours.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------
# preprocessing parity with timm
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_transform_matches_timm(timm_data, photos, cfg_name):
    cfg = CONFIGS[cfg_name]
    transform = create_transform(**cfg)
    for name, img in photos.items():
        ours = transform(img)
        ref = _timm_hwc(timm_data, cfg, img)
        assert float(np.abs(ours - ref).max()) <= 1e-6, (cfg_name, name)
        _assert_parity(ours, ref, cfg)


@pytest.mark.parametrize("interpolation", ["nearest", "lanczos", "box", "hamming"])
def test_other_interpolations_match_timm(timm_data, photos, interpolation):
    cfg = _cfg((3, 224, 224), 0.9, interpolation=interpolation)
    for img in (photos["chelsea"], photos["small_odd"]):
        _assert_parity(create_transform(**cfg)(img), _timm_hwc(timm_data, cfg, img), cfg)


@pytest.mark.parametrize(
    "name",
    [
        "swin_tiny_patch4_window7_224.ms_in1k",
        "swin_base_patch4_window12_384.ms_in22k_ft_in1k",
        "swin_base_patch4_window7_224.ms_in22k",
    ],
)
def test_swin_pretrained_cfg_end_to_end(timm_data, photos, name):
    from timm.models import get_pretrained_cfg

    pretrained_cfg = get_pretrained_cfg(name).to_dict()
    ref_cfg = timm_data.resolve_data_config(pretrained_cfg=pretrained_cfg)
    cfg = resolve_data_config(pretrained_cfg=pretrained_cfg)
    assert cfg == ref_cfg
    img = photos["coffee"]
    _assert_parity(create_transform(**cfg)(img), _timm_hwc(timm_data, ref_cfg, img), cfg)
    # the whole pretrained_cfg (url, num_classes, ...) can be splatted too; extra keys are ignored
    np.testing.assert_array_equal(create_transform(**pretrained_cfg)(img), create_transform(**cfg)(img))


def test_input_size_forms_are_equivalent(photos):
    img = photos["chelsea"]
    ref = create_transform(224, crop_pct=0.9)(img)
    for size in ((224, 224), (3, 224, 224), [3, 224, 224]):
        np.testing.assert_array_equal(create_transform(size, crop_pct=0.9)(img), ref)


def test_timm_defaults_for_none_crop(timm_data, photos):
    cfg = _cfg((3, 224, 224), None, crop_mode=None)
    img = photos["astronaut"]
    np.testing.assert_array_equal(create_transform(**cfg)(img), create_transform(224, crop_pct=0.875)(img))
    _assert_parity(create_transform(**cfg)(img), _timm_hwc(timm_data, cfg, img), cfg)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "LA"])
def test_non_rgb_modes_are_converted(timm_data, photos, mode):
    cfg = CONFIGS["swin224"]
    img = photos["chelsea"].convert(mode)
    ours = create_transform(**cfg)(img)
    _assert_parity(ours, _timm_hwc(timm_data, cfg, img.convert("RGB")), cfg)


def test_border_mode_pads_with_mean_colour():
    img = Image.new("RGB", (400, 100), (255, 0, 0))
    out = create_transform((3, 224, 224), crop_pct=1.0, crop_mode="border")(img)
    # the top rows are padding filled with round(255 * mean), which normalizes to ~0
    expected = (np.round(np.array(IMAGENET_MEAN) * 255) / 255 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(out[0, 0], expected, atol=1e-6)
    red = (np.array([1.0, 0.0, 0.0]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(out[112, 112], red, atol=1e-6)


def test_crop_border_pixels_matches_timm(timm_data, photos):
    cfg = CONFIGS["swin224"]
    img = photos["coffee"]
    ref = timm_data.create_transform(**cfg, crop_border_pixels=13)(img).permute(1, 2, 0).numpy()
    _assert_parity(create_transform(**cfg, crop_border_pixels=13)(img), ref, cfg)


def test_transform_repr_and_attributes():
    t = create_transform(**CONFIGS["swin224"])
    assert isinstance(t, EvalTransform)
    assert t.img_size == (224, 224) and t.scale_size == (248, 248)
    r = repr(t)
    for part in (
        "EvalTransform(",
        "input_size=(3, 224, 224)",
        "'bicubic'",
        "crop_pct=0.9",
        "'center'",
        "248",
    ):
        assert part in r
    assert "squash to 235x235" in repr(create_transform(224, crop_pct=0.95, crop_mode="squash"))
    assert t.resize_size(451, 300) == (372, 248)  # torchvision: int(248 * 451 / 300) = 372


# ------------------------------------------------------------------------------------------------------
# transform errors
# ------------------------------------------------------------------------------------------------------


def test_transform_rejects_numpy_array():
    t = create_transform(224)
    with pytest.raises(TypeError) as exc:
        t(np.zeros((32, 48, 3), dtype=np.uint8))
    msg = str(exc.value)
    assert "expects a PIL.Image.Image, got numpy.ndarray with shape (32, 48, 3) and dtype uint8" in msg
    assert "PIL.Image.open" in msg and "PIL.Image.fromarray" in msg


@pytest.mark.parametrize("bad", ["cat.jpg", None, [[0, 1], [2, 3]]])
def test_transform_rejects_other_non_images(bad):
    with pytest.raises(TypeError, match="expects a PIL.Image.Image"):
        create_transform(224)(bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"interpolation": "cubic"}, "Unknown interpolation 'cubic'"),
        ({"interpolation": "random"}, "Unknown interpolation"),
        ({"crop_mode": "fit"}, "Unknown crop_mode 'fit'"),
        ({"input_size": (1, 224, 224)}, "3-channel"),
        ({"input_size": (224, 0)}, "input_size"),
        ({"input_size": "224"}, "input_size"),
        ({"is_training": True}, "is_training"),
        ({"normalize": False}, "normalize=False"),
        ({"mean": (0.5,)}, "3 values"),
        ({"std": (0.2, 0.0, 0.2)}, "non-zero"),
    ],
)
def test_create_transform_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_transform(**{"input_size": 224, **kwargs})


def test_too_elongated_image_raises_clearly(timm_data):
    cfg = _cfg((3, 7, 7), 1.0, "border")
    img = Image.new("RGB", (9, 404))
    with pytest.raises(ValueError):
        timm_data.create_transform(**cfg)(img)  # timm / PIL fail as well
    with pytest.raises(ValueError, match="too elongated"):
        create_transform(**cfg)(img)


# ------------------------------------------------------------------------------------------------------
# resolve_data_config
# ------------------------------------------------------------------------------------------------------

SWIN384_CFG = {
    "hf_hub_id": "timm/swin_base_patch4_window12_384.ms_in22k_ft_in1k",
    "architecture": "swin_base_patch4_window12_384",
    "tag": "ms_in22k_ft_in1k",
    "num_classes": 1000,
    "input_size": (3, 384, 384),
    "pool_size": (12, 12),
    "interpolation": "bicubic",
    "mean": IMAGENET_MEAN,
    "std": IMAGENET_STD,
    "crop_pct": 1.0,
    "crop_mode": "center",
    "first_conv": "patch_embed.proj",
    "classifier": "head.fc",
}


class FakeModel:
    def __init__(self, pretrained_cfg, img_size=None):
        self.pretrained_cfg = pretrained_cfg
        if img_size is not None:
            self.img_size = img_size


def test_resolve_data_config_from_model():
    cfg = resolve_data_config(FakeModel(SWIN384_CFG, img_size=(384, 384)))
    assert cfg == {
        "input_size": (3, 384, 384),
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    assert list(cfg) == ["input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"]
    assert isinstance(create_transform(**cfg), EvalTransform)


def test_resolve_data_config_model_img_size_overrides():
    cfg = resolve_data_config(FakeModel(SWIN384_CFG, img_size=(256, 320)))
    assert cfg["input_size"] == (3, 256, 320)
    assert resolve_data_config(FakeModel(SWIN384_CFG, img_size=192))["input_size"] == (3, 192, 192)
    # explicit pretrained_cfg wins for everything but the model's real img_size
    other = dict(SWIN384_CFG, crop_pct=0.9, input_size=(3, 224, 224))
    cfg = resolve_data_config(FakeModel(SWIN384_CFG, img_size=(256, 320)), pretrained_cfg=other)
    assert cfg["crop_pct"] == 0.9 and cfg["input_size"] == (3, 256, 320)
    assert resolve_data_config(FakeModel(SWIN384_CFG), pretrained_cfg=other)["input_size"] == (3, 224, 224)


def test_resolve_data_config_defaults_match_timm(timm_data):
    partial = {"num_classes": 21841, "input_size": (3, 192, 192), "mean": None, "crop_pct": None}
    expected = {
        "input_size": (3, 192, 192),
        "interpolation": "bicubic",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    assert resolve_data_config(FakeModel(partial)) == expected
    assert resolve_data_config(pretrained_cfg=partial) == expected
    assert timm_data.resolve_data_config(pretrained_cfg=partial) == expected
    assert resolve_data_config(pretrained_cfg={})["input_size"] == (3, 224, 224)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: resolve_data_config(), "needs a model"),
        (lambda: resolve_data_config(object()), "no usable `pretrained_cfg`"),
        (lambda: resolve_data_config(FakeModel(None, img_size=224)), "no usable `pretrained_cfg`"),
        (
            lambda: resolve_data_config(FakeModel(["input_size"])),
            r"FakeModel\.pretrained_cfg must be a mapping",
        ),
        (lambda: resolve_data_config(pretrained_cfg="swin_tiny"), "pretrained_cfg must be a mapping"),
    ],
)
def test_resolve_data_config_type_errors(call, match):
    with pytest.raises(TypeError, match=match):
        call()


# ------------------------------------------------------------------------------------------------------
# ImageNet labels
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [1000, 21841])
def test_class_names_match_timm(timm_data, num_classes):
    subset = timm_data.infer_imagenet_subset({"num_classes": num_classes})
    info = timm_data.ImageNetInfo(subset)
    assert imagenet_synsets(num_classes) == info.label_names()
    assert imagenet_class_names(num_classes) == info.label_descriptions()
    assert imagenet_class_names(num_classes) == info.label_descriptions(detailed=False)
    short = imagenet_class_names(num_classes, short=True)
    assert len(short) == num_classes
    assert short == [d.split(", ")[0] for d in info.label_descriptions()]
    for i in (0, 1, 281, 500, num_classes // 3, num_classes - 1):
        assert imagenet_class_names(num_classes)[i] == info.index_to_description(i)
        assert imagenet_synsets(num_classes)[i] == info.index_to_label_name(i)


def test_swin_in22k_heads_use_21841_classes(timm_data):
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg("swin_base_patch4_window7_224.ms_in22k").to_dict()
    assert cfg["num_classes"] == 21841
    assert timm_data.infer_imagenet_subset(cfg) == "imagenet-22k"
    assert len(imagenet_class_names(cfg["num_classes"])) == 21841


def test_class_names_spot_checks():
    names, wnids = imagenet_class_names(1000), imagenet_synsets(1000)
    assert (wnids[0], names[0]) == ("n01440764", "tench, Tinca tinca")
    assert (wnids[281], names[281]) == ("n02123045", "tabby, tabby cat")
    assert wnids[999] == "n15075141" and names[999].startswith("toilet tissue")
    assert imagenet_class_names(1000, short=True)[281] == "tabby"
    wnids22k = imagenet_synsets(21841)
    assert wnids22k[0] == "n00004475" and imagenet_class_names(21841)[0] == "organism, being"
    assert wnids22k == sorted(wnids22k)


def test_class_names_returns_copies():
    names = imagenet_class_names(1000)
    names[0] = "changed"
    imagenet_synsets(1000).clear()
    assert imagenet_class_names(1000)[0] == "tench, Tinca tinca"
    assert len(imagenet_synsets(1000)) == 1000


@pytest.mark.parametrize("num_classes", [0, 10, 11821, 21842, 21843])
def test_unsupported_num_classes(num_classes):
    with pytest.raises(ValueError, match=rf"num_classes={num_classes}; supported: 1000 .*21841"):
        imagenet_class_names(num_classes)
    with pytest.raises(ValueError, match="supported"):
        imagenet_synsets(num_classes)


def test_num_classes_type_error():
    with pytest.raises(TypeError, match="num_classes must be an int"):
        imagenet_class_names("1000")


# ------------------------------------------------------------------------------------------------------
# no torch / timm in the package
# ------------------------------------------------------------------------------------------------------


def test_data_module_imports_only_numpy_pil_stdlib():
    tree = ast.parse((REPO_ROOT / "swin_jax" / "data.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots <= {"numpy", "PIL", "__future__", *sys.stdlib_module_names}, roots
    assert not roots & {"torch", "torchvision", "timm"}


def test_import_does_not_load_torch():
    code = (
        "import sys, swin_jax.data as d\n"
        "from PIL import Image\n"
        "d.create_transform(224)(Image.new('RGB', (300, 200))); d.imagenet_class_names(21841)\n"
        "bad = sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    pythonpath = [str(REPO_ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, pythonpath)))
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
