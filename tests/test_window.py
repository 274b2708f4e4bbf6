"""Property tests of the pure window helpers of swin_jax.models._windows against naive loops and timm's own code."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models import swin_transformer as timm_swin

from swin_jax.models._windows import (
    calc_window_shift,
    relative_position_index,
    shift_attn_mask,
    window_partition,
    window_reverse,
)

SETTINGS = settings(max_examples=50, deadline=None)

windows = st.tuples(st.integers(1, 8), st.integers(1, 8))


@st.composite
def window_and_shift(draw, max_window: int = 8):
    """A per-axis window and a per-axis shift strictly inside it (0 allowed on each axis)."""
    wh, ww = draw(st.integers(1, max_window)), draw(st.integers(1, max_window))
    return (wh, ww), (draw(st.integers(0, wh - 1)), draw(st.integers(0, ww - 1)))


def _timm_block(input_resolution, window_size, shift_size, always_partition: bool):
    """A minimal timm SwinTransformerBlock: its window, shift and attn_mask come from timm's own code."""
    return timm_swin.SwinTransformerBlock(
        dim=2,
        input_resolution=input_resolution,
        num_heads=1,
        window_size=window_size,
        shift_size=shift_size,
        always_partition=always_partition,
        mlp_ratio=1.0,
    )


def _naive_partition(x: np.ndarray, window: tuple[int, int]) -> np.ndarray:
    b, h, w, _ = x.shape
    wh, ww = window
    out = [
        x[i, r * wh : (r + 1) * wh, c * ww : (c + 1) * ww]
        for i in range(b)
        for r in range(h // wh)
        for c in range(w // ww)
    ]
    return np.stack(out)


# ----------------------------------------------------------------------------------------------------------
# window_partition / window_reverse
# ----------------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    b=st.integers(1, 3),
    k=st.integers(1, 4),
    m=st.integers(1, 4),
    c=st.integers(1, 3),
    window=windows,
    seed=st.integers(0, 2**16),
)
def test_partition_reverse_roundtrip_and_naive(b, k, m, c, window, seed):
    wh, ww = window
    h, w = k * wh, m * ww
    x = np.random.default_rng(seed).standard_normal((b, h, w, c)).astype(np.float32)
    parts = window_partition(x, window)
    assert parts.shape == (b * k * m, wh, ww, c)
    np.testing.assert_array_equal(parts, _naive_partition(x, window))
    np.testing.assert_array_equal(window_reverse(parts, window, h, w), x)
    # timm's partition of the same tensor
    np.testing.assert_array_equal(parts, timm_swin.window_partition(torch.from_numpy(x), window).numpy())
    # and the reverse of any windows is a partition's inverse too
    np.testing.assert_array_equal(window_partition(window_reverse(parts, window, h, w), window), parts)


def test_partition_reverse_on_jax_arrays():
    x = jnp.arange(2 * 6 * 10 * 3, dtype=jnp.float32).reshape(2, 6, 10, 3)
    parts = window_partition(x, (3, 5))
    np.testing.assert_array_equal(np.asarray(parts), _naive_partition(np.asarray(x), (3, 5)))
    np.testing.assert_array_equal(np.asarray(window_reverse(parts, (3, 5), 6, 10)), np.asarray(x))


# ----------------------------------------------------------------------------------------------------------
# shift_attn_mask
# ----------------------------------------------------------------------------------------------------------


@SETTINGS
@given(ws=window_and_shift(), k=st.integers(1, 4), m=st.integers(1, 4))
def test_shift_attn_mask_matches_timm(ws, k, m):
    window, shift = ws
    h, w = k * window[0], m * window[1]
    # always_partition: timm uses the window and shift as given (no clipping), as shift_attn_mask does
    block = _timm_block((h, w), window, shift, always_partition=True)
    assert tuple(block.window_size) == window and tuple(block.shift_size) == shift
    ours = shift_attn_mask(h, w, window, shift)
    ref = block.attn_mask
    if shift == (0, 0):
        assert ours is None and ref is None
        return
    n = window[0] * window[1]
    assert ours.shape == (k * m, n, n) and ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref.numpy())
    # and timm's dynamic path (mask from the padded input) gives the same
    np.testing.assert_array_equal(ours, block.get_attn_mask(torch.zeros(1, h, w, 1)).numpy())


