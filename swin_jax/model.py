"""Swin Transformer (V1) in Flax NNX, computing the same function as timm's ``SwinTransformer``.

A port of timm 1.0.x ``timm/models/swin_transformer.py``:

* `Swin Transformer: Hierarchical Vision Transformer using Shifted Windows`, https://arxiv.org/abs/2103.14030
* `Searching the Search Space of Vision Transformer` (S3), https://arxiv.org/abs/2111.14725

The NNX attribute tree mirrors timm's module names (``patch_embed.proj``, ``layers[i].downsample``,
``layers[i].blocks[j].attn.qkv``, ``attn.relative_position_bias_table``, ``mlp.fc1``, ``norm``,
``head.fc``), so the weight mapping in :mod:`swin_jax.weights` is a handful of layout rules.

Layout is NHWC everywhere. The window geometry (relative position index, shift mask) is plain numpy,
computed once per shape and cached; under ``jax.jit`` it becomes a constant.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import attention

__all__ = [
    "PatchEmbed",
    "WindowAttention",
    "Mlp",
    "SwinTransformerBlock",
    "PatchMerging",
    "SwinTransformerStage",
    "ClassifierHead",
    "SwinTransformer",
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shift_attn_mask",
    "calc_window_shift",
    "resolve_stage_window_sizes",
    "feature_take_indices",
]

LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by every timm Swin norm
MASK_VALUE = -100.0  # timm / Microsoft's additive mask between tokens of different shifted regions
POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")

Pair = tuple[int, int]


# ----------------------------------------------------------------------------------------------------------
# Pure window helpers (numpy or jax arrays; shapes are static)
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

# Initializers with the values of flax's (``truncated_normal(stddev=0.02)``, ``variance_scaling(1/3, 'fan_in',
# 'uniform')``), compiled once per power-of-two size instead of once per shape. jax.random draws element i of an
# array from counter i (threefry, partitionable: jax's default), so the first n values of a draw of size N >= n are
# the draw of size n. One compile of the truncated-normal sampler takes ~0.7 s on a CPU, and eager init compiled
# one per parameter shape: creating a Swin took 15-20 s, most of it there.


_MIN_DRAW = 1 << 14  # smaller parameters share one sampler (a 16k draw costs ~0.1 ms)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw(key: jax.Array, distribution: str, size: int, dtype: Any) -> jax.Array:
    if distribution == "truncated_normal":
        return jax.random.truncated_normal(key, -2.0, 2.0, (size,), dtype)
    return jax.random.uniform(key, (size,), dtype, -1.0)


@functools.partial(jax.jit, static_argnums=(1,))
def _first(flat: jax.Array, shape: tuple[int, ...], scale: jax.Array) -> jax.Array:
    return flat[: math.prod(shape)].reshape(shape) * scale


def _sample(key: jax.Array, distribution: str, shape: Sequence[int], dtype: Any, scale: jax.Array) -> jax.Array:
    shape = tuple(int(d) for d in shape)
    size = max(1 << max(math.prod(shape) - 1, 0).bit_length(), _MIN_DRAW)
    return _first(_draw(key, distribution, size, jnp.dtype(dtype)), shape, scale)


def _trunc_normal_02(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """timm's ``trunc_normal_(std=.02)`` as flax draws it: ``truncated_normal(stddev=0.02)``'s values."""
    return _sample(key, "truncated_normal", shape, dtype, jnp.array(0.02, dtype))


def _torch_conv_default(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """torch Conv2d's default init (kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))), as timm leaves the patch
    embedding: ``variance_scaling(1/3, 'fan_in', 'uniform')``'s values (HWIO kernel, fan_in = H * W * I)."""
    variance = jnp.array((1.0 / 3.0) / math.prod(shape[:-1]), dtype)
    return _sample(key, "uniform", shape, dtype, jnp.sqrt(3 * variance))


