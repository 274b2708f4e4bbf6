"""Image-folder datasets, training augmentation and grain data loaders for fine-tuning swin_jax models.

This module adds the *training* side of the data pipeline; the eval preprocessing lives in
:mod:`swin_jax.data` and is reused here (never duplicated):

* :class:`ImageFolder` reads the torchvision / timm ``ImageFolder`` layout (``root/<class>/<image>``) with
  the same class and sample order as ``torchvision.datasets.ImageFolder``, and fails early with clear
  messages (missing root, no classes, no images, a single class). :func:`check_num_classes` compares a
  model head with the dataset and :func:`verify_images` finds every unreadable / corrupt file at once.
* :class:`TrainTransform` (built by :func:`create_train_transform`) is timm's default fine-tuning
  augmentation (``timm.data.create_transform(input_size, is_training=True)``) in PIL + numpy:
  ``RandomResizedCrop`` (torchvision's sampling algorithm, bicubic), horizontal flip, colour jitter 0.4 or
  a "RandAugment-lite", then ``ToTensor`` + ``Normalize`` (the latter through :func:`swin_jax.data.create_transform`).
  All randomness comes from a ``numpy.random.Generator``, so it is reproducible.
* :func:`make_loader` / :func:`make_eval_loader` build `grain <https://github.com/google/grain>`_
  pipelines yielding ``{"image": float32 [B, H, W, 3], "label": int32 [B]}`` batches that are deterministic
  for a given seed, independent of the worker count, split across hosts by global batch and resumable.

Only numpy, Pillow, grain and the standard library are used (never torch, torchvision or timm).

Example::

    from swin_jax.data import create_transform, resolve_data_config
    from swin_jax.datasets import (ImageFolder, check_num_classes, create_train_transform, make_eval_loader,
                                   make_loader, verify_images)

    train_ds = ImageFolder("data/train")
    verify_images(train_ds)
    check_num_classes(train_ds, model.num_classes)
    cfg = resolve_data_config(model)
    train_loader = make_loader(train_ds, transform=create_train_transform(**cfg), batch_size=32, shuffle=True,
                               seed=0, num_epochs=10, drop_remainder=True)
    for step, batch in enumerate(train_loader):
        ...  # batch["image"]: float32 [32, H, W, 3], batch["label"]: int32 [32]
    eval_loader = make_eval_loader(ImageFolder("data/val"), transform=create_transform(**cfg), batch_size=64)
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .data import (
    DEFAULT_INTERPOLATION,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    _as_hw,
    create_transform,
)

__all__ = [
    "IMG_EXTENSIONS",
    "ImageFolder",
    "Loader",
    "TrainTransform",
    "check_num_classes",
    "create_train_transform",
    "make_eval_loader",
    "make_loader",
    "random_resized_crop_params",
    "verify_images",
]

IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")

# ----------------------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------------------


class ImageFolder:
    """A ``root/<class_name>/<image file>`` dataset, ordered like ``torchvision.datasets.ImageFolder``.

    Classes are the sub-directories of ``root`` sorted by name (label ``i`` is ``classes[i]``); samples are
    the files below each class directory (recursively, following symlinks, as torchvision) whose extension
    is one of :data:`IMG_EXTENSIONS` (case-insensitive), sorted by path within each class. Files are only
    listed here; images are opened lazily by ``__getitem__``.

    Example::

        ds = ImageFolder("data/train")
        ds.classes          # ['cat', 'dog', ...]
        path, label = ds.samples[0]
        img, label = ds[0]  # PIL RGB image, int

    Args:
        root: Dataset root directory.
        min_classes: Minimum number of classes required (default 2: a classifier needs at least two).

    Raises:
        FileNotFoundError: If ``root`` does not exist.
        NotADirectoryError: If ``root`` is not a directory.
        ValueError: If ``root`` has no class sub-directories, no image files, or fewer than
            ``min_classes`` classes. Class directories without images are reported (torchvision raises
            for them as well).
    """

    def __init__(self, root: str | os.PathLike, *, min_classes: int = 2) -> None:
        root = os.fspath(root)
        if not os.path.exists(root):
            raise FileNotFoundError(f"ImageFolder root {root!r} does not exist.")
        if not os.path.isdir(root):
            raise NotADirectoryError(f"ImageFolder root {root!r} is not a directory.")
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not classes:
            raise ValueError(
                f"ImageFolder root {root!r} has no class sub-directories; expected the layout "
                "root/<class_name>/<image>.jpg (one directory per class)."
            )
        samples: list[tuple[str, int]] = []
        empty: list[str] = []
        for label, name in enumerate(classes):
            found = []
            for dirpath, _, fnames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                for fname in sorted(fnames):
                    if fname.lower().endswith(IMG_EXTENSIONS):
                        found.append((os.path.join(dirpath, fname), label))
            if not found:
                empty.append(name)
            samples.extend(found)
        if not samples:
            raise ValueError(
                f"ImageFolder root {root!r} contains no image files (extensions {', '.join(IMG_EXTENSIONS)}) "
                f"in its {len(classes)} class directories."
            )
        if empty:
            raise ValueError(
                f"ImageFolder root {root!r}: class directories without image files: {empty}. Remove them or add images."
            )
        if len(classes) < min_classes:
            raise ValueError(
                f"ImageFolder root {root!r} has only {len(classes)} class ({classes}); training a classifier "
                f"needs >= {min_classes} classes (one sub-directory per class)."
            )
        self.root = root
        self.classes: list[str] = classes
        self.class_to_idx: dict[str, int] = {c: i for i, c in enumerate(classes)}
        self.samples: list[tuple[str, int]] = samples
        self.targets: list[int] = [s[1] for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """Return ``(PIL RGB image, label)`` for sample ``index``."""
        path, label = self.samples[index]
        with open(path, "rb") as f:
            img = Image.open(f)
            img = img.convert("RGB")
        return img, label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={self.root!r}, classes={len(self.classes)}, samples={len(self)})"


def check_num_classes(dataset: Any, num_classes: int) -> None:
    """Raise if a model with ``num_classes`` outputs does not fit ``dataset`` (an :class:`ImageFolder`).

    Example::

        check_num_classes(ImageFolder("data/train"), model.num_classes)

    Raises:
        ValueError: If ``num_classes`` differs from ``len(dataset.classes)``.
    """
    n = len(dataset.classes)
    if int(num_classes) != n:
        root = getattr(dataset, "root", "?")
        raise ValueError(
            f"Model num_classes={num_classes} does not match the dataset: {root!r} has {n} classes "
            f"({n} class directories). Build the model with num_classes={n}."
        )


def _verify_one(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            img.verify()
        # verify() does not decode pixel data (a truncated JPEG passes it); load() does.
        with Image.open(path) as img:
            img.load()
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
        return f"{path}: {type(e).__name__}: {e}"
    return None


def verify_images(dataset: Any, max_workers: int | None = None) -> None:
    """Open and decode every image of ``dataset`` (PIL ``verify()`` then ``load()``), raising once for all bad files.

    Example::

        verify_images(ImageFolder("data/train"), max_workers=8)

    Args:
        dataset: An :class:`ImageFolder` (anything with ``samples`` of ``(path, label)``).
        max_workers: Threads used to read files (default: ``min(32, os.cpu_count() + 4)``).

    Raises:
        ValueError: Listing every unreadable / corrupt / truncated file with the reason.
    """
    paths = [p for p, _ in dataset.samples]
    with ThreadPoolExecutor(max_workers=max_workers) as ex:
        errors = [e for e in ex.map(_verify_one, paths) if e is not None]
    if errors:
        lines = "\n  ".join(errors)
        raise ValueError(f"{len(errors)} of {len(paths)} image files are unreadable or corrupt:\n  {lines}")


# ----------------------------------------------------------------------------------------------------------
# Training augmentation
# ----------------------------------------------------------------------------------------------------------

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def random_resized_crop_params(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[int, int, int, int]:
    """Sample a crop like ``torchvision.transforms.RandomResizedCrop.get_params`` (and timm's).

    Up to 10 attempts: area fraction ~ U(scale), log aspect ratio ~ U(log ratio), ``w = round(sqrt(a*r))``,
    ``h = round(sqrt(a/r))``; accepted if it fits, with a uniform position. Otherwise a center crop with the
    aspect ratio clamped into ``ratio``.

    Example::

        top, left, h, w = random_resized_crop_params(np.random.default_rng(0), 640, 480)

    Returns:
        ``(top, left, h, w)`` in pixels.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# RandAugment-lite: magnitude m in [0, 10] (timm's _LEVEL_DENOM = 10, "increasing" variants).
_FILL = tuple(round(255 * v) for v in IMAGENET_DEFAULT_MEAN)  # timm's img_mean fill for geometric ops


def _signed(level: float, rng: np.random.Generator) -> float:
    return -level if rng.random() < 0.5 else level


def _affine(img: Image.Image, matrix: tuple[float, ...], resample: Image.Resampling) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=_FILL)


