"""Eval-time data pipeline for swin_jax: data config, image preprocessing and ImageNet labels.

This module reproduces timm's *evaluation* preprocessing without torch:

* :func:`resolve_data_config` mirrors ``timm.data.resolve_data_config`` for a model's
  ``pretrained_cfg`` and returns the same six keys (``input_size``, ``interpolation``, ``mean``,
  ``std``, ``crop_pct``, ``crop_mode``).
* :func:`create_transform` mirrors ``timm.data.create_transform(**cfg)`` (``is_training=False``),
  i.e. ``transforms_imagenet_eval`` built from torchvision ``Resize`` / ``CenterCrop`` and timm's
  ``ResizeKeepRatio`` / ``CenterCropOrPad``, followed by ``ToTensor`` + ``Normalize``. It returns a
  callable mapping a ``PIL.Image.Image`` to a float32 ``[H, W, 3]`` (channels-last) numpy array that
  equals timm's ``[3, H, W]`` tensor output transposed to HWC.
* :func:`imagenet_class_names` / :func:`imagenet_synsets` give the same class descriptions and WordNet
  ids as ``timm.data.ImageNetInfo`` for the ImageNet-1k (1000) and ImageNet-22k (21841) heads.

Only numpy, Pillow and the standard library are used (never torch, torchvision or timm).

Example::

    from PIL import Image
    cfg = resolve_data_config(model)
    transform = create_transform(**cfg)
    x = transform(Image.open("cat.jpg"))[None]  # [1, H, W, 3] float32, NHWC
    names = imagenet_class_names(1000)
"""

from __future__ import annotations

import functools
import gzip
import math
import numbers
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = [
    "DEFAULT_CROP_MODE",
    "DEFAULT_CROP_PCT",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "EvalTransform",
    "create_transform",
    "imagenet_class_names",
    "imagenet_synsets",
    "resolve_data_config",
]

IMAGENET_DEFAULT_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT: float = 0.875
DEFAULT_CROP_MODE: str = "center"
DEFAULT_INTERPOLATION: str = "bicubic"
DEFAULT_INPUT_SIZE: tuple[int, int, int] = (3, 224, 224)

_CROP_MODES = ("center", "squash", "border")
_INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
# timm create_transform() options that select a different (training / prefetcher / NaFlex) pipeline.
# They are rejected when truthy instead of being silently ignored.
_UNSUPPORTED_OPTIONS = ("is_training", "use_prefetcher", "tf_preprocessing", "separate", "naflex", "patchify")


# ----------------------------------------------------------------------------------------------------------
# Data config
# ----------------------------------------------------------------------------------------------------------


def _cfg_to_dict(cfg: Any, what: str) -> dict[str, Any]:
    """Return ``cfg`` as a plain dict (accepts any Mapping or an object with ``to_dict()``)."""
    if isinstance(cfg, Mapping):
        return dict(cfg)
    to_dict = getattr(cfg, "to_dict", None)
    if callable(to_dict):
        out = to_dict()
        if isinstance(out, Mapping):
            return dict(out)
    raise TypeError(f"{what} must be a mapping (dict) of data-config values, got {type(cfg).__name__}.")


