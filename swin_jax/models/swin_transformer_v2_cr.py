"""Swin Transformer V2-CR in Flax NNX, computing the same function as timm's ``SwinTransformerV2Cr``.

A port of timm 1.0.x ``timm/models/swin_transformer_v2_cr.py`` (Christoph Reich's reimplementation of SwinV2,
adapted by Ross Wightman), a different model from :mod:`swin_jax.models.swin_transformer_v2`:

* cosine attention as SwinV2's (:class:`~swin_jax.models.swin_transformer_v2.CosineWindowAttention`), but with a
  biased ``qkv`` and one ``logit_scale`` per head of shape ``[heads]``;
* the position bias comes from ``meta_mlp`` (2 -> 384 -> heads, ReLU, dropout 0.125 on the hidden layer in train
  mode) applied to every pair of window positions, on natural-log relative coordinates ``sign(d) * ln(1 + |d|)``:
  no normalization by a pretrained window and no sigmoid;
* post-norm blocks whose norm1 / norm2 start at ``init_values`` (0), and a third norm ``norm3`` on the residual
  stream after some blocks: every ``extra_norm_period``-th block, the last block of every stage with
  ``extra_norm_stage`` (the ``_ns`` models), and always the last block of the model, which replaces a final norm;
* PatchMerging normalizes first (at 4x the width), then reduces;
* the windows follow the patch grid: ``window_ratio`` (8) divides it unless ``window_size`` is given;
* the stem floors an input that is not a multiple of the patch size;
* every Linear keeps torch's default init (timm's ``weight_init='reset'``).

The stages are ``self.stages`` (timm's name; V1 and V2 call them ``layers``), so the weight mapping is the rule table
of :mod:`swin_jax.weights` as for the other families.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import attention
from ._base import SwinBase, trunk_args
from ._layers import (
    LayerNorm,
    Mlp,
    SwinStage,
    WindowBlock,
    _dropout,
    _torch_linear,
    drop_path,
    materialize_grad,
    merge_2x2,
)
from ._windows import Pair, calc_stage_window_sizes, resolve_window_args, to_2tuple
from .swin_transformer_v2 import CosineWindowAttention

__all__ = [
    "relative_coordinates_log",
    "WindowMultiHeadAttention",
    "SwinTransformerV2CrBlock",
    "PatchMerging",
    "SwinTransformerV2CrStage",
    "SwinTransformerV2Cr",
]

META_HIDDEN = 384  # width of timm's meta network (the position bias MLP)
META_DROP = 0.125  # timm's dropout after the meta network's activation (train mode only)


@functools.cache
def relative_coordinates_log(window_size: Pair) -> np.ndarray:
    """The meta network's input ``[N * N, 2]`` (``N = h * w``), as timm's ``relative_coordinates_log``: the offset of
    every pair of window positions (query-major), log-spaced as ``sign(d) * ln(1 + |d|)``. Float64 (timm computes it
    in float32), read-only."""
    wh, ww = to_2tuple(window_size)
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1).astype(np.float64)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0).reshape(-1, 2)
    table = np.sign(rel) * np.log(1.0 + np.abs(rel))
    table.setflags(write=False)
    return table


class WindowMultiHeadAttention(CosineWindowAttention):
    """SwinV2-CR's window attention: cosine similarity, a position bias from ``meta_mlp``, a biased ``qkv``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Pair,
        drop_attn: float = 0.0,
        drop_proj: float = 0.0,
        meta_hidden_dim: int = META_HIDDEN,
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
            window_size: ``(h, w)`` of the window.
            drop_attn: dropout rate on the attention weights.
            drop_proj: dropout rate on the output.
            meta_hidden_dim: hidden width of the position bias MLP.
            attn_impl: attention implementation, one of :func:`swin_jax.attention_impls`.
        """
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.attn_impl = attention.check_attn_impl(attn_impl)
        self.window_size = to_2tuple(window_size)
        self.num_heads = num_heads
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = _torch_linear(dim, dim * 3, **kw)
        self.attn_drop = _dropout(drop_attn, rngs)
        self.proj = _torch_linear(dim, dim, **kw)
        self.proj_drop = _dropout(drop_proj, rngs)
        self.meta_mlp = Mlp(
            2, meta_hidden_dim, (META_DROP, 0.0), out_dim=num_heads, act="relu", linear=_torch_linear, **kw
        )
        self.logit_scale = nnx.Param(jnp.full((num_heads,), math.log(10.0), param_dtype))

    def set_window_size(self, window_size: Pair) -> None:
        """A new window: the meta network's coordinates follow it (no parameter changes), as timm."""
        self.window_size = to_2tuple(window_size)

    def relative_position_bias(self) -> jax.Array:
        """The bias ``[num_heads, N, N]``: ``meta_mlp`` on every pair's log-spaced offset (in train mode its hidden
        layer is dropped out per pair, as timm's)."""
        n = self.window_size[0] * self.window_size[1]
        dtype = self.meta_mlp.fc1.kernel.dtype if self.dtype is None else self.dtype
        bias = self.meta_mlp(jnp.asarray(relative_coordinates_log(self.window_size), dtype))
        return bias.T.reshape(self.num_heads, n, n)