# The residual stream's gradient, materialized once per block. XLA:CPU fuses a chain of elementwise producers into
# every consumer, duplicating it. In the backward pass the residual stream's gradient is such a chain (each later
# block adds its LayerNorm and branch terms), and it has several consumers per block (the weight-gradient
# transposes, the LayerNorm reductions): each consumer's fusion recomputed the whole chain from the last block
# down, so a block's backward cost grew with the number of blocks after it (a fusion of ~900 instructions per
# element in Swin-B's stage 2). jax.lax.optimization_barrier does not stop this (XLA:CPU removes barriers before
# fusing); a dot does, and a product with the identity matrix at "highest" precision is exact (1 * g + 0 * ...).
# Swin-B fp32 batch 8 training step on a 2-core EPYC: 15.6 s -> 8.1 s, compile 54 s -> 27 s, peak RSS 8.0 -> 5.6 GB
# (BENCHMARKS.md). It contracts the rows axis (7-56 long: cheap, and never the batch axis, which a mesh shards).
# SWIN_JAX_BACKWARD_CUT: "cpu" (default: only when lowering for the CPU), "always", "never" (read when tracing).


def _identity_rows(t: jax.Array) -> jax.Array:
    b, h = t.shape[:2]
    # batched over B (a dot batch dimension stays local where a mesh shards B), output already in t's layout
    eye = jnp.broadcast_to(jnp.eye(h, dtype=t.dtype), (b, h, h))
    rows = t.reshape(b, h, -1)
    out = jnp.einsum("bkh,bhx->bkx", eye, rows, precision=jax.lax.Precision.HIGHEST, preferred_element_type=t.dtype)
    return out.reshape(t.shape)


@jax.custom_jvp
def materialize_grad(x: jax.Array) -> jax.Array:
    """Identity on ``x`` ``[B, H, W, C]``; its tangent (and so, transposed, its cotangent) passes through a dot with
    the identity matrix, which XLA cannot fuse through. See the comment above; forward values are untouched."""
    return x


