"""The Swin family's architectures and pretrained tags, as timm registers them: V1 (``swin_*``), V2 (``swinv2_*``)
and V2-CR (``swinv2_cr_*``).

Each architecture names its family (the model class) and its constructor arguments; each tag carries its data
config next to its weights' Hub id, like timm's ``default_cfgs``. The default tag of an architecture is its first tag
in timm's order (``pretrained=True`` without a tag). Like timm, most V2-CR architectures have only an
``untrained`` tag: a data config without weights (``hf_hub_id`` None), not listed by ``list_models(pretrained=True)``.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any

__all__ = [
    "ARCHITECTURES",
    "ARCH_FAMILY",
    "PRETRAINED_CFGS",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "list_models",
    "split_model_name",
    "get_arch_config",
    "get_arch_family",
    "get_pretrained_cfg",
    "default_tag",
]

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# name -> model kwargs (timm's @register_model entrypoints), per family
_SWIN: dict[str, dict[str, Any]] = {
    "swin_tiny_patch4_window7_224": dict(
        patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)
    ),
    "swin_small_patch4_window7_224": dict(
        patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)
    ),
    "swin_base_patch4_window7_224": dict(
        patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)
    ),
    "swin_base_patch4_window12_384": dict(
        img_size=384, patch_size=4, window_size=12, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)
    ),
    "swin_large_patch4_window7_224": dict(
        patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)
    ),
    "swin_large_patch4_window12_384": dict(
        img_size=384, patch_size=4, window_size=12, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)
    ),
    "swin_s3_tiny_224": dict(
        patch_size=4, window_size=(7, 7, 14, 7), embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)
    ),
    "swin_s3_small_224": dict(
        patch_size=4, window_size=(14, 14, 14, 7), embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)
    ),
    "swin_s3_base_224": dict(
        patch_size=4, window_size=(7, 7, 14, 7), embed_dim=96, depths=(2, 2, 30, 2), num_heads=(3, 6, 12, 24)
    ),
}

_V2_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_V2_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_V2_PRETRAINED_12 = dict(pretrained_window_sizes=(12, 12, 12, 6))
_SWINV2: dict[str, dict[str, Any]] = {
    "swinv2_tiny_window16_256": dict(
        img_size=256, window_size=16, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)
    ),
    "swinv2_tiny_window8_256": dict(
        img_size=256, window_size=8, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)
    ),
    "swinv2_small_window16_256": dict(
        img_size=256, window_size=16, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)
    ),
    "swinv2_small_window8_256": dict(
        img_size=256, window_size=8, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)
    ),
    "swinv2_base_window16_256": dict(img_size=256, window_size=16, **_V2_B),
    "swinv2_base_window8_256": dict(img_size=256, window_size=8, **_V2_B),
    "swinv2_base_window12_192": dict(img_size=192, window_size=12, **_V2_B),
    "swinv2_base_window12to16_192to256": dict(img_size=256, window_size=16, **_V2_B, **_V2_PRETRAINED_12),
    "swinv2_base_window12to24_192to384": dict(img_size=384, window_size=24, **_V2_B, **_V2_PRETRAINED_12),
    "swinv2_large_window12_192": dict(img_size=192, window_size=12, **_V2_L),
    "swinv2_large_window12to16_192to256": dict(img_size=256, window_size=16, **_V2_L, **_V2_PRETRAINED_12),
    "swinv2_large_window12to24_192to384": dict(img_size=384, window_size=24, **_V2_L, **_V2_PRETRAINED_12),
}

_CR_T = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_CR_S = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_CR_B = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
_CR_L = dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))
_CR_G = dict(embed_dim=512, depths=(2, 2, 42, 2), num_heads=(16, 32, 64, 128), extra_norm_period=6)
_NS = dict(extra_norm_stage=True)
# timm passes the tag's input size as img_size; the windows follow from window_ratio=8 (7 at 224, 12 at 384, 8 at 256)
_SWINV2_CR: dict[str, dict[str, Any]] = {
    "swinv2_cr_tiny_384": dict(img_size=384, **_CR_T),
    "swinv2_cr_tiny_224": dict(img_size=224, **_CR_T),
    "swinv2_cr_tiny_ns_224": dict(img_size=224, **_CR_T, **_NS),
    "swinv2_cr_small_384": dict(img_size=384, **_CR_S),
    "swinv2_cr_small_224": dict(img_size=224, **_CR_S),
    "swinv2_cr_small_ns_224": dict(img_size=224, **_CR_S, **_NS),
    "swinv2_cr_small_ns_256": dict(img_size=256, **_CR_S, **_NS),
    "swinv2_cr_base_384": dict(img_size=384, **_CR_B),
    "swinv2_cr_base_224": dict(img_size=224, **_CR_B),
    "swinv2_cr_base_ns_224": dict(img_size=224, **_CR_B, **_NS),
    "swinv2_cr_large_384": dict(img_size=384, **_CR_L),
    "swinv2_cr_large_224": dict(img_size=224, **_CR_L),
    # timm is not sure of Huge's heads, and tries different ones at 384 and 224
    "swinv2_cr_huge_384": dict(
        img_size=384, embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_period=6
    ),
    "swinv2_cr_huge_224": dict(
        img_size=224, embed_dim=352, depths=(2, 2, 18, 2), num_heads=(8, 16, 32, 64), extra_norm_period=6
    ),
    "swinv2_cr_giant_384": dict(img_size=384, **_CR_G),
    "swinv2_cr_giant_224": dict(img_size=224, **_CR_G),
}

ARCHITECTURES: dict[str, dict[str, Any]] = {**_SWIN, **_SWINV2, **_SWINV2_CR}
# architecture -> model class name in swin_jax.models
ARCH_FAMILY: dict[str, str] = {
    **{name: "SwinTransformer" for name in _SWIN},
    **{name: "SwinTransformerV2" for name in _SWINV2},
    **{name: "SwinTransformerV2Cr" for name in _SWINV2_CR},
}

_RELEASES = "https://github.com/SwinTransformer/storage/releases/download"


def _cfg(arch: str, tag: str, url: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """timm's ``_cfg`` for Swin (V1) plus the Hub id, keyed ``arch.tag``."""
    cfg = {
        "architecture": arch,
        "tag": tag,
        "hf_hub_id": f"timm/{arch}.{tag}",
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "crop_mode": "center",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        "license": "mit",
    }
    cfg.update(kwargs)
    return f"{arch}.{tag}", cfg