class SwinTransformerV2CrBlock(WindowBlock):
    """SwinV2-CR block: (shifted) cosine window attention and MLP, each with a residual post-norm and drop path, then
    optionally a norm of the residual stream (``norm3``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        feat_size: Pair,
        window_size: Pair,
        shift_size: Pair = (0, 0),
        always_partition: bool = False,
        mlp_ratio: float = 4.0,
        init_values: float | None = 0.0,
        proj_drop: float = 0.0,
        drop_attn: float = 0.0,
        drop_path: float = 0.0,
        extra_norm: bool = False,
        attn_impl: str = "auto",
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        """
        Args:
            dim: number of channels.
            num_heads: attention heads.
            feat_size: feature size ``(H, W)`` the block is built for; windows are clipped to it.
            window_size: target window ``(h, w)``.
            shift_size: target shift ``(h, w)`` (0 for a regular block).
            always_partition: never clip the window or drop the shift.
            mlp_ratio: MLP hidden width / dim.
            init_values: initial scale of norm1 / norm2 (None: 1, as LayerNorm's default).
            proj_drop: dropout after projections.
            drop_attn: dropout on attention weights.
            drop_path: stochastic depth rate.
            extra_norm: end the block with a LayerNorm of the residual stream (``norm3``).
            attn_impl: attention implementation (:func:`swin_jax.attention_impls`).
        """
        self._set_geometry(feat_size, window_size, shift_size, always_partition)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        post_scale = 1.0 if init_values is None else float(init_values)
        self.attn = WindowMultiHeadAttention(
            dim, num_heads, self.window_size, drop_attn, proj_drop, META_HIDDEN, attn_impl, **kw
        )
        self.norm1 = LayerNorm(dim, init_scale=post_scale, **kw)
        self.drop_path1 = _dropout(drop_path, rngs, broadcast_dims=(1, 2, 3))
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop, linear=_torch_linear, **kw)
        self.norm2 = LayerNorm(dim, init_scale=post_scale, **kw)
        self.drop_path2 = _dropout(drop_path, rngs, broadcast_dims=(1, 2, 3))
        self.norm3 = LayerNorm(dim, **kw) if extra_norm else None

    def __call__(self, x: jax.Array, drop_path_keep: jax.Array | None = None) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        x = materialize_grad(x)  # the gradient flowing out of this block is computed once (see its comment)
        x = x + drop_path(self.drop_path1, self.norm1(self._attn(x)), drop_path_keep)
        x = x + drop_path(self.drop_path2, self.norm2(self.mlp(x)), drop_path_keep)
        return x if self.norm3 is None else self.norm3(x)


class PatchMerging(nnx.Module):
    """Downsample by concatenating each 2x2 neighbourhood (timm's order), LayerNorm at 4x the width, then a linear
    reduction to 2x."""

    def __init__(self, dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm = LayerNorm(4 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.reduction = _torch_linear(
            4 * dim, 2 * dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), 2C]`` (odd sizes zero-padded bottom/right)."""
        return self.reduction(self.norm(merge_2x2(x)))


class SwinTransformerV2CrStage(SwinStage):
    """One stage: optional PatchMerging at the start, then ``depth`` blocks alternating W-MSA / SW-MSA, the blocks
    picked by ``extra_norm_period`` / ``extra_norm_stage`` ending with ``norm3``."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: Pair,
        depth: int,
        downsample: bool = True,
        num_heads: int = 4,
        window_size: Pair = (7, 7),
        always_partition: bool = False,
        mlp_ratio: float = 4.0,
        init_values: float | None = 0.0,
        proj_drop: float = 0.0,
        drop_attn: float = 0.0,
        drop_path: Sequence[float] | float = 0.0,
        extra_norm_period: int = 0,
        extra_norm_stage: bool = False,
        attn_impl: str = "auto",
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if downsample and out_dim != 2 * dim:
            raise ValueError(f"SwinV2-CR's PatchMerging doubles the width: out_dim {out_dim} != 2 * dim {dim}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def extra_norm(index: int) -> bool:  # timm's _extra_norm
            i = index + 1
            if extra_norm_period and i % extra_norm_period == 0:
                return True
            return extra_norm_stage and i == depth

        self._build(
            dim,
            out_dim,
            input_resolution,
            depth,
            downsample,
            window_size,
            drop_path,
            lambda: PatchMerging(dim, **kw),
            lambda index, resolution, shift, rate: SwinTransformerV2CrBlock(
                out_dim,
                num_heads,
                resolution,
                window_size,
                shift,
                always_partition,
                mlp_ratio,
                init_values,
                proj_drop,
                drop_attn,
                rate,
                extra_norm(index),
                attn_impl,
                **kw,
            ),
        )


class SwinTransformerV2Cr(SwinBase):
    """Swin Transformer V2-CR, NHWC in and out, numerically the same function as timm's ``SwinTransformerV2Cr``.

    Build it with :func:`swin_jax.create_model` (``swinv2_cr_*`` names). Created in eval mode; ``model.train()``
    turns dropout and drop path on (and the position bias MLP's fixed 0.125 dropout, as timm). Every method of
    :class:`swin_jax.SwinTransformer` is here too; there is no final norm (``model.norm`` is None: the last block
    ends with ``norm3``), and the stages are ``model.stages``.
    """

    stages_attr = "stages"
    floor_input_to_patch = True
    head_linear = staticmethod(_torch_linear)

    def __init__(
        self,
        img_size: int | Pair = 224,
        patch_size: int = 4,
        window_size: Any = None,
        window_ratio: int | Sequence[int] = 8,
        always_partition: bool = False,
        strict_img_size: bool = True,
        dynamic_img_size: bool = False,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        mlp_ratio: float = 4.0,
        init_values: float | None = 0.0,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        extra_norm_period: int = 0,
        extra_norm_stage: bool = False,
        global_pool: str = "avg",
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
            patch_size: patch size of the stem (inputs are floored to a multiple of it).
            window_size: an int or ``(h, w)`` for all stages, or one per stage; overrides ``window_ratio``.
            window_ratio: divisor of the patch grid giving each stage's window (one for all stages, or one per stage:
                a sequence of two is two stages).
            always_partition: always partition into full windows and shift.
            strict_img_size: require inputs of exactly ``img_size``; otherwise any size (the construction-time
                windows and shifts are kept; only the shift mask follows the input).
            dynamic_img_size: timm's alias of ``strict_img_size=False``.
            in_chans: input channels.
            num_classes: classes of the head; 0 for no classifier (pooled features out).
            embed_dim: width of the first stage; doubles every stage.
            depths: blocks per stage.
            num_heads: attention heads per stage.
            mlp_ratio: MLP hidden width / dim.
            init_values: initial scale of every block's norm1 / norm2 (None: 1).
            drop_rate: head dropout.
            proj_drop_rate: dropout after projections.
            attn_drop_rate: attention weight dropout.
            drop_path_rate: stochastic depth rate at the last block (linear over blocks, as timm).
            extra_norm_period: a ``norm3`` after every this many blocks of a stage (0: none).
            extra_norm_stage: a ``norm3`` after the last block of every stage (the last stage always has one).
            global_pool: 'avg', 'max', 'avgmax', 'catavgmax' or '' (no pooling).
            features_only: build only the stages needed for ``out_indices``, and no head.
            out_indices: stage indices returned by a ``features_only`` model (an int n: the last n).
            dtype: compute dtype.
            param_dtype: parameter storage dtype.
            attn_impl: window attention implementation, one of :func:`swin_jax.attention_impls`.
            rngs: NNX RNGs (``params`` for init, ``dropout`` for dropout/drop path).
        """
        num_stages = len(depths)
        if window_size is None:  # timm's window_sizes_from_ratio on the patch grid
            _, ratios = resolve_window_args(None, window_ratio, num_stages)
            grid = tuple(s // p for s, p in zip(to_2tuple(img_size), to_2tuple(patch_size)))
            window_size = calc_stage_window_sizes(grid, (), grid, window_ratios=ratios)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def make_stage(i: int, **stage: Any) -> SwinTransformerV2CrStage:
            return SwinTransformerV2CrStage(
                downsample=i > 0,
                always_partition=always_partition,
                mlp_ratio=mlp_ratio,
                init_values=init_values,
                proj_drop=proj_drop_rate,
                drop_attn=attn_drop_rate,
                extra_norm_period=extra_norm_period,
                extra_norm_stage=extra_norm_stage or i == num_stages - 1,  # the last stage ends with a norm
                attn_impl=attn_impl,
                **stage,
                **kw,
            )

        self._build_trunk(make_stage, rngs, final_norm=False, **trunk_args(locals()))

    def no_weight_decay(self) -> set[str]:
        """timm names of parameters that take no weight decay besides the 1-D ones: none (timm's model has no
        ``no_weight_decay``; the logit scales are 1-D)."""
        return set()
