"""Pure window helpers shared by every Swin family: window geometry, the relative position index, the shift
mask, and the shift / pad / partition of a feature map into windows (and back).

The geometry is plain numpy, computed once per shape and cached; under ``jax.jit`` it becomes a constant.
Partition and merge work on numpy or jax arrays with static shapes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Pair",
    "MASK_VALUE",
    "to_2tuple",
    "resolve_stage_window_sizes",
    "calc_window_shift",
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shift_attn_mask",
    "feature_take_indices",
    "partition_windows",
    "merge_windows",
    "resolve_window_args",
    "calc_stage_window_sizes",
]

MASK_VALUE = -100.0  # timm / Microsoft's additive mask between tokens of different shifted regions

Pair = tuple[int, int]


def to_2tuple(x: int | Sequence[int]) -> Pair:
    """Return ``(x, x)`` for an int, ``tuple(x)`` for a pair."""
    if isinstance(x, (int, np.integer)):
        return (int(x), int(x))
    x = tuple(int(v) for v in x)
    if len(x) != 2:
        raise ValueError(f"expected an int or a pair (h, w), got {x!r}")
    return x


def resolve_stage_window_sizes(window_size: Any, num_stages: int) -> tuple[Pair, ...]:
    """Expand a window size spec to one ``(h, w)`` per stage, as timm does.

    Args:
        window_size: an int or ``(h, w)`` for all stages, or a sequence with one int or ``(h, w)`` per
            stage. A sequence of two ints is always a single ``(h, w)``.
        num_stages: number of stages.

    Returns:
        One ``(h, w)`` window size per stage.
    """
    if not isinstance(window_size, (list, tuple)):
        window_size = (window_size,) * num_stages
    elif len(window_size) == 2 and not isinstance(window_size[0], (list, tuple)):
        window_size = (window_size,) * num_stages
    if len(window_size) != num_stages:
        raise ValueError(f"expected {num_stages} stage window sizes, got {window_size!r}")
    sizes = tuple(to_2tuple(w) for w in window_size)
    if not all(w > 0 for ws in sizes for w in ws):
        raise ValueError(f"window sizes must be positive, got {sizes!r}")
    return sizes


def calc_window_shift(
    input_resolution: Pair,
    target_window_size: Pair,
    target_shift_size: Pair,
    always_partition: bool = False,
) -> tuple[Pair, Pair]:
    """Per-axis window and shift sizes for a block, as timm's ``SwinTransformerBlock._calc_window_shift``.

    A window is clipped to the feature size on an axis; an axis whose feature size fits in one window
    is not shifted. With ``always_partition`` the targets are used as given.
    """
    if always_partition:
        return tuple(target_window_size), tuple(target_shift_size)
    window = tuple(r if r <= w else w for r, w in zip(input_resolution, target_window_size))
    shift = tuple(0 if r <= w else s for r, w, s in zip(input_resolution, window, target_shift_size))
    return window, shift


def window_partition(x, window_size: Pair):
    """Split ``[B, H, W, C]`` into windows ``[B * nW, wh, ww, C]`` (H, W divisible by the window)."""
    b, h, w, c = x.shape
    wh, ww = window_size
    x = x.reshape(b, h // wh, wh, w // ww, ww, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, c)


def window_reverse(windows, window_size: Pair, h: int, w: int):
    """Inverse of :func:`window_partition`: ``[B * nW, wh, ww, C]`` -> ``[B, H, W, C]``."""
    wh, ww = window_size
    c = windows.shape[-1]
    x = windows.reshape(-1, h // wh, w // ww, wh, ww, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, h, w, c)


@functools.cache
def relative_position_index(win_h: int, win_w: int) -> np.ndarray:
    """Pair-wise relative position index ``[wh*ww, wh*ww]`` into the bias table (timm's layout)."""
    coords = np.stack(np.meshgrid(np.arange(win_h), np.arange(win_w), indexing="ij")).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel[:, :, 0] += win_h - 1
    rel[:, :, 1] += win_w - 1
    rel[:, :, 0] *= 2 * win_w - 1
    index = rel.sum(-1)
    index.setflags(write=False)
    return index


@functools.cache
def shift_attn_mask(height: int, width: int, window_size: Pair, shift_size: Pair) -> np.ndarray | None:
    """Additive attention mask ``[nW, N, N]`` for shifted windows, or None without a shift.

    ``height`` and ``width`` are the padded feature sizes (multiples of the window). Tokens that come
    from different regions of the cyclically shifted map get ``-100`` (timm's value), others 0.
    """
    if not any(shift_size):
        return None
    (wh, ww), (sh, sw) = window_size, shift_size
    img_mask = np.zeros((1, height, width, 1), np.float32)
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -sh if sh else None), slice(-sh if sh else height, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw if sw else None), slice(-sw if sw else width, None)):
            img_mask[:, hs, ws, :] = cnt
            cnt += 1
    mask_windows = window_partition(img_mask, window_size).reshape(-1, wh * ww)
    diff = mask_windows[:, None, :] - mask_windows[:, :, None]
    mask = np.where(diff != 0, np.float32(MASK_VALUE), np.float32(0.0)).astype(np.float32)
    mask.setflags(write=False)
    return mask