_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_22K = dict(num_classes=21841)

# In timm's order: an architecture's first tag here is its default tag.
# fmt: off
_SWIN_CFGS: dict[str, dict[str, Any]] = dict(
    [
        _cfg("swin_small_patch4_window7_224", "ms_in22k_ft_in1k",
             f"{_RELEASES}/v1.0.8/swin_small_patch4_window7_224_22kto1k_finetune.pth"),
        _cfg("swin_base_patch4_window7_224", "ms_in22k_ft_in1k",
             f"{_RELEASES}/v1.0.0/swin_base_patch4_window7_224_22kto1k.pth"),
        _cfg("swin_base_patch4_window12_384", "ms_in22k_ft_in1k",
             f"{_RELEASES}/v1.0.0/swin_base_patch4_window12_384_22kto1k.pth", **_384),
        _cfg("swin_large_patch4_window7_224", "ms_in22k_ft_in1k",
             f"{_RELEASES}/v1.0.0/swin_large_patch4_window7_224_22kto1k.pth"),
        _cfg("swin_large_patch4_window12_384", "ms_in22k_ft_in1k",
             f"{_RELEASES}/v1.0.0/swin_large_patch4_window12_384_22kto1k.pth", **_384),
        _cfg("swin_tiny_patch4_window7_224", "ms_in1k", f"{_RELEASES}/v1.0.0/swin_tiny_patch4_window7_224.pth"),
        _cfg("swin_small_patch4_window7_224", "ms_in1k", f"{_RELEASES}/v1.0.0/swin_small_patch4_window7_224.pth"),
        _cfg("swin_base_patch4_window7_224", "ms_in1k", f"{_RELEASES}/v1.0.0/swin_base_patch4_window7_224.pth"),
        _cfg("swin_base_patch4_window12_384", "ms_in1k",
             f"{_RELEASES}/v1.0.0/swin_base_patch4_window12_384.pth", **_384),
        _cfg("swin_tiny_patch4_window7_224", "ms_in22k_ft_in1k",
             f"{_RELEASES}/v1.0.8/swin_tiny_patch4_window7_224_22kto1k_finetune.pth"),
        _cfg("swin_tiny_patch4_window7_224", "ms_in22k",
             f"{_RELEASES}/v1.0.8/swin_tiny_patch4_window7_224_22k.pth", **_22K),
        _cfg("swin_small_patch4_window7_224", "ms_in22k",
             f"{_RELEASES}/v1.0.8/swin_small_patch4_window7_224_22k.pth", **_22K),
        _cfg("swin_base_patch4_window7_224", "ms_in22k",
             f"{_RELEASES}/v1.0.0/swin_base_patch4_window7_224_22k.pth", **_22K),
        _cfg("swin_base_patch4_window12_384", "ms_in22k",
             f"{_RELEASES}/v1.0.0/swin_base_patch4_window12_384_22k.pth", **_384, **_22K),
        _cfg("swin_large_patch4_window7_224", "ms_in22k",
             f"{_RELEASES}/v1.0.0/swin_large_patch4_window7_224_22k.pth", **_22K),
        _cfg("swin_large_patch4_window12_384", "ms_in22k",
             f"{_RELEASES}/v1.0.0/swin_large_patch4_window12_384_22k.pth", **_384, **_22K),
        _cfg("swin_s3_tiny_224", "ms_in1k",
             "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/s3_t-1d53f6a8.pth"),
        _cfg("swin_s3_small_224", "ms_in1k",
             "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/s3_s-3bb4c69d.pth"),
        _cfg("swin_s3_base_224", "ms_in1k",
             "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights/s3_b-a1e95db4.pth"),
    ]
)
# fmt: on