def _op_rotate(img, m, rng, resample):
    return img.rotate(_signed(30.0 * m / 10, rng), resample=resample, fillcolor=_FILL)


def _op_shear_x(img, m, rng, resample):
    return _affine(img, (1, _signed(0.3 * m / 10, rng), 0, 0, 1, 0), resample)


def _op_shear_y(img, m, rng, resample):
    return _affine(img, (1, 0, 0, _signed(0.3 * m / 10, rng), 1, 0), resample)


def _op_translate_x(img, m, rng, resample):
    return _affine(img, (1, 0, _signed(0.45 * m / 10, rng) * img.size[0], 0, 1, 0), resample)


def _op_translate_y(img, m, rng, resample):
    return _affine(img, (1, 0, 0, 0, 1, _signed(0.45 * m / 10, rng) * img.size[1]), resample)


def _enhance(cls):
    def op(img, m, rng, resample):
        return cls(img).enhance(1.0 + _signed(0.9 * m / 10, rng))

    return op


def _op_equalize(img, m, rng, resample):
    return ImageOps.equalize(img)


def _op_autocontrast(img, m, rng, resample):
    return ImageOps.autocontrast(img)


def _op_solarize(img, m, rng, resample):
    return ImageOps.solarize(img, 256 - int(256 * m / 10))