def _as_hw(size: Any, what: str) -> tuple[int, int]:
    """Normalize an int, ``(H, W)`` or ``(C, H, W)`` size to ``(H, W)``."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) in (2, 3):
        hw = tuple(size[-2:])
        if all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in hw):
            return int(hw[0]), int(hw[1])
    raise ValueError(f"{what} must be a positive int, (H, W) or (C, H, W) of ints, got {size!r}.")


def resolve_data_config(model: Any = None, *, pretrained_cfg: Mapping[str, Any] | None = None) -> dict:
    """Resolve the eval data config of a model, like ``timm.data.resolve_data_config``.

    Values come from ``pretrained_cfg`` if given (and non-empty), otherwise from ``model.pretrained_cfg``
    (a dict carrying at least the data keys; extra keys such as ``hf_hub_id`` or ``num_classes`` are
    ignored). Missing or falsy values take timm's defaults: ``input_size`` (3, 224, 224),
    ``interpolation`` 'bicubic', ImageNet default mean/std, ``crop_pct`` 0.875, ``crop_mode`` 'center'.
    Unlike timm, if ``model`` has an ``img_size`` attribute (int or ``(H, W)``), it overrides the
    spatial part of ``input_size``, so the config matches the resolution the model was built for.

    Args:
        model: Object with a ``pretrained_cfg`` dict attribute and optionally ``img_size``.
        pretrained_cfg: Explicit pretrained config dict; takes precedence over ``model.pretrained_cfg``.

    Returns:
        Dict with exactly the keys ``input_size`` (tuple ``(C, H, W)``), ``interpolation``, ``mean``,
        ``std``, ``crop_pct`` and ``crop_mode``; pass it to :func:`create_transform` as ``**cfg``.

    Raises:
        TypeError: If neither a usable ``pretrained_cfg`` nor a model carrying one is given.
    """
    cfg: dict[str, Any] | None = None
    if pretrained_cfg is not None:
        cfg = _cfg_to_dict(pretrained_cfg, "pretrained_cfg")
    if not cfg and model is not None:
        model_cfg = getattr(model, "pretrained_cfg", None)
        if model_cfg is not None:
            cfg = _cfg_to_dict(model_cfg, f"{type(model).__name__}.pretrained_cfg")
    if cfg is None:
        if model is None:
            msg = "resolve_data_config() needs a model with a `pretrained_cfg`, or `pretrained_cfg=`."
            raise TypeError(msg)
        raise TypeError(
            f"resolve_data_config(): {type(model).__name__} object has no usable `pretrained_cfg` attribute; "
            "pass `pretrained_cfg=` explicitly."
        )

    input_size = cfg.get("input_size")
    if input_size is None:
        input_size = DEFAULT_INPUT_SIZE
    if not isinstance(input_size, Sequence) or len(input_size) != 3:
        raise ValueError(f"pretrained_cfg['input_size'] must be (C, H, W), got {input_size!r}.")
    input_size = tuple(int(v) for v in input_size)
    img_size = getattr(model, "img_size", None) if model is not None else None
    if img_size is not None:
        input_size = (input_size[0], *_as_hw(img_size, f"{type(model).__name__}.img_size"))

    return {
        "input_size": input_size,
        "interpolation": cfg.get("interpolation") or DEFAULT_INTERPOLATION,
        "mean": tuple(cfg.get("mean") or IMAGENET_DEFAULT_MEAN),
        "std": tuple(cfg.get("std") or IMAGENET_DEFAULT_STD),
        "crop_pct": cfg.get("crop_pct") or DEFAULT_CROP_PCT,
        "crop_mode": cfg.get("crop_mode") or DEFAULT_CROP_MODE,
    }


# ----------------------------------------------------------------------------------------------------------
# Eval transform
# ----------------------------------------------------------------------------------------------------------


def _center_crop_or_pad(img: Image.Image, size: tuple[int, int], fill: tuple[int, ...]) -> Image.Image:
    """torchvision ``center_crop`` / timm ``center_crop_or_pad`` on a PIL image (``size`` is (H, W))."""
    crop_h, crop_w = size
    img_w, img_h = img.size
    if crop_w > img_w or crop_h > img_h:
        padding_ltrb = (
            (crop_w - img_w) // 2 if crop_w > img_w else 0,
            (crop_h - img_h) // 2 if crop_h > img_h else 0,
            (crop_w - img_w + 1) // 2 if crop_w > img_w else 0,
            (crop_h - img_h + 1) // 2 if crop_h > img_h else 0,
        )
        img = ImageOps.expand(img, border=padding_ltrb, fill=fill)
        img_w, img_h = img.size
        if crop_w == img_w and crop_h == img_h:
            return img
    # Python round() (half to even), exactly as torchvision / timm.
    top = int(round((img_h - crop_h) / 2.0))
    left = int(round((img_w - crop_w) / 2.0))
    return img.crop((left, top, left + crop_w, top + crop_h))


def _keep_ratio_size(img_hw: tuple[int, int], target_hw: tuple[int, int], longest: float) -> tuple[int, int]:
    """Output (H, W) of timm ``ResizeKeepRatio`` (no random scale / aspect)."""
    img_h, img_w = img_hw
    ratio_h = img_h / target_hw[0]
    ratio_w = img_w / target_hw[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    out_h, out_w = (round(x * 1.0 / ratio) for x in img_hw)
    return out_h, out_w


def _shortest_edge_size(img_hw: tuple[int, int], size: int) -> tuple[int, int]:
    """Output (H, W) of torchvision ``Resize(size: int)``: long edge truncated with ``int()``."""
    h, w = img_hw
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


class EvalTransform:
    """PIL image -> normalized float32 ``[H, W, 3]`` array, equal to timm's eval transform (in HWC).

    Create it with :func:`create_transform`. Calling it on a PIL image runs, in order: optional border
    trim, the ``crop_mode`` specific resize, center crop (zero padding, or mean-colour padding for
    ``'border'``, when the image is smaller than the crop), scaling to [0, 1] and mean/std normalization.

    Images in a mode other than ``'RGB'`` (``'L'``, ``'RGBA'``, ``'P'``, ``'CMYK'``, ...) are first
    converted with ``img.convert('RGB')`` (alpha is dropped, not composited; 16-bit / float modes follow
    PIL's conversion, which clips to 0..255). timm does not do this (it would produce 1 or 4 channels);
    it is a deliberate convenience so the output always has 3 channels. For RGB input the result matches
    timm to float32 rounding (bit-exact in practice).

    Attributes:
        img_size: Output (H, W).
        scale_size: The (H, W) target timm derives as ``floor(img_size / crop_pct)``.
        interpolation: PIL resampling filter name.
        mean: Per-channel normalization mean (RGB, in [0, 1] units).
        std: Per-channel normalization std.
        crop_pct: Crop fraction (output size / resize size).
        crop_mode: One of 'center', 'squash', 'border'.
        crop_border_pixels: Pixels trimmed from every edge before resizing (None or 0: no trim).
    """

    def __init__(
        self,
        img_size: tuple[int, int],
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
        crop_pct: float,
        crop_mode: str,
        crop_border_pixels: int | None = None,
    ) -> None:
        self.img_size = img_size
        self.interpolation = interpolation
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.crop_pct = crop_pct
        self.crop_mode = crop_mode
        self.crop_border_pixels = crop_border_pixels
        self.scale_size = (math.floor(img_size[0] / crop_pct), math.floor(img_size[1] / crop_pct))
        self._resample = _INTERPOLATIONS[interpolation]
        if crop_mode == "border":
            # timm: fill = [round(255 * v) for v in mean]; torchvision casts it to int for PIL.
            self._fill: tuple[int, ...] = tuple(round(255 * v) for v in self.mean)
        else:
            self._fill = (0, 0, 0)
        # float32, as torch.tensor(mean) / torch.tensor(std) in timm.
        self._mean32 = np.asarray(self.mean, dtype=np.float32)
        self._std32 = np.asarray(self.std, dtype=np.float32)

    def resize_size(self, width: int, height: int) -> tuple[int, int]:
        """Return the (W, H) the image is resized to before cropping (PIL size order).

        Args:
            width: Input width (after any border trim).
            height: Input height (after any border trim).

        Returns:
            ``(new_width, new_height)`` as used by ``PIL.Image.resize``.
        """
        hw = (height, width)
        if self.crop_mode == "squash":
            new_h, new_w = self.scale_size
        elif self.crop_mode == "border":
            new_h, new_w = _keep_ratio_size(hw, self.scale_size, longest=1.0)
        elif self.scale_size[0] == self.scale_size[1]:
            new_h, new_w = _shortest_edge_size(hw, self.scale_size[0])
        else:
            new_h, new_w = _keep_ratio_size(hw, self.scale_size, longest=0.0)
        return new_w, new_h

    def __call__(self, img: Image.Image) -> np.ndarray:
        """Preprocess one image.

        Args:
            img: A ``PIL.Image.Image`` (any mode PIL can convert to RGB).

        Returns:
            float32 array of shape ``[H, W, 3]`` (channels last), normalized with ``mean`` / ``std``.

        Raises:
            TypeError: If ``img`` is not a PIL image.
        """
        if not isinstance(img, Image.Image):
            kind = type(img).__module__ + "." + type(img).__qualname__
            extra = f" with shape {img.shape} and dtype {img.dtype}" if isinstance(img, np.ndarray) else ""
            raise TypeError(
                f"{type(self).__name__} expects a PIL.Image.Image, got {kind}{extra}. "
                "Load files with PIL.Image.open(path) and convert uint8 HWC arrays with "
                "PIL.Image.fromarray(array)."
            )
        if img.mode != "RGB":
            img = img.convert("RGB")

        if self.crop_border_pixels:
            # timm TrimBorder, including its `min(left, h)` quirk.
            b = self.crop_border_pixels
            w, h = img.size
            top, left = min(b, h), min(b, h)
            img = img.crop((left, top, left + max(0, w - 2 * b), top + max(0, h - 2 * b)))

        new_size = self.resize_size(*img.size)
        if min(new_size) < 1:
            raise ValueError(
                f"Image of size {img.size[0]}x{img.size[1]} (W x H) is too elongated for crop_mode="
                f"{self.crop_mode!r}: it would be resized to {new_size[0]}x{new_size[1]} (timm fails too)."
            )
        if new_size != img.size:
            img = img.resize(new_size, self._resample)
        img = _center_crop_or_pad(img, self.img_size, self._fill)

        x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
        return (x - self._mean32) / self._std32

    def __repr__(self) -> str:
        h, w = self.img_size
        if self.crop_mode == "squash":
            resize = f"squash to {self.scale_size[0]}x{self.scale_size[1]}"
        elif self.crop_mode == "border":
            resize = f"longest edge to fit {self.scale_size[0]}x{self.scale_size[1]}"
        elif self.scale_size[0] == self.scale_size[1]:
            resize = f"shortest edge to {self.scale_size[0]}"
        else:
            resize = f"shortest edge to fit {self.scale_size[0]}x{self.scale_size[1]}"
        trim = f", crop_border_pixels={self.crop_border_pixels}" if self.crop_border_pixels else ""
        return (
            f"{type(self).__name__}(input_size=(3, {h}, {w}), interpolation={self.interpolation!r}, "
            f"crop_pct={self.crop_pct}, crop_mode={self.crop_mode!r}{trim}, mean={self.mean}, "
            f"std={self.std}; resize {resize}, center crop {h}x{w} -> float32 [{h}, {w}, 3] HWC)"
        )


def create_transform(
    input_size: int | Sequence[int] = 224,
    interpolation: str = DEFAULT_INTERPOLATION,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_pct: float | None = DEFAULT_CROP_PCT,
    crop_mode: str | None = DEFAULT_CROP_MODE,
    *,
    crop_border_pixels: int | None = None,
    **_unused: Any,
) -> EvalTransform:
    """Build timm's eval preprocessing (``timm.data.create_transform(**cfg)``) with PIL + numpy.

    The returned :class:`EvalTransform` maps a PIL image to a float32 ``[H, W, 3]`` array equal to timm's
    ``[3, H, W]`` tensor transposed to channels-last. Resize geometry follows timm/torchvision exactly:

    * ``'center'``: shorter edge to ``floor(size / crop_pct)`` (long edge truncated with ``int()``); for
      a non-square ``input_size``, timm ``ResizeKeepRatio`` (both edges ``round()``-ed) so the image
      covers ``floor((H, W) / crop_pct)``; then a center crop (``int(round())`` offsets, zero padding if
      the image is smaller than the crop).
    * ``'squash'``: resize to ``floor((H, W) / crop_pct)`` ignoring aspect ratio, then center crop.
    * ``'border'``: longest edge to fit ``floor((H, W) / crop_pct)``, then center crop or pad with the
      mean colour ``round(255 * mean)``.

    Non-RGB images are converted to RGB first (see :class:`EvalTransform`).

    Args:
        input_size: int, ``(H, W)`` or ``(C, H, W)`` (C must be 3).
        interpolation: 'bicubic', 'bilinear', 'nearest', 'lanczos', 'box' or 'hamming'. Note timm's own
            ``create_transform`` default is 'bilinear'; data configs normally specify it.
        mean: Normalization mean per RGB channel.
        std: Normalization std per RGB channel.
        crop_pct: Crop fraction; None or 0 mean 0.875 as in timm.
        crop_mode: 'center', 'squash' or 'border'; None means 'center' as in timm.
        crop_border_pixels: Trim this many pixels from each edge first (timm ``TrimBorder``).
        **_unused: Other config keys (e.g. the rest of a ``pretrained_cfg``) are ignored, except timm
            options that would select another pipeline (``is_training``, ``use_prefetcher``, ``naflex``,
            ``patchify``, ``separate``, ``tf_preprocessing``, ``normalize=False``), which raise.

    Returns:
        An :class:`EvalTransform`.

    Raises:
        ValueError: On an unknown interpolation or crop mode, a bad size, or an unsupported option.
    """
    bad = [k for k in _UNSUPPORTED_OPTIONS if _unused.get(k)]
    if _unused.get("normalize", True) is False:
        bad.append("normalize=False")
    if bad:
        raise ValueError(f"create_transform() only builds timm's eval transform; unsupported: {bad}.")
    is_seq = isinstance(input_size, Sequence) and not isinstance(input_size, str)
    if is_seq and len(input_size) == 3 and input_size[0] != 3:
        raise ValueError(f"Only 3-channel (RGB) input is supported, got input_size={tuple(input_size)}.")
    img_size = _as_hw(input_size, "input_size")
    if interpolation not in _INTERPOLATIONS:
        known = sorted(_INTERPOLATIONS)
        raise ValueError(f"Unknown interpolation {interpolation!r}; expected one of {known}.")
    crop_pct = crop_pct or DEFAULT_CROP_PCT
    if not crop_pct > 0:
        raise ValueError(f"crop_pct must be > 0, got {crop_pct!r}.")
    crop_mode = crop_mode or DEFAULT_CROP_MODE
    if crop_mode not in _CROP_MODES:
        raise ValueError(f"Unknown crop_mode {crop_mode!r}; expected one of {list(_CROP_MODES)}.")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got mean={mean!r}, std={std!r}.")
    if any(s == 0 for s in std):
        raise ValueError(f"std must be non-zero, got {std!r}.")
    return EvalTransform(
        img_size,
        interpolation=interpolation,
        mean=mean,
        std=std,
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        crop_border_pixels=crop_border_pixels,
    )


# ----------------------------------------------------------------------------------------------------------
# ImageNet labels
# ----------------------------------------------------------------------------------------------------------

# num_classes -> (timm subset name, resource file of "wnid<TAB>description" lines in class-index order).
_LABEL_FILES: dict[int, tuple[str, str]] = {
    1000: ("imagenet-1k", "imagenet1k_lemmas.tsv.gz"),
    21841: ("imagenet-22k", "imagenet22k_lemmas.tsv.gz"),
}


@functools.cache
def _load_labels(num_classes: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Load ``(synsets, descriptions)`` for a supported class count from the packaged resources."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}.")
    if num_classes not in _LABEL_FILES:
        supported = ", ".join(f"{n} ({name})" for n, (name, _) in _LABEL_FILES.items())
        raise ValueError(f"No ImageNet labels for num_classes={num_classes}; supported: {supported}.")
    _, fname = _LABEL_FILES[num_classes]
    raw = resources.files(__package__).joinpath("_labels", fname).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    pairs = [line.split("\t", 1) for line in lines if line]
    if len(pairs) != num_classes or any(len(p) != 2 for p in pairs):
        raise RuntimeError(f"Corrupt label resource {fname}: expected {num_classes} 'wnid<TAB>name' lines.")
    return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)


def imagenet_synsets(num_classes: int = 1000) -> list[str]:
    """WordNet ids (e.g. ``'n01440764'``) of an ImageNet classifier head, in class-index order.

    Equals ``timm.data.ImageNetInfo(subset).label_names()`` with the subset timm infers from the class
    count (``infer_imagenet_subset``): 1000 -> 'imagenet-1k', 21841 -> 'imagenet-22k' (the ``fall11``
    ordering, sorted by wnid, used by the Swin ``*.ms_in22k`` heads).

    Args:
        num_classes: 1000 or 21841.

    Returns:
        A new list of ``num_classes`` wnid strings.

    Raises:
        ValueError: If ``num_classes`` is not supported.
    """
    return list(_load_labels(num_classes)[0])


def imagenet_class_names(num_classes: int = 1000, *, short: bool = False) -> list[str]:
    """Human-readable ImageNet class names, in class-index order.

    By default equals ``timm.data.ImageNetInfo(subset).label_descriptions()`` (``detailed=False``), i.e.
    the comma separated WordNet lemmas, e.g. ``'tench, Tinca tinca'``. With ``short=True`` only the first
    lemma is kept (``'tench'``), handy for compact top-5 printouts.

    Args:
        num_classes: 1000 (ImageNet-1k) or 21841 (ImageNet-22k, see :func:`imagenet_synsets`).
        short: Keep only the first lemma of each description.

    Returns:
        A new list of ``num_classes`` strings.

    Raises:
        ValueError: If ``num_classes`` is not supported.
    """
    names = _load_labels(num_classes)[1]
    if short:
        return [n.split(", ", 1)[0] for n in names]
    return list(names)