def _cfg_v2(arch: str, tag: str, file: str, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """timm's ``_cfg`` of swin_transformer_v2.py (256 px, 8x8 pool) plus the Hub id."""
    return _cfg(arch, tag, f"{_RELEASES}/v2.0.0/{file}", **{"input_size": (3, 256, 256), "pool_size": (8, 8), **kwargs})


_V2_384 = dict(input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0)
_V2_192_22K = dict(num_classes=21841, input_size=(3, 192, 192), pool_size=(6, 6))

# fmt: off
_SWINV2_CFGS: dict[str, dict[str, Any]] = dict(
    [
        _cfg_v2("swinv2_base_window12to16_192to256", "ms_in22k_ft_in1k",
                "swinv2_base_patch4_window12to16_192to256_22kto1k_ft.pth"),
        _cfg_v2("swinv2_base_window12to24_192to384", "ms_in22k_ft_in1k",
                "swinv2_base_patch4_window12to24_192to384_22kto1k_ft.pth", **_V2_384),
        _cfg_v2("swinv2_large_window12to16_192to256", "ms_in22k_ft_in1k",
                "swinv2_large_patch4_window12to16_192to256_22kto1k_ft.pth"),
        _cfg_v2("swinv2_large_window12to24_192to384", "ms_in22k_ft_in1k",
                "swinv2_large_patch4_window12to24_192to384_22kto1k_ft.pth", **_V2_384),
        _cfg_v2("swinv2_tiny_window8_256", "ms_in1k", "swinv2_tiny_patch4_window8_256.pth"),
        _cfg_v2("swinv2_tiny_window16_256", "ms_in1k", "swinv2_tiny_patch4_window16_256.pth"),
        _cfg_v2("swinv2_small_window8_256", "ms_in1k", "swinv2_small_patch4_window8_256.pth"),
        _cfg_v2("swinv2_small_window16_256", "ms_in1k", "swinv2_small_patch4_window16_256.pth"),
        _cfg_v2("swinv2_base_window8_256", "ms_in1k", "swinv2_base_patch4_window8_256.pth"),
        _cfg_v2("swinv2_base_window16_256", "ms_in1k", "swinv2_base_patch4_window16_256.pth"),
        _cfg_v2("swinv2_base_window12_192", "ms_in22k", "swinv2_base_patch4_window12_192_22k.pth", **_V2_192_22K),
        _cfg_v2("swinv2_large_window12_192", "ms_in22k", "swinv2_large_patch4_window12_192_22k.pth", **_V2_192_22K),
    ]
)
# fmt: on

_CR_RELEASES = "https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-weights-swinv2"
_CR_384 = dict(input_size=(3, 384, 384), crop_pct=1.0, pool_size=(12, 12))


def _cfg_cr(arch: str, tag: str = "untrained", file: str = "", **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """timm's ``_cfg`` of swin_transformer_v2_cr.py (apache-2.0); an ``untrained`` tag has no url and no Hub id."""
    url = f"{_CR_RELEASES}/{file}" if file else ""
    name, cfg = _cfg(arch, tag, url, license="apache-2.0", **kwargs)
    if not file:
        cfg["hf_hub_id"] = None
    return name, cfg


# fmt: off
_SWINV2_CR_CFGS: dict[str, dict[str, Any]] = dict(
    [
        _cfg_cr("swinv2_cr_tiny_384", **_CR_384),
        _cfg_cr("swinv2_cr_tiny_224"),
        _cfg_cr("swinv2_cr_tiny_ns_224", "sw_in1k", "swin_v2_cr_tiny_ns_224-ba8166c6.pth"),
        _cfg_cr("swinv2_cr_small_384", **_CR_384),
        _cfg_cr("swinv2_cr_small_224", "sw_in1k", "swin_v2_cr_small_224-0813c165.pth"),
        _cfg_cr("swinv2_cr_small_ns_224", "sw_in1k", "swin_v2_cr_small_ns_224_iv-2ce90f8e.pth"),
        _cfg_cr("swinv2_cr_small_ns_256", input_size=(3, 256, 256), crop_pct=1.0, pool_size=(8, 8)),
        _cfg_cr("swinv2_cr_base_384", **_CR_384),
        _cfg_cr("swinv2_cr_base_224"),
        _cfg_cr("swinv2_cr_base_ns_224"),
        _cfg_cr("swinv2_cr_large_384", **_CR_384),
        _cfg_cr("swinv2_cr_large_224"),
        _cfg_cr("swinv2_cr_huge_384", **_CR_384),
        _cfg_cr("swinv2_cr_huge_224"),
        _cfg_cr("swinv2_cr_giant_384", **_CR_384),
        _cfg_cr("swinv2_cr_giant_224"),
    ]
)
# fmt: on

PRETRAINED_CFGS: dict[str, dict[str, Any]] = {**_SWIN_CFGS, **_SWINV2_CFGS, **_SWINV2_CR_CFGS}

# timm's deprecated names, still accepted (with the tag they now mean)
DEPRECATED_NAMES = {
    "swin_base_patch4_window7_224_in22k": "swin_base_patch4_window7_224.ms_in22k",
    "swin_base_patch4_window12_384_in22k": "swin_base_patch4_window12_384.ms_in22k",
    "swin_large_patch4_window7_224_in22k": "swin_large_patch4_window7_224.ms_in22k",
    "swin_large_patch4_window12_384_in22k": "swin_large_patch4_window12_384.ms_in22k",
    "swinv2_base_window12_192_22k": "swinv2_base_window12_192.ms_in22k",
    "swinv2_base_window12to16_192to256_22kft1k": "swinv2_base_window12to16_192to256.ms_in22k_ft_in1k",
    "swinv2_base_window12to24_192to384_22kft1k": "swinv2_base_window12to24_192to384.ms_in22k_ft_in1k",
    "swinv2_large_window12_192_22k": "swinv2_large_window12_192.ms_in22k",
    "swinv2_large_window12to16_192to256_22kft1k": "swinv2_large_window12to16_192to256.ms_in22k_ft_in1k",
    "swinv2_large_window12to24_192to384_22kft1k": "swinv2_large_window12to24_192to384.ms_in22k_ft_in1k",
}


def list_models(pattern: str | list[str] = "*", pretrained: bool = False) -> list[str]:
    """Model names matching a wildcard pattern, in timm's (natural) order, like ``timm.list_models``.

    Args:
        pattern: fnmatch pattern (or list of patterns) on the name (``arch.tag`` when ``pretrained``).
        pretrained: list the ``arch.tag`` names that have weights instead of architectures.

    Returns:
        Sorted list of names.
    """
    names = [n for n, cfg in PRETRAINED_CFGS.items() if cfg["hf_hub_id"]] if pretrained else list(ARCHITECTURES)
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    out: set[str] = set()
    for p in patterns:
        # like timm, an arch pattern also matches when listing pretrained names (`swin_base*` -> its tags)
        out.update(n for n in names if fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n.split(".")[0], p))
    return sorted(out, key=_natural_key)


def _natural_key(name: str) -> list:
    """timm's sort order: digit runs compare as numbers (``window7`` before ``window12``)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _unknown(kind: str, name: str, choices: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(f"Unknown {kind} {name!r}.{hint} See swin_jax.list_models(pretrained={kind != 'model'}).")


def split_model_name(name: str) -> tuple[str, str | None]:
    """``'arch.tag'`` -> ``(arch, tag)``; ``'arch'`` -> ``(arch, None)``. Checks both exist.

    Raises:
        ValueError: unknown architecture or tag, naming close matches.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    name = DEPRECATED_NAMES.get(name, name)
    arch, _, tag = name.partition(".")
    if arch not in ARCHITECTURES:
        raise _unknown("model", name, list(ARCHITECTURES) + list(PRETRAINED_CFGS))
    if tag and f"{arch}.{tag}" not in PRETRAINED_CFGS:
        raise _unknown("pretrained tag", name, list(PRETRAINED_CFGS))
    return arch, tag or None


def default_tag(arch: str) -> str:
    """The default pretrained tag of an architecture (its first in timm's order)."""
    for cfg in PRETRAINED_CFGS.values():
        if cfg["architecture"] == arch:
            return cfg["tag"]
    raise _unknown("model", arch, list(ARCHITECTURES))


def get_arch_config(arch: str) -> dict[str, Any]:
    """A copy of the model kwargs of an architecture."""
    arch, _ = split_model_name(arch)
    return dict(ARCHITECTURES[arch])


def get_arch_family(arch: str) -> str:
    """The model class name (in :mod:`swin_jax.models`) of an architecture, e.g. ``'SwinTransformerV2'``."""
    arch, _ = split_model_name(arch)
    return ARCH_FAMILY[arch]


def get_pretrained_cfg(name: str) -> dict[str, Any]:
    """A copy of the pretrained config for ``arch.tag`` (the default tag for a bare ``arch``)."""
    arch, tag = split_model_name(name)
    return dict(PRETRAINED_CFGS[f"{arch}.{tag or default_tag(arch)}"])