@materialize_grad.defjvp
def _materialize_grad_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    mode = os.environ.get("SWIN_JAX_BACKWARD_CUT", "cpu")
    if mode not in ("cpu", "always", "never"):
        raise ValueError(f"SWIN_JAX_BACKWARD_CUT must be 'cpu', 'always' or 'never', got {mode!r}")
    if mode == "never" or t.ndim != 4 or t.shape[1] < 2:  # a 1x1 dot would be simplified to a multiply
        return x, t
    if mode == "always":
        return x, _identity_rows(t)
    return x, jax.lax.platform_dependent(t, cpu=_identity_rows, default=lambda t: t)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` as torch autocast runs LayerNorm: statistics, normalization and the scale and shift
    in float32 (parameters not rounded to a low-precision compute dtype first), output in the compute dtype.
    Two-pass variance and eps 1e-5, as ``torch.nn.LayerNorm``. Parameters: ``scale``, ``bias``."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        internal = jnp.float32 if dtype is None else jnp.promote_types(dtype, jnp.float32)
        super().__init__(
            dim, epsilon=LN_EPS, use_fast_variance=False, dtype=internal, param_dtype=param_dtype, rngs=rngs
        )
        self.out_dtype = dtype

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        y = super().__call__(x, mask=mask)
        return y if self.out_dtype is None else y.astype(self.out_dtype)


def _linear(din: int, dout: int, *, use_bias: bool = True, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    # timm's init for Swin Linear layers: trunc_normal(std=.02) weights, zero bias
    return nnx.Linear(
        din, dout, use_bias=use_bias, kernel_init=_trunc_normal_02, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def _dropout(rate: float, rngs: nnx.Rngs, broadcast_dims: Sequence[int] = ()) -> nnx.Dropout:
    """Dropout (or, with ``broadcast_dims`` over all but the batch axis, drop path), eval mode at start.

    An RNG stream is only held where the rate is non-zero, so inference models carry no RNG state.
    """
    return nnx.Dropout(rate, broadcast_dims=tuple(broadcast_dims), deterministic=True, rngs=rngs if rate > 0 else None)


class PatchEmbed(nnx.Module):
    """Image to patch embedding: ``patch x patch`` stride-``patch`` conv, then LayerNorm, NHWC out."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.patch_size = to_2tuple(patch_size)
        self.proj = nnx.Conv(
            in_chans,
            embed_dim,
            kernel_size=self.patch_size,
            strides=self.patch_size,
            padding="VALID",
            kernel_init=_torch_conv_default,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.norm = LayerNorm(embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.proj(x))


class WindowAttention(nnx.Module):
    """Window multi-head self attention with relative position bias (W-MSA and SW-MSA)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int | None = None,
        window_size: Pair = (7, 7),
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_impl: str = "auto",
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        """
        Args:
            dim: number of input channels.
            num_heads: number of attention heads.
            head_dim: channels per head (``dim // num_heads`` if None).
            window_size: ``(h, w)`` of the window.
            qkv_bias: learnable bias on q, k, v.
            attn_drop: dropout rate on the attention weights.
            proj_drop: dropout rate on the output.
            attn_impl: attention implementation, one of :func:`swin_jax.attention_impls` (all compute the
                same function; see :mod:`swin_jax.attention`).
        """
        self.attn_impl = attention.check_attn_impl(attn_impl)
        self.window_size = to_2tuple(window_size)
        self.num_heads = num_heads
        head_dim = head_dim or dim // num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        attn_dim = head_dim * num_heads
        self.dtype = dtype
        win_h, win_w = self.window_size
        self.relative_position_bias_table = nnx.Param(
            _trunc_normal_02(rngs.params(), ((2 * win_h - 1) * (2 * win_w - 1), num_heads), param_dtype)
        )
        self.qkv = _linear(dim, attn_dim * 3, use_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_drop = _dropout(attn_drop, rngs)
        self.proj = _linear(attn_dim, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_drop = _dropout(proj_drop, rngs)

    def relative_position_bias(self) -> jax.Array:
        """The bias ``[num_heads, N, N]`` gathered from the table for this window size."""
        n = self.window_size[0] * self.window_size[1]
        index = relative_position_index(*self.window_size).reshape(-1)
        bias = jnp.take(self.relative_position_bias_table[...], index, axis=0).reshape(n, n, -1)
        return bias.transpose(2, 0, 1)

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b_, n, _ = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return q * jnp.asarray(self.scale, q.dtype), k, v

    def _softmax(self, q: jax.Array, k: jax.Array, mask: np.ndarray | None) -> jax.Array:
        n = q.shape[2]
        attn = jnp.einsum("bhqd,bhkd->bhqk", q, k)
        attn = attn + self.relative_position_bias().astype(attn.dtype)[None]
        if mask is not None:
            num_win = mask.shape[0]
            attn = attn.reshape(-1, num_win, self.num_heads, n, n) + jnp.asarray(mask, attn.dtype)[None, :, None]
            attn = attn.reshape(-1, self.num_heads, n, n)
        return jax.nn.softmax(attn.astype(jnp.float32), axis=-1)

    def attention_weights(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
        """The attention probabilities (what timm's ``attn.softmax`` outputs), for study.

        Args:
            x: window tokens ``[B * nW, N, C]``.
            mask: additive mask ``[nW, N, N]`` for shifted windows, or None.

        Returns:
            ``[B * nW, num_heads, N, N]`` float32; each row sums to 1. Dropout is not applied.
        """
        q, k, _ = self._qkv(x)
        return self._softmax(q, k, mask)

    def __call__(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
        """
        Args:
            x: window tokens ``[B * nW, N, C]``.
            mask: additive mask ``[nW, N, N]`` for shifted windows, or None.

        Returns:
            ``[B * nW, N, C]``.
        """
        b_, n, _ = x.shape
        impl = attention.resolve(self.attn_impl)
        if impl == "einsum" or (self.attn_drop.rate > 0 and not self.attn_drop.deterministic):
            q, k, v = self._qkv(x)
            attn = self.attn_drop(self._softmax(q, k, mask).astype(v.dtype))
            x = jnp.einsum("bhqk,bhkd->bqhd", attn, v).reshape(b_, n, -1)
        else:  # token-major [B * nW, N, heads, d], as the qkv projection lays them out
            qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1)
            q = qkv[:, :, 0] * jnp.asarray(self.scale, qkv.dtype)
            bias = self.relative_position_bias()
            x = attention.window_attention(impl, q, qkv[:, :, 1], qkv[:, :, 2], bias, mask).reshape(b_, n, -1)
        return self.proj_drop(self.proj(x))


class Mlp(nnx.Module):
    """fc1 -> exact (erf) GELU -> dropout -> fc2 -> dropout, as timm's ``Mlp``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.fc1 = _linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.drop1 = _dropout(drop, rngs)
        self.fc2 = _linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.drop2 = _dropout(drop, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.gelu(self.fc1(x), approximate=False)
        return self.drop2(self.fc2(self.drop1(x)))


class SwinTransformerBlock(nnx.Module):
    """Swin block: (shifted) window attention and MLP, each pre-norm with a residual and drop path."""

    def __init__(
        self,
        dim: int,
        input_resolution: Pair,
        num_heads: int = 4,
        head_dim: int | None = None,
        window_size: Pair = (7, 7),
        shift_size: Pair = (0, 0),
        always_partition: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        attn_impl: str = "auto",
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        """
        Args:
            dim: number of channels.
            input_resolution: feature size ``(H, W)`` the block is built for; windows are clipped to it.
            num_heads: attention heads.
            head_dim: channels per head.
            window_size: target window ``(h, w)``.
            shift_size: target shift ``(h, w)`` (0 for a regular block).
            always_partition: never clip the window or drop the shift.
            mlp_ratio: MLP hidden width / dim.
            qkv_bias: learnable q, k, v bias.
            proj_drop: dropout after projections.
            attn_drop: dropout on attention weights.
            drop_path: stochastic depth rate.
            attn_impl: attention implementation (:func:`swin_jax.attention_impls`).
        """
        self.input_resolution = to_2tuple(input_resolution)
        self.window_size, self.shift_size = calc_window_shift(
            self.input_resolution, to_2tuple(window_size), to_2tuple(shift_size), always_partition
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, **kw)
        self.attn = WindowAttention(
            dim, num_heads, head_dim, self.window_size, qkv_bias, attn_drop, proj_drop, attn_impl, **kw
        )
        self.drop_path1 = _dropout(drop_path, rngs, broadcast_dims=(1, 2, 3))
        self.norm2 = LayerNorm(dim, **kw)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop, **kw)
        self.drop_path2 = _dropout(drop_path, rngs, broadcast_dims=(1, 2, 3))

    def _partition(self, x: jax.Array) -> tuple[jax.Array, np.ndarray | None, int, int]:
        """Cyclic shift, pad to whole windows, partition: ``[B, H, W, C]`` -> windows ``[B * nW, N, C]``,
        the shift mask ``[nW, N, N]`` (or None) and the padded size."""
        _, h, w, c = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        if sh > 0 or sw > 0:
            x = jnp.roll(x, shift=(-sh, -sw), axis=(1, 2))
        pad_h, pad_w = (wh - h % wh) % wh, (ww - w % ww) % ww
        if pad_h or pad_w:
            x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        hp, wp = h + pad_h, w + pad_w
        windows = window_partition(x, self.window_size).reshape(-1, wh * ww, c)
        return windows, shift_attn_mask(hp, wp, self.window_size, self.shift_size), hp, wp

    def _attn(self, x: jax.Array) -> jax.Array:
        _, h, w, c = x.shape
        (wh, ww), (sh, sw) = self.window_size, self.shift_size
        windows, mask, hp, wp = self._partition(x)
        windows = self.attn(windows, mask=mask)
        x = window_reverse(windows.reshape(-1, wh, ww, c), self.window_size, hp, wp)[:, :h, :w, :]
        if sh > 0 or sw > 0:
            x = jnp.roll(x, shift=(sh, sw), axis=(1, 2))
        return x

    def attention_weights(self, x: jax.Array) -> jax.Array:
        """The attention probabilities of this block for its input ``x``, for study.

        Windows are taken as the block takes them: after the cyclic shift by ``-shift_size`` and
        bottom/right padding to whole windows, in row-major order over the window grid, tokens
        row-major inside a window. The shift mask (``shift_attn_mask``) is already applied, so masked
        pairs have (near) zero weight.

        Args:
            x: the block's input ``[B, H, W, C]`` (before ``norm1``).

        Returns:
            ``[B, nW_h, nW_w, num_heads, N, N]`` float32 with ``N = window_h * window_w``.
        """
        wh, ww = self.window_size
        windows, mask, hp, wp = self._partition(self.norm1(x))
        attn = self.attn.attention_weights(windows, mask=mask)
        return attn.reshape(x.shape[0], hp // wh, wp // ww, *attn.shape[1:])

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        x = materialize_grad(x)  # the gradient flowing out of this block is computed once (see its comment)
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchMerging(nnx.Module):
    """Downsample by concatenating each 2x2 neighbourhood (timm's order), LayerNorm, linear reduction."""

    def __init__(self, dim: int, out_dim: int | None = None, *, dtype=None, param_dtype=jnp.float32, rngs):
        self.out_dim = out_dim or 2 * dim
        self.norm = LayerNorm(4 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.reduction = _linear(4 * dim, self.out_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), out_dim]`` (odd sizes zero-padded bottom/right)."""
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
            h, w = h + h % 2, w + w % 2
        # timm: reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5): channel blocks (h0w0, h1w0, h0w1, h1w1)
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        return self.reduction(self.norm(x))


class SwinTransformerStage(nnx.Module):
    """One stage: optional PatchMerging at the start, then ``depth`` blocks alternating W-MSA / SW-MSA."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: Pair,
        depth: int,
        downsample: bool = True,
        num_heads: int = 4,
        head_dim: int | None = None,
        window_size: Pair = (7, 7),
        always_partition: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] | float = 0.0,
        attn_impl: str = "auto",
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.input_resolution = to_2tuple(input_resolution)
        self.output_resolution = (
            tuple((i + 1) // 2 for i in self.input_resolution) if downsample else self.input_resolution
        )
        window_size = to_2tuple(window_size)
        shift_size = (window_size[0] // 2, window_size[1] // 2)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if downsample:
            self.downsample = PatchMerging(dim, out_dim, **kw)
        else:
            if dim != out_dim:
                raise ValueError(f"a stage without downsampling keeps its width: dim {dim} != out_dim {out_dim}")
            self.downsample = None
        self.grad_checkpointing = False
        self.blocks = nnx.List(
            [
                SwinTransformerBlock(
                    out_dim,
                    self.output_resolution,
                    num_heads,
                    head_dim,
                    window_size,
                    (0, 0) if i % 2 == 0 else shift_size,
                    always_partition,
                    mlp_ratio,
                    qkv_bias,
                    proj_drop,
                    attn_drop,
                    drop_path[i] if isinstance(drop_path, (list, tuple)) else drop_path,
                    attn_impl,
                    **kw,
                )
                for i in range(depth)
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        for block in self.blocks:
            # gradient checkpointing: keep only the block's input, recompute the rest in the backward pass
            x = nnx.remat(_call_block)(block, x) if self.grad_checkpointing else block(x)
        return x


def _call_block(block: nnx.Module, x: jax.Array) -> jax.Array:
    return block(x)


def _global_pool(x: jax.Array, pool_type: str) -> jax.Array:
    if pool_type == "":
        return x
    if pool_type == "avg":
        return x.mean(axis=(1, 2))
    if pool_type == "max":
        return x.max(axis=(1, 2))
    if pool_type == "avgmax":
        return 0.5 * (x.mean(axis=(1, 2)) + x.max(axis=(1, 2)))
    if pool_type == "catavgmax":
        return jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
    raise ValueError(f"unknown global_pool {pool_type!r}; expected one of {POOL_TYPES}")


def _check_pool_type(pool_type: str) -> str:
    if pool_type not in POOL_TYPES:
        raise ValueError(f"unknown global_pool {pool_type!r}; expected one of {POOL_TYPES}")
    return pool_type


class ClassifierHead(nnx.Module):
    """Global pool (NHWC) -> dropout -> fc, as timm's ``ClassifierHead``; no fc when ``num_classes == 0``."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pool_type: str = "avg",
        drop_rate: float = 0.0,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.global_pool = _check_pool_type(pool_type)
        self.num_features = in_features * (2 if pool_type == "catavgmax" else 1)
        self.drop = _dropout(drop_rate, rngs)
        self.fc = (
            _linear(self.num_features, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if num_classes > 0
            else None
        )

    def __call__(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        x = self.drop(_global_pool(x, self.global_pool))
        if pre_logits or self.fc is None:
            return x
        return self.fc(x)


# ----------------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------------


class SwinTransformer(nnx.Module):
    """Swin Transformer, NHWC in and out, numerically the same function as timm's ``SwinTransformer``.

    Build it with :func:`swin_jax.create_model`. The module is created in eval mode (dropout and drop
    path off); call ``model.train()`` to enable them (an RNG stream is held where a rate is non-zero).
    """

    def __init__(
        self,
        img_size: int | Pair = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        head_dim: int | None = None,
        window_size: Any = 7,
        always_partition: bool = False,
        strict_img_size: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dynamic_img_size: bool = False,
        features_only: bool = False,
        out_indices: int | Sequence[int] = (0, 1, 2, 3),
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        attn_impl: str = "auto",
        *,
        rngs: nnx.Rngs,
    ):
        """
        Args:
            img_size: input image size ``H`` or ``(H, W)``.
            patch_size: patch size of the stem.
            in_chans: input channels.
            num_classes: classes of the head; 0 for no classifier (pooled features out).
            global_pool: 'avg', 'max', 'avgmax', 'catavgmax' or '' (no pooling).
            embed_dim: width of the first stage; doubles every stage.
            depths: blocks per stage.
            num_heads: attention heads per stage.
            head_dim: channels per head (``dim // num_heads`` if None).
            window_size: an int or ``(h, w)`` for all stages, or one per stage (S3 models).
            always_partition: always partition into full windows and shift.
            strict_img_size: require inputs of exactly ``img_size``; otherwise any multiple of the patch.
            mlp_ratio: MLP hidden width / dim.
            qkv_bias: learnable q, k, v bias.
            drop_rate: head dropout.
            proj_drop_rate: dropout after projections.
            attn_drop_rate: attention weight dropout.
            drop_path_rate: stochastic depth rate at the last block (linear over blocks, as timm).
            dynamic_img_size: timm's alias of ``strict_img_size=False``.
            features_only: build only the stages needed for ``out_indices``, no final norm and no head;
                calling the model returns the list of NHWC stage maps.
            out_indices: stage indices returned by a ``features_only`` model (an int n: the last n).
            dtype: compute dtype.
            param_dtype: parameter storage dtype.
            attn_impl: window attention implementation, one of :func:`swin_jax.attention_impls` ('auto': the
                fastest measured on the platform). All compute the same function; see :mod:`swin_jax.attention`.
            rngs: NNX RNGs (``params`` for init, ``dropout`` for dropout/drop path).
        """
        depths = tuple(int(d) for d in depths)
        num_heads = tuple(int(h) for h in num_heads)
        num_layers = len(depths)
        if len(num_heads) != num_layers:
            raise ValueError(f"depths {depths} and num_heads {num_heads} must have one entry per stage")
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = _check_pool_type(global_pool)
        self.strict_img_size = strict_img_size and not dynamic_img_size
        self.features_only = features_only
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.attn_impl = attention.check_attn_impl(attn_impl)
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.num_features = int(embed_dim * 2 ** (num_layers - 1))
        dims = [int(embed_dim * 2**i) for i in range(num_layers)]
        window_sizes = resolve_stage_window_sizes(window_size, num_layers)
        self.window_sizes = window_sizes
        patch_grid = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.grid_size = patch_grid
        mlp_ratios = mlp_ratio if isinstance(mlp_ratio, (list, tuple)) else (mlp_ratio,) * num_layers
        head_dims = head_dim if isinstance(head_dim, (list, tuple)) else (head_dim,) * num_layers

        # stage-wise split of a linear drop path schedule over all blocks, as timm
        rates = np.linspace(0.0, drop_path_rate, sum(depths), dtype=np.float32)
        dpr = [rates[sum(depths[:i]) : sum(depths[: i + 1])].tolist() for i in range(num_layers)]

        self.feature_info = []
        scale = 1
        for i in range(num_layers):
            if i > 0:
                scale *= 2
            self.feature_info.append(
                dict(num_chs=dims[i], reduction=max(self.patch_size) * scale, module=f"layers.{i}")
            )
        if features_only:
            self.out_indices, last = feature_take_indices(num_layers, out_indices)
            num_built = last + 1
        else:
            self.out_indices = list(range(num_layers))
            num_built = num_layers

        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = PatchEmbed(patch_size, in_chans, dims[0], **kw)
        layers = []
        in_dim, scale = dims[0], 1
        for i in range(num_built):
            layers.append(
                SwinTransformerStage(
                    in_dim,
                    dims[i],
                    ((patch_grid[0] + scale - 1) // scale, (patch_grid[1] + scale - 1) // scale),
                    depths[i],
                    downsample=i > 0,
                    num_heads=num_heads[i],
                    head_dim=head_dims[i],
                    window_size=window_sizes[i],
                    always_partition=always_partition,
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[i],
                    attn_impl=attn_impl,
                    **kw,
                )
            )
            in_dim = dims[i]
            if i > 0:
                scale *= 2
        self.layers = nnx.List(layers)
        if features_only:
            self.norm = None
            self.head = None
        else:
            self.norm = LayerNorm(self.num_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, **kw)
        self.head_hidden_size = self.head.num_features if self.head is not None else self.num_features

    # ---- input checks (Python, at trace time: shapes are static under jit) ----

    def _check_input(self, x: Any) -> jax.Array:
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(
                f"expected an image batch as a jax/numpy array of shape [B, H, W, {self.in_chans}] (NHWC), "
                f"got {type(x).__name__}; preprocess images with swin_jax.create_transform and stack them"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(
                f"expected a floating point image batch (normalized, as create_transform returns), got dtype {x.dtype}"
            )
        if x.ndim != 4:
            hint = " (a single image? add a batch axis: x[None])" if x.ndim == 3 else ""
            raise ValueError(f"expected a 4-D NHWC batch [B, H, W, {self.in_chans}], got shape {tuple(x.shape)}{hint}")
        _, h, w, c = x.shape
        if c != self.in_chans:
            hint = ""
            if x.shape[1] == self.in_chans:
                hint = "; this looks like NCHW (PyTorch layout): transpose with x.transpose(0, 2, 3, 1)"
            raise ValueError(
                f"expected {self.in_chans} input channels in the last axis (NHWC), got shape {tuple(x.shape)}{hint}"
            )
        if self.strict_img_size:
            if (h, w) != self.img_size:
                raise ValueError(
                    f"expected input size {self.img_size[0]}x{self.img_size[1]} (H x W), got {h}x{w}; "
                    f"create the model with img_size=({h}, {w}) or strict_img_size=False"
                )
        elif h % self.patch_size[0] or w % self.patch_size[1]:
            raise ValueError(
                f"input size {h}x{w} must be divisible by the patch size {self.patch_size[0]}x{self.patch_size[1]}"
            )
        return jnp.asarray(x, self.dtype)

    # ---- forward ----

    def forward_intermediates(
        self,
        x: jax.Array,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        intermediates_only: bool = False,
    ) -> list[jax.Array] | tuple[jax.Array, list[jax.Array]]:
        """Forward returning the stage maps, NHWC (timm's ``forward_intermediates``, channels last).

        Args:
            x: ``[B, H, W, C]`` images.
            indices: stages to take: None = all, int n = last n, or a sequence of indices.
            norm: apply the final norm to the last stage's map when it is taken.
            stop_early: stop after the last stage taken.
            intermediates_only: return only the list of maps.

        Returns:
            The list of maps, or ``(final_features, maps)`` where ``final_features`` has the final
            norm applied if the last stage ran.
        """
        x = self._check_input(x)
        take, last = feature_take_indices(len(self.layers), indices)
        stages = self.layers[: last + 1] if stop_early else self.layers
        num_stages = self.num_layers
        maps = []
        i = 0
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                maps.append(self.norm(x) if (norm and i == num_stages - 1 and self.norm is not None) else x)
        if intermediates_only:
            return maps
        if i == num_stages - 1 and self.norm is not None:
            x = self.norm(x)
        return x, maps

    def forward_features(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` images -> ``[B, h, w, num_features]`` after the final norm."""
        if self.features_only:
            raise ValueError("a features_only model has no final norm: call it, or use forward_intermediates")
        x = self.patch_embed(self._check_input(x))
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Pool (and classify unless ``pre_logits``) the output of :meth:`forward_features`."""
        if self.head is None:
            raise ValueError("a features_only model has no head")
        return self.head(x, pre_logits=pre_logits)

    def __call__(self, x: jax.Array) -> jax.Array | list[jax.Array]:
        """Logits ``[B, num_classes]`` (pooled features when ``num_classes == 0``); for a
        ``features_only`` model, the list of NHWC stage maps picked by ``out_indices``."""
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        return self.forward_head(self.forward_features(x))

    # ---- head management ----

    def get_classifier(self) -> nnx.Linear | None:
        """The classifier ``fc`` layer (None without one)."""
        return None if self.head is None else self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, *, rngs: nnx.Rngs | None = None):
        """Replace the classifier with a fresh one for ``num_classes`` (0 removes it), as timm.

        Args:
            num_classes: classes of the new head.
            global_pool: new pooling type, unchanged if None.
            rngs: RNGs for the new fc layer (``nnx.Rngs(0)`` if None).
        """
        if self.head is None:
            raise ValueError("a features_only model has no head")
        pool = self.head.global_pool if global_pool is None else _check_pool_type(global_pool)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        drop_rate, deterministic = self.head.drop.rate, self.head.drop.deterministic
        self.head = ClassifierHead(
            self.num_features, num_classes, pool, drop_rate, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs
        )
        self.head.drop.deterministic = deterministic  # keep the model's train/eval mode
        self.num_classes = num_classes
        self.global_pool = pool
        self.head_hidden_size = self.head.num_features

    def set_attn_impl(self, attn_impl: str) -> None:
        """Switch every block to another attention implementation (:func:`swin_jax.attention_impls`).
        Weights are untouched; the next trace of the model uses it."""
        self.attn_impl = attention.check_attn_impl(attn_impl)
        for stage in self.layers:
            for block in stage.blocks:
                block.attn.attn_impl = attn_impl

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (``nnx.remat``), as timm's method of
        the same name: less memory for training, about one extra forward of compute. The parameter
        tree (and so the timm mapping) is unchanged."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """timm names of parameters that take no weight decay (relative position bias tables)."""
        return {
            f"layers.{i}.blocks.{j}.attn.relative_position_bias_table"
            for i, stage in enumerate(self.layers)
            for j in range(len(stage.blocks))
        }