@SETTINGS
@given(ws=window_and_shift(), k=st.integers(1, 4), m=st.integers(1, 4))
def test_shift_attn_mask_properties(ws, k, m):
    window, shift = ws
    h, w = k * window[0], m * window[1]
    mask = shift_attn_mask(h, w, window, shift)
    if shift == (0, 0):
        assert mask is None
        return
    assert set(np.unique(mask)) <= {0.0, -100.0}
    n = window[0] * window[1]
    idx = np.arange(n)
    assert np.all(mask[:, idx, idx] == 0)  # a token always sees itself
    np.testing.assert_array_equal(mask, mask.transpose(0, 2, 1))
    # windows away from the bottom / right borders are not split by the shift
    if k > 1 and m > 1:
        assert np.all(mask[0] == 0)
    # the bottom-right window mixes regions whenever an axis is shifted
    if any(shift):
        assert np.any(mask[-1] == -100.0)


def test_shift_attn_mask_none_without_shift():
    assert shift_attn_mask(14, 14, (7, 7), (0, 0)) is None
    assert shift_attn_mask(6, 10, (3, 5), (0, 0)) is None


@SETTINGS
@given(window=windows, r=st.integers(0, 3), c=st.integers(0, 3))
def test_shift_attn_mask_one_axis_shift(window, r, c):
    """Shift on one axis only (a clipped window on the other): timm's region slicing with a 0 shift."""
    wh, ww = window
    h, w = (r + 1) * wh, (c + 1) * ww
    for shift in ((wh // 2, 0), (0, ww // 2)):
        if shift == (0, 0):
            continue
        ref = _timm_block((h, w), window, shift, always_partition=True).attn_mask
        np.testing.assert_array_equal(shift_attn_mask(h, w, window, shift), ref.numpy())


# ----------------------------------------------------------------------------------------------------------
# relative_position_index
# ----------------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(wh=st.integers(1, 14), ww=st.integers(1, 14))
def test_relative_position_index_matches_timm(wh, ww):
    ours = relative_position_index(wh, ww)
    ref = timm_swin.get_relative_position_index(wh, ww).numpy()
    assert ours.shape == (wh * ww, wh * ww)
    np.testing.assert_array_equal(ours, ref)
    assert ours.min() == 0 and ours.max() == (2 * wh - 1) * (2 * ww - 1) - 1
    assert not ours.flags.writeable  # cached: must not be mutated by a caller


# ----------------------------------------------------------------------------------------------------------
# calc_window_shift
# ----------------------------------------------------------------------------------------------------------


@SETTINGS
@given(
    res=st.tuples(st.integers(1, 30), st.integers(1, 30)),
    window=st.tuples(st.integers(1, 14), st.integers(1, 14)),
    shifted=st.booleans(),
    always_partition=st.booleans(),
)
def test_calc_window_shift_matches_timm(res, window, shifted, always_partition):
    shift = (window[0] // 2, window[1] // 2) if shifted else (0, 0)
    block = _timm_block(res, window, shift, always_partition)
    ours = calc_window_shift(res, window, shift, always_partition)
    assert ours == (tuple(block.window_size), tuple(block.shift_size))
    if not always_partition:
        win, sh = ours
        for axis in range(2):
            # clip rule: a window never exceeds the map; an axis the window covers is not shifted
            assert win[axis] == min(res[axis], window[axis])
            assert sh[axis] == (0 if res[axis] <= window[axis] else shift[axis])


@pytest.mark.parametrize(
    "res, window, want",
    [
        ((56, 56), (7, 7), ((7, 7), (3, 3))),
        ((7, 7), (7, 7), ((7, 7), (0, 0))),
        ((14, 14), (14, 14), ((14, 14), (0, 0))),  # s3 stage 2 at 224
        ((4, 14), (7, 7), ((4, 7), (0, 3))),  # one axis clipped
        ((2, 7), (7, 7), ((2, 7), (0, 0))),
        ((12, 12), (12, 12), ((12, 12), (0, 0))),  # window12_384 last stage
    ],
)
def test_calc_window_shift_cases(res, window, want):
    assert calc_window_shift(res, window, (window[0] // 2, window[1] // 2)) == want