def feature_take_indices(num_features: int, indices: int | Sequence[int] | None = None) -> tuple[list[int], int]:
    """Absolute indices to take (timm semantics: None = all, int n = last n, sequence = those, -ve ok)."""
    if indices is None:
        indices = num_features
    if isinstance(indices, (int, np.integer)):
        if not 0 < indices <= num_features:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {num_features})")
        take = [num_features - int(indices) + i for i in range(int(indices))]
    else:
        take = []
        for i in indices:
            idx = num_features + i if i < 0 else i
            if not 0 <= idx < num_features:
                raise ValueError(f"feature index {i} is out of range (0 to {num_features - 1})")
            take.append(int(idx))
        if not take:
            raise ValueError("indices must select at least one feature map")
    return take, max(take)


def partition_windows(
    x: jax.Array, window_size: Pair, shift_size: Pair
) -> tuple[jax.Array, np.ndarray | None, tuple[int, int]]:
    """Cyclic shift, pad to whole windows, partition, as every timm Swin block does before attention.

    Args:
        x: ``[B, H, W, C]``.
        window_size: the block's (clipped) window ``(h, w)``.
        shift_size: the block's shift ``(h, w)``; (0, 0) for a regular block.

    Returns:
        Windows ``[B * nW, wh * ww, C]``, the shift mask ``[nW, N, N]`` built on the padded size (None
        without a shift), and the padded size ``(Hp, Wp)`` for :func:`merge_windows`.
    """
    _, h, w, c = x.shape
    (wh, ww), (sh, sw) = window_size, shift_size
    if sh > 0 or sw > 0:
        x = jnp.roll(x, shift=(-sh, -sw), axis=(1, 2))
    pad_h, pad_w = (wh - h % wh) % wh, (ww - w % ww) % ww
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    windows = window_partition(x, window_size).reshape(-1, wh * ww, c)
    return windows, shift_attn_mask(hp, wp, window_size, shift_size), (hp, wp)


def merge_windows(windows: jax.Array, window_size: Pair, shift_size: Pair, size: Pair, padded: Pair) -> jax.Array:
    """Inverse of :func:`partition_windows`: windows ``[B * nW, N, C]`` -> ``[B, H, W, C]`` (``size`` = (H, W)),
    padding cropped and the cyclic shift undone."""
    (wh, ww), (sh, sw) = window_size, shift_size
    (h, w), (hp, wp) = size, padded
    x = window_reverse(windows.reshape(-1, wh, ww, windows.shape[-1]), window_size, hp, wp)[:, :h, :w, :]
    if sh > 0 or sw > 0:
        x = jnp.roll(x, shift=(sh, sw), axis=(1, 2))
    return x


def resolve_window_args(window_size: Any, window_ratio: Any, num_stages: int) -> tuple[Any, Any]:
    """``set_input_size``'s window arguments, checked and expanded per stage before anything changes (timm's).

    Returns ``(window sizes, None)``, ``(None, window ratios)`` (a window size wins) or ``(None, None)``. Unlike a
    window size, a sequence of two ratios is two stages.
    """
    if window_size is not None:
        return resolve_stage_window_sizes(window_size, num_stages), None
    if window_ratio is not None:
        ratios = (window_ratio,) * num_stages if isinstance(window_ratio, (int, np.integer)) else tuple(window_ratio)
        if len(ratios) != num_stages:
            raise ValueError(f"expected {num_stages} stage window ratios, got {window_ratio!r}")
        if not all(int(r) > 0 for r in ratios):
            raise ValueError(f"window ratios must be positive, got {window_ratio!r}")
        return None, tuple(int(r) for r in ratios)
    return None, None


def calc_stage_window_sizes(
    grid_size: Pair,
    ref_window_sizes: tuple[Pair, ...],
    ref_grid_size: Pair,
    window_sizes: tuple[Pair, ...] | None = None,
    window_ratios: tuple[int, ...] | None = None,
) -> tuple[Pair, ...]:
    """Per-stage windows for a new patch grid, as timm's ``calc_stage_window_sizes``: the given sizes; else the grid
    divided by each stage's ratio (at least 1); else each reference window scaled with the grid."""
    if window_sizes is not None:
        return window_sizes
    if window_ratios is not None:
        return tuple(tuple(max(1, g // r) for g in grid_size) for r in window_ratios)
    return tuple(tuple(max(1, w * g // r) for w, g, r in zip(ws, grid_size, ref_grid_size)) for ws in ref_window_sizes)