def _op_posterize(img, m, rng, resample):
    return ImageOps.posterize(img, max(1, 4 - int(4 * m / 10)))


RAND_AUGMENT_OPS: dict[str, Callable] = {
    "Rotate": _op_rotate,
    "ShearX": _op_shear_x,
    "ShearY": _op_shear_y,
    "TranslateX": _op_translate_x,
    "TranslateY": _op_translate_y,
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Color": _enhance(ImageEnhance.Color),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "Equalize": _op_equalize,
    "AutoContrast": _op_autocontrast,
    "Solarize": _op_solarize,
    "Posterize": _op_posterize,
}


@dataclass(frozen=True)
class TrainTransform:
    """Random training augmentation: PIL image + ``numpy.random.Generator`` -> float32 ``[H, W, 3]``.

    Steps (timm ``transforms_imagenet_train`` defaults): RandomResizedCrop(``scale``, ``ratio``) resized to
    ``img_size`` with ``interpolation``; horizontal flip with probability ``hflip``; then either
    RandAugment-lite (``rand_augment=(num_ops, magnitude)``: ``num_ops`` ops drawn with replacement from
    :data:`RAND_AUGMENT_OPS`, each applied with probability 0.5 at ``magnitude`` in [0, 10], random sign)
    or, if ``rand_augment`` is None, colour jitter (brightness / contrast / saturation factors
    ~ U(1 - j, 1 + j), in random order, as ``torchvision.ColorJitter(j, j, j)``); finally scaling to
    [0, 1] and mean/std normalization via :func:`swin_jax.data.create_transform`.

    The same generator state always gives the same output (it need not match timm bit for bit: timm draws
    from Python's / torch's global RNGs).

    Example::

        t = create_train_transform(224)
        x = t(Image.open("cat.jpg"), np.random.default_rng(0))  # float32 [224, 224, 3]
    """

    img_size: tuple[int, int]
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = DEFAULT_INTERPOLATION
    hflip: float = 0.5
    color_jitter: float | None = 0.4
    rand_augment: tuple[int, float] | None = None
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"Unknown interpolation {self.interpolation!r}; expected one of {sorted(_RESAMPLE)}.")
        if not (0 < self.scale[0] <= self.scale[1]) or not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"Bad scale {self.scale} or ratio {self.ratio}: need 0 < lo <= hi.")
        if self.rand_augment is not None and not (0 <= self.rand_augment[1] <= 10):
            raise ValueError(f"RandAugment magnitude must be in [0, 10], got {self.rand_augment[1]}.")
        if self.rand_augment is not None and self.rand_augment[0] < 0:
            raise ValueError(f"RandAugment needs a number of ops >= 0, got {self.rand_augment[0]}.")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {self.hflip}.")
        if self.color_jitter is not None and self.color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0 (or None), got {self.color_jitter}.")
        # Reuse data.py's ToTensor + Normalize: a squash/crop_pct=1 eval transform does no resize or crop
        # on an image that already has size img_size.
        to_array = create_transform(
            input_size=self.img_size,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=1.0,
            crop_mode="squash",
        )
        object.__setattr__(self, "_to_array", to_array)

    def augment(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """Apply the random PIL steps only; returns an RGB image of size ``img_size``."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        resample = _RESAMPLE[self.interpolation]
        top, left, h, w = random_resized_crop_params(rng, img.size[0], img.size[1], self.scale, self.ratio)
        out_h, out_w = self.img_size
        img = img.crop((left, top, left + w, top + h))  # torchvision resized_crop: crop, then resize
        if img.size != (out_w, out_h):
            img = img.resize((out_w, out_h), resample)
        if self.hflip > 0 and rng.random() < self.hflip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rand_augment is not None:
            num_ops, magnitude = self.rand_augment
            names = list(RAND_AUGMENT_OPS)
            for k in rng.integers(0, len(names), size=int(num_ops)):
                if rng.random() < 0.5:
                    img = RAND_AUGMENT_OPS[names[k]](img, magnitude, rng, Image.Resampling.BILINEAR)
        elif self.color_jitter:
            j = float(self.color_jitter)
            enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
            factors = [rng.uniform(max(0.0, 1 - j), 1 + j) for _ in enhancers]
            for k in rng.permutation(len(enhancers)):
                img = enhancers[k](img).enhance(factors[k])
        return img

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> np.ndarray:
        """Augment ``img`` with ``rng`` and return a normalized float32 ``[H, W, 3]`` array."""
        if not isinstance(img, Image.Image):
            raise TypeError(f"{type(self).__name__} expects a PIL.Image.Image, got {type(img).__name__}.")
        return self._to_array(self.augment(img, rng))


def create_train_transform(
    input_size: int | Sequence[int] = 224,
    interpolation: str = DEFAULT_INTERPOLATION,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    hflip: float = 0.5,
    color_jitter: float | None = 0.4,
    rand_augment: tuple[int, float] | None = None,
    **_unused: Any,
) -> TrainTransform:
    """Build :class:`TrainTransform`; accepts a :func:`swin_jax.data.resolve_data_config` dict as ``**cfg``.

    Defaults follow ``timm.data.create_transform(input_size, is_training=True)``, with bicubic resampling
    (the Swin data config). ``crop_pct`` / ``crop_mode`` of the config are eval-only and ignored.
    ``rand_augment=(2, 9)`` corresponds to timm's ``rand-m9-n2`` (colour jitter is then off, as in timm).

    Example::

        t = create_train_transform(**resolve_data_config(model), rand_augment=(2, 9))
    """
    is_seq = isinstance(input_size, Sequence) and not isinstance(input_size, str)
    if is_seq and len(input_size) == 3 and input_size[0] != 3:
        raise ValueError(f"Only 3-channel (RGB) input is supported, got input_size={tuple(input_size)}.")
    return TrainTransform(
        img_size=_as_hw(input_size, "input_size"),
        scale=tuple(scale),
        ratio=tuple(ratio),
        interpolation=interpolation,
        hflip=hflip,
        color_jitter=color_jitter,
        rand_augment=None if rand_augment is None else (int(rand_augment[0]), float(rand_augment[1])),
        mean=tuple(mean),
        std=tuple(std),
    )


# ----------------------------------------------------------------------------------------------------------
# grain loaders
# ----------------------------------------------------------------------------------------------------------


def _wants_rng(transform: Callable) -> bool:
    """True if ``transform`` takes a second (rng) argument."""
    if isinstance(transform, TrainTransform):
        return True
    try:
        params = list(inspect.signature(transform).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


class _Position:
    """``map_with_index`` function: (position in the repeated stream, sample index) -> ``[position, index]``."""

    def __call__(self, position: int, sample_index: int) -> np.ndarray:
        return np.array([position, sample_index], np.int64)


class _LoadShare:
    """Batch function: a global batch of ``[position, sample index]`` rows -> this shard's images and labels.

    Shard ``i`` of ``n`` loads only rows ``[i * b, (i + 1) * b)`` of each global batch (``b = batch_size / n``).
    With ``pad``, a partial last batch is padded to ``batch_size`` rows first (zero images, label 0) and a bool
    ``"mask"`` marks the real samples.
    """

    def __init__(
        self,
        dataset: Any,
        transform: Callable,
        seed: int,
        epoch_len: int,
        batch_size: int,
        shard: tuple[int, int],
        pad: bool,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.epoch_len = epoch_len
        self.batch_size = batch_size
        self.shard_index, self.shard_count = shard
        self.pad = pad
        self.wants_rng = _wants_rng(transform)

    def _load(self, position: int, sample_index: int) -> tuple[np.ndarray, int]:
        img, label = self.dataset[int(sample_index)]
        if self.wants_rng:
            epoch = int(position) // self.epoch_len
            image = self.transform(img, np.random.default_rng([self.seed, epoch, int(sample_index)]))
        else:
            image = self.transform(img)
        return np.asarray(image, dtype=np.float32), int(label)

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        share = (self.batch_size if self.pad else len(rows)) // self.shard_count
        lo = self.shard_index * share
        loaded = [self._load(position, index) for position, index in rows[lo : lo + share]]
        if not self.pad:
            return {"image": np.stack([im for im, _ in loaded]), "label": np.array([lb for _, lb in loaded], np.int32)}
        shape = (loaded[0][0] if loaded else self._load(*rows[0])[0]).shape  # an all-padding share needs the shape
        images = np.zeros((share, *shape), np.float32)
        labels = np.zeros(share, np.int32)
        for k, (im, lb) in enumerate(loaded):
            images[k], labels[k] = im, lb
        return {"image": images, "label": labels, "mask": np.arange(share) < len(loaded)}


def _copy_out_of_shared_memory(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Plain numpy copies of worker outputs (grain hands them over in shared memory)."""
    return {k: np.array(v) for k, v in batch.items()}


def _ensure_absl_flags_parsed() -> None:
    """grain's multiprocessing reads absl flags; outside an absl app they are unparsed and grain raises."""
    from absl import flags  # grain dependency

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class Loader:
    """Iterable over batches of a grain pipeline built by :func:`make_loader` / :func:`make_eval_loader`.

    ``iter(loader)`` returns a fresh grain ``DatasetIterator`` starting at ``start_step``; each yields dicts
    of numpy arrays. Two ways to resume:

    * ``make_loader(..., start_step=k)`` (or ``loader.iter_from(k)``): random access, begins at batch ``k`` of
      the stream (epochs counted across; exact because every batch is a pure function of its index).
    * grain iterator state: ``state = it.get_state()`` (a small JSON-able dict; save it with your
      checkpoint), then ``it2 = iter(new_loader); it2.set_state(state)``.

    Attributes:
        dataset: The grain ``IterDataset`` behind the loader.
        steps_per_epoch: Batches per epoch.
        num_batches: Total batches (``None`` when ``num_epochs`` is None: infinite).
    """

    def __init__(self, batches: grain.MapDataset, steps_per_epoch: int, num_batches: int | None, read, workers):
        self._batches = batches
        self._read_options = read
        self._worker_count = workers
        self.steps_per_epoch = steps_per_epoch
        self.num_batches = num_batches
        self.start_step = 0

    def _to_iter(self, batches: grain.MapDataset) -> grain.IterDataset:
        ds = batches.to_iter_dataset(self._read_options)
        if self._worker_count > 0:
            _ensure_absl_flags_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count))
            ds = ds.map(_copy_out_of_shared_memory)
        return ds

    @property
    def dataset(self) -> grain.IterDataset:
        return self._to_iter(self._batches[self.start_step :])

    def iter_from(self, step: int) -> Iterator[dict[str, np.ndarray]]:
        """Iterator starting at batch ``step`` of the stream (0-based, counted across epochs)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        return iter(self._to_iter(self._batches[step:]))

    def __iter__(self):
        return self.iter_from(self.start_step)

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("Infinite loader (num_epochs=None) has no len(); use steps_per_epoch.")
        return max(0, self.num_batches - self.start_step)


def make_loader(
    dataset: Any,
    *,
    transform: Callable,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_epochs: int | None = None,
    drop_remainder: bool,
    worker_count: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    start_step: int = 0,
    read_threads: int = 0,
    pad_last: bool = False,
) -> Loader:
    """Build a deterministic grain loader yielding ``{"image": float32 [B, H, W, 3], "label": int32 [B]}``.

    Pipeline (``grain.MapDataset``): ``range(len(dataset))`` -> ``shuffle(seed)`` (grain reshuffles every epoch
    with seed ``seed + epoch``) -> ``batch`` of sample indices (per epoch: batches never straddle epochs, the
    last partial batch of each epoch is dropped with ``drop_remainder``) -> load this shard's part of each
    batch and apply ``transform`` -> ``repeat(num_epochs)`` -> ``to_iter_dataset`` (``read_threads``
    threads) -> ``mp_prefetch`` when ``worker_count > 0``.

    If ``transform`` takes two arguments (e.g. :class:`TrainTransform`) it gets a
    ``numpy.random.default_rng([seed, epoch, sample_index])``, so every sample's augmentation depends only
    on (seed, epoch, sample) — not on the order, shard, worker or thread count. Each batch is a pure function
    of its index, so the output is identical for any ``worker_count`` / ``read_threads``.

    Sharding (multi-host): ``batch_size`` is the *global* batch. Shard ``i`` of ``n`` reads and yields only
    rows ``[i * batch_size / n, (i + 1) * batch_size / n)`` of every global batch, so the global batches (their
    samples, order and augmentation) are the same for any number of shards, and the shards concatenated in
    order are the one-shard loader's batches. ``batch_size`` must be divisible by ``shard_count``; with more
    than one shard a partial batch is either dropped (``drop_remainder``) or padded (``pad_last``). With
    ``jax.distributed``, pass ``shard_index=jax.process_index(), shard_count=jax.process_count()`` and
    assemble the global array with :func:`swin_jax.distributed.shard_batch`.

    Example::

        loader = make_loader(ImageFolder("data/train"), transform=create_train_transform(224), batch_size=32,
                             shuffle=True, seed=0, num_epochs=None, drop_remainder=True, worker_count=4)
        it = iter(loader)
        batch = next(it)
        state = it.get_state()  # resume later: it = iter(loader); it.set_state(state)

    Args:
        dataset: An :class:`ImageFolder` (any sequence of ``(PIL image, label)`` that pickles, for workers).
        transform: ``transform(img) -> [H, W, 3]`` or ``transform(img, rng) -> [H, W, 3]``.
        batch_size: Global batch size (this shard yields ``batch_size // shard_count`` rows of each).
        shuffle: Shuffle every epoch.
        seed: Seed for shuffling and augmentation (0 <= seed < 2**32).
        num_epochs: Number of epochs, or None to repeat forever.
        drop_remainder: Drop each epoch's last partial batch.
        worker_count: grain worker processes (0: no processes, main process only).
        shard_index: This process's share of each batch.
        shard_count: Number of shares (processes).
        start_step: First batch to yield (resume by step).
        read_threads: Threads per process for loading / transforming (0: grain's default ReadOptions).
        pad_last: Pad partial batches to ``batch_size`` (zero images, label 0) and add a bool ``"mask"``
            (True for real samples).

    Returns:
        A :class:`Loader`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"Need 0 <= shard_index < shard_count, got shard_index={shard_index}, {shard_count=}.")
    if batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} must be divisible by shard_count={shard_count} (equal shares).")
    if shard_count > 1 and not (drop_remainder or pad_last):
        raise ValueError("With shard_count > 1 a partial batch can't be split equally: use drop_remainder or pad_last.")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}.")
    if worker_count < 0:
        raise ValueError(f"worker_count must be >= 0, got {worker_count}.")
    epoch_len = len(dataset)
    if epoch_len == 0:
        raise ValueError("The dataset is empty.")
    steps_per_epoch = epoch_len // batch_size if drop_remainder else -(-epoch_len // batch_size)
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {epoch_len} samples of the dataset and drop_remainder=True: "
            "no batch would be produced."
        )
    ds = grain.MapDataset.range(epoch_len)
    if shuffle:
        ds = ds.shuffle(seed)
    ds = ds.map_with_index(_Position()).batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(_LoadShare(dataset, transform, seed, epoch_len, batch_size, (shard_index, shard_count), pad_last))
    ds = ds.repeat(num_epochs)
    num_batches = None if num_epochs is None else num_epochs * steps_per_epoch
    read = grain.ReadOptions(num_threads=read_threads) if read_threads > 0 else grain.ReadOptions()
    loader = Loader(ds, steps_per_epoch, num_batches, read, worker_count)
    loader.start_step = int(start_step)
    return loader


