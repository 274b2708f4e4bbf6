"""Tests for swin_jax.datasets: ImageFolder, training augmentation and the grain loaders."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from swin_jax.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from swin_jax.datasets import (
    RAND_AUGMENT_OPS,
    ImageFolder,
    TrainTransform,
    check_num_classes,
    create_train_transform,
    make_eval_loader,
    make_loader,
    random_resized_crop_params,
    verify_images,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
CLASSES = ("tabby", "Zebra", "apple")  # unsorted on purpose; 'Zebra' < 'apple' in sorted order


def _photo(name: str, size: tuple[int, int]) -> Image.Image:
    skdata = pytest.importorskip("skimage.data")
    return Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size, Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """3 classes x 4 photos (40-80 px, mixed extensions incl. upper case) plus a non-image file."""
    root = tmp_path_factory.mktemp("imagefolder")
    exts = (".jpg", ".PNG", ".jpeg", ".png")
    for c, cls in enumerate(CLASSES):
        (root / cls).mkdir()
        for i, name in enumerate(PHOTOS):
            size = (40 + 10 * i + 3 * c, 80 - 8 * i)
            _photo(name, size).save(root / cls / f"img_{3 - i}{exts[(i + c) % 4]}")
        (root / cls / "notes.txt").write_text("not an image")
    return root


class _IndexDataset:
    """In-memory dataset whose image i is a solid colour encoding i (cheap, for order/epoch tests)."""

    def __init__(self, n: int, num_classes: int = 3) -> None:
        self.n = n
        self.classes = [str(c) for c in range(num_classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return Image.new("RGB", (4, 4), (i, 0, 0)), i % len(self.classes)


def _raw(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def _ids(batch) -> list[int]:
    return [int(v) for v in batch["image"][:, 0, 0, 0]]


def _same(batches_a, batches_b) -> bool:
    return len(batches_a) == len(batches_b) and all(
        a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a) for a, b in zip(batches_a, batches_b)
    )


# ----------------------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------------------


def test_imagefolder_matches_torchvision(folder):
    tv_datasets = pytest.importorskip("torchvision.datasets")
    ds = ImageFolder(folder)
    ref = tv_datasets.ImageFolder(str(folder))
    assert ds.classes == ref.classes == sorted(CLASSES)
    assert ds.class_to_idx == ref.class_to_idx
    assert ds.samples == ref.samples
    assert ds.targets == ref.targets
    assert len(ds) == 12
    img, label = ds[5]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and label == ds.samples[5][1] == 1
    assert img.size == Image.open(ds.samples[5][0]).size


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        ImageFolder(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no class sub-directories"):
        ImageFolder(empty)
    (empty / "a").mkdir()
    (empty / "b").mkdir()
    (empty / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="contains no image files"):
        ImageFolder(empty)
    Image.new("RGB", (8, 8)).save(empty / "a" / "x.png")
    with pytest.raises(ValueError, match=r"class directories without image files: \['b'\]"):
        ImageFolder(empty)
    one = tmp_path / "one"
    (one / "only").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "only" / "x.jpg")
    with pytest.raises(ValueError, match=r"only 1 class .*needs >= 2 classes"):
        ImageFolder(one)
    assert len(ImageFolder(one, min_classes=1)) == 1


def test_check_num_classes(folder):
    ds = ImageFolder(folder)
    check_num_classes(ds, 3)
    with pytest.raises(ValueError, match=r"num_classes=1000 does not match .* has 3 classes"):
        check_num_classes(ds, 1000)


def test_verify_images_lists_every_bad_file(tmp_path, folder):
    verify_images(ImageFolder(folder), max_workers=2)
    root = tmp_path / "bad"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        _photo("chelsea", (64, 48)).save(root / cls / "ok.jpg")
    good = (root / "a" / "ok.jpg").read_bytes()
    (root / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "b" / "garbage.png").write_bytes(b"this is not a png")
    ds = ImageFolder(root)  # listing does not open files
    with pytest.raises(ValueError, match="2 of 4 image files are unreadable") as e:
        verify_images(ds, max_workers=2)
    msg = str(e.value)
    assert str(root / "a" / "truncated.jpg") in msg and str(root / "b" / "garbage.png") in msg
    assert "ok.jpg" not in msg


# ----------------------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------------------


def test_random_resized_crop_bounds_and_statistics():
    transforms = pytest.importorskip("torchvision.transforms")
    torch = pytest.importorskip("torch")
    width, height, n = 160, 90, 3000
    rng = np.random.default_rng(0)
    ours = np.array([random_resized_crop_params(rng, width, height) for _ in range(n)])
    top, left, h, w = ours.T
    assert (h > 0).all() and (w > 0).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (width * height)
    assert area.min() >= 0.07 and area.max() <= 1.0
    aspect = w / h
    assert aspect.min() >= 0.7 and aspect.max() <= 1.4  # 3/4..4/3 up to rounding (and fallback)
    torch.manual_seed(0)
    img = Image.new("RGB", (width, height))
    ref = np.array([transforms.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(n)])
    ref_area = ref[:, 2] * ref[:, 3] / (width * height)
    assert abs(area.mean() - ref_area.mean()) < 0.03
    assert abs(np.log(aspect).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.03
    # centre of the crop is uniform-ish around the image centre
    assert abs((top + h / 2).mean() - height / 2) < 2 and abs((left + w / 2).mean() - width / 2) < 3


@pytest.mark.parametrize("size", [(400, 20), (20, 400), (100, 100)])
def test_random_resized_crop_fallback_matches_torchvision(size):
    transforms = pytest.importorskip("torchvision.transforms")
    # scale close to 1 on an elongated image never fits in 10 attempts -> deterministic centre crop
    scale = (0.99, 1.0)
    ratio = (3 / 4, 4 / 3) if size[0] != size[1] else (2.0, 3.0)
    ref = transforms.RandomResizedCrop.get_params(Image.new("RGB", size), list(scale), list(ratio))
    got = random_resized_crop_params(np.random.default_rng(1), *size, scale=scale, ratio=ratio)
    assert got == tuple(ref)


def test_horizontal_flip_rate_and_no_random_crop_identity():
    img = _photo("astronaut", (48, 48))
    t = create_train_transform(24, scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=None)
    plain = create_transform(24, crop_pct=1.0, crop_mode="squash")(img)
    mirrored = plain[:, ::-1]
    flips = 0
    for s in range(300):
        out = t(img, np.random.default_rng(s))
        if np.array_equal(out, mirrored):
            flips += 1
        else:
            np.testing.assert_array_equal(out, plain)  # full-image crop + bicubic resize + normalize == eval path
    assert 0.4 < flips / 300 < 0.6
    t0 = create_train_transform(24, scale=(1.0, 1.0), ratio=(1.0, 1.0), color_jitter=None, hflip=0.0)
    assert all(np.array_equal(t0(img, np.random.default_rng(s)), plain) for s in range(20))


@pytest.mark.parametrize("rand_augment", [None, (2, 9)])
def test_train_transform_deterministic_and_normalized(rand_augment):
    img = _photo("coffee", (70, 50))
    t = create_train_transform(
        (3, 32, 40), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, rand_augment=rand_augment
    )
    assert isinstance(t, TrainTransform) and t.img_size == (32, 40)
    a = t(img, np.random.default_rng(5))
    assert a.shape == (32, 40, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, t(img, np.random.default_rng(5)))
    assert not np.array_equal(a, t(img, np.random.default_rng(6)))
    lo = (0 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    hi = (1 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    assert (a >= lo - 1e-5).all() and (a <= hi + 1e-5).all()


@pytest.mark.parametrize("name", sorted(RAND_AUGMENT_OPS))
def test_rand_augment_ops(name):
    img = _photo("chelsea", (30, 20))
    out = RAND_AUGMENT_OPS[name](img, 9, np.random.default_rng(0), Image.Resampling.BILINEAR)
    assert out.mode == "RGB" and out.size == img.size
    if name not in ("Equalize", "AutoContrast"):
        zero = RAND_AUGMENT_OPS[name](img, 0, np.random.default_rng(0), Image.Resampling.BILINEAR)
        if name != "Posterize":  # magnitude 0 is (near) identity for the others
            assert np.abs(_raw(zero) - _raw(img)).mean() < 1.0


def test_transform_argument_errors():
    with pytest.raises(ValueError, match="interpolation"):
        create_train_transform(32, interpolation="cubic")
    with pytest.raises(ValueError, match="3-channel"):
        create_train_transform((1, 32, 32))
    with pytest.raises(ValueError, match="magnitude"):
        create_train_transform(32, rand_augment=(2, 11))


# ----------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------


def _train_loader(ds, **kw):
    args = dict(transform=create_train_transform(32), batch_size=4, shuffle=True, seed=0, num_epochs=2)
    args.update(drop_remainder=True)
    args.update(kw)
    return make_loader(ds, **args)


def test_loader_shapes_determinism_and_workers(folder):
    ds = ImageFolder(folder)
    loader = _train_loader(ds)
    batches = list(loader)
    assert len(batches) == len(loader) == 6 and loader.steps_per_epoch == 3
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
        lo = (0 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
        hi = (1 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
        assert (b["image"] >= lo - 1e-5).all() and (b["image"] <= hi + 1e-5).all()
    for epoch in (0, 1):
        labels = np.concatenate([b["label"] for b in batches[3 * epoch : 3 * epoch + 3]])
        assert sorted(labels.tolist()) == sorted(ds.targets)
    assert _same(batches, list(_train_loader(ds)))
    assert not _same(batches, list(_train_loader(ds, seed=1)))
    # epochs are reshuffled and re-augmented
    assert not _same(batches[:3], batches[3:])
    # thread pool and worker processes give exactly the same batches
    assert _same(batches, list(_train_loader(ds, read_threads=2)))
    it = iter(_train_loader(ds, worker_count=2))
    try:
        assert _same(batches, list(it))
    finally:
        it.close()


def test_every_sample_once_per_epoch_and_reshuffled():
    ds = _IndexDataset(20)
    loader = make_loader(ds, transform=_raw, batch_size=5, shuffle=True, seed=3, num_epochs=3, drop_remainder=True)
    ids = [_ids(b) for b in loader]
    epochs = [sum(ids[4 * e : 4 * e + 4], []) for e in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(20))
    assert epochs[0] != list(range(20)) and epochs[0] != epochs[1] != epochs[2]
    unshuffled = make_loader(ds, transform=_raw, batch_size=5, shuffle=False, seed=3, num_epochs=2, drop_remainder=True)
    assert sum((_ids(b) for b in unshuffled), []) == list(range(20)) * 2


def test_drop_remainder_is_per_epoch():
    ds = _IndexDataset(11)
    kept = make_loader(ds, transform=_raw, batch_size=4, shuffle=True, seed=0, num_epochs=2, drop_remainder=False)
    sizes = [len(_ids(b)) for b in kept]
    assert sizes == [4, 4, 3, 4, 4, 3]
    dropped = make_loader(ds, transform=_raw, batch_size=4, shuffle=True, seed=0, num_epochs=2, drop_remainder=True)
    assert [len(_ids(b)) for b in dropped] == [4, 4, 4, 4] and len(dropped) == 4


def test_shards_split_every_global_batch():
    """Shard i of n yields rows [i*b, (i+1)*b) of each global batch: the global batches are those of one shard."""
    ds = _IndexDataset(30)
    kw = dict(transform=_raw, batch_size=6, shuffle=True, seed=7, num_epochs=2, drop_remainder=True)
    whole = [_ids(b) for b in make_loader(ds, **kw)]
    shards = [[_ids(b) for b in make_loader(ds, **kw, shard_index=i, shard_count=3)] for i in range(3)]
    assert [len(s) for s in shards] == [10, 10, 10] and all(len(b) == 2 for s in shards for b in s)
    assert [sum((s[k] for s in shards), []) for k in range(10)] == whole
    # padded eval batches: the shares of the last (partial, padded) batch carry the mask
    ev = [make_eval_loader(ds, transform=_raw, batch_size=8, shard_index=i, shard_count=2) for i in range(2)]
    last = [list(e)[-1] for e in ev]
    assert [b["mask"].tolist() for b in last] == [[True, True, True, True], [True, True, False, False]]
    assert last[1]["label"].tolist()[2:] == [0, 0]
    with pytest.raises(ValueError, match="shard_index"):
        make_loader(ds, **dict(kw, shard_index=3, shard_count=3))
    with pytest.raises(ValueError, match="batch_size=6 must be divisible by shard_count=4"):
        make_loader(ds, **dict(kw, shard_index=0, shard_count=4))
    with pytest.raises(ValueError, match="drop_remainder or pad_last"):
        make_loader(ds, **dict(kw, drop_remainder=False, shard_index=0, shard_count=3))


def test_resume_from_state_and_from_step(folder):
    ds = ImageFolder(folder)
    loader = _train_loader(ds, num_epochs=None, batch_size=5)
    it = iter(loader)
    reference = [next(it) for _ in range(7)]  # crosses two epoch boundaries (2 batches / epoch)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = it.get_state()
    resumed = iter(_train_loader(ds, num_epochs=None, batch_size=5))
    resumed.set_state(state)
    assert _same([next(resumed) for _ in range(4)], reference[3:])
    by_step = iter(_train_loader(ds, num_epochs=None, batch_size=5, start_step=3))
    assert _same([next(by_step) for _ in range(4)], reference[3:])


def test_eval_loader_keeps_and_masks_last_batch(folder):
    ds = ImageFolder(folder)
    transform = create_transform(32, crop_pct=0.875)
    loader = make_eval_loader(ds, transform=transform, batch_size=5)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    assert [b["mask"].tolist() for b in batches][-1] == [True, True, False, False, False]
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert images.shape == (15, 32, 32, 3) and labels.dtype == np.int32
    assert labels[mask].tolist() == ds.targets
    for i in (0, 7, 11):
        np.testing.assert_array_equal(images[i], transform(ds[i][0]))
    assert not images[~mask].any()


def test_loader_argument_errors():
    ds = _IndexDataset(6)
    with pytest.raises(ValueError, match="larger than the 6 samples"):
        make_loader(ds, transform=_raw, batch_size=8, shuffle=False, seed=0, drop_remainder=True)
    with pytest.raises(ValueError, match="seed"):
        make_loader(ds, transform=_raw, batch_size=2, shuffle=True, seed=-1, drop_remainder=True)
    with pytest.raises(ValueError, match="num_epochs"):
        make_loader(ds, transform=_raw, batch_size=2, shuffle=True, seed=0, num_epochs=0, drop_remainder=True)
    with pytest.raises(TypeError, match="Infinite"):
        len(make_loader(ds, transform=_raw, batch_size=2, shuffle=True, seed=0, drop_remainder=True))


def test_datasets_module_does_not_import_torch():
    code = (
        "import sys, swin_jax.datasets; "
        "bad = [m for m in ('torch', 'timm', 'torchvision') if m in sys.modules]; assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT)


def test_crop_params_math_sanity():
    # a square image and unit ratio: the crop side is round(sqrt(area * U(scale)))
    rng = np.random.default_rng(0)
    for _ in range(50):
        top, left, h, w = random_resized_crop_params(rng, 100, 100, scale=(0.25, 0.25), ratio=(1.0, 1.0))
        assert h == w == int(round(math.sqrt(2500)))