def make_eval_loader(
    dataset: Any,
    *,
    transform: Callable,
    batch_size: int,
    worker_count: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    read_threads: int = 0,
) -> Loader:
    """One pass over ``dataset`` in order, every sample exactly once, with static batch shapes.

    ``transform`` is normally ``swin_jax.data.create_transform(**resolve_data_config(model))``. The last
    partial batch is kept and **padded** to ``batch_size`` (zero images, label 0); each batch carries a bool
    ``"mask"`` ``[B]`` that is False for the padding, so a jitted eval step sees one shape. Weight metrics by
    ``mask`` (e.g. ``correct = ((logits.argmax(-1) == label) & mask).sum()``). With ``shard_count > 1`` each
    process gets its share of every padded global batch (see :func:`make_loader`).

    Example::

        loader = make_eval_loader(ImageFolder("data/val"), transform=create_transform(**cfg), batch_size=64)
        for batch in loader:
            n_real = batch["mask"].sum()
    """
    return make_loader(
        dataset,
        transform=transform,
        batch_size=batch_size,
        shuffle=False,
        seed=0,
        num_epochs=1,
        drop_remainder=False,
        worker_count=worker_count,
        shard_index=shard_index,
        shard_count=shard_count,
        read_threads=read_threads,
        pad_last=True,
    )
