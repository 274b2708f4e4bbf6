"""Swin Transformer (V1) in Flax NNX, computing the same function as timm's ``SwinTransformer``.

A port of timm 1.0.x ``timm/models/swin_transformer.py``:

* `Swin Transformer: Hierarchical Vision Transformer using Shifted Windows`, https://arxiv.org/abs/2103.14030
* `Searching the Search Space of Vision Transformer` (S3), https://arxiv.org/abs/2111.14725

The NNX attribute tree mirrors timm's module names (``patch_embed.proj``, ``layers[i].downsample``,
``layers[i].blocks[j].attn.qkv``, ``attn.relative_position_bias_table``, ``mlp.fc1``, ``norm``,
``head.fc``), so the weight mapping in :mod:`swin_jax.weights` is a handful of layout rules.

Layout is NHWC everywhere. The window geometry (relative position index, shift mask) is plain numpy
(:mod:`swin_jax.models._windows`), computed once per shape and cached; under ``jax.jit`` it becomes a constant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import attention
from ..weights import resize_rel_pos_bias_table
from ._base import SwinBase, trunk_args
from ._layers import (
    LayerNorm,
    MapAttention,
    Mlp,
    SwinStage,
    WindowBlock,
    _dropout,
    _linear,
    _trunc_normal_02,
    drop_path,
    dropout_active,
    in_reverse_mode,
    materialize_grad,
    merge_2x2,
)
from ._windows import Pair, relative_position_index, to_2tuple

__all__ = ["WindowAttention", "SwinTransformerBlock", "PatchMerging", "SwinTransformerStage", "SwinTransformer"]


class WindowAttention(MapAttention):
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

    def set_window_size(self, window_size: Pair) -> None:
        """A new window: the bias table is resized as timm's ``set_window_size`` does (resize_rel_pos_bias_table)."""
        window_size = to_2tuple(window_size)
        if window_size == self.window_size:
            return
        table = self.relative_position_bias_table
        resized = resize_rel_pos_bias_table(np.asarray(table[...]), window_size, old_window_size=self.window_size)
        self.relative_position_bias_table = nnx.Param(jnp.asarray(resized, table.dtype))
        self.window_size = window_size

    def relative_position_bias(self) -> jax.Array:
        """The bias ``[num_heads, N, N]`` gathered from the table for this window size."""
        n = self.window_size[0] * self.window_size[1]
        index = relative_position_index(*self.window_size).reshape(-1)
        bias = jnp.take(self.relative_position_bias_table[...], index, axis=0).reshape(n, n, -1)
        return bias.transpose(2, 0, 1)

    def _map_qkv(self, x: jax.Array) -> tuple[jax.Array, float]:
        """``[B, T, C]`` -> ``[B, T, 3, heads, d]`` as the qkv projection lays them out, and the scale on q."""
        b_, n, _ = x.shape
        return self.qkv(x).reshape(b_, n, 3, self.num_heads, -1), self.scale

    def _kernel_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Token-major ``[B * nW, N, heads, d]`` q (scaled), k, v."""
        qkv, scale = self._map_qkv(x)
        return qkv[:, :, 0] * jnp.asarray(scale, qkv.dtype), qkv[:, :, 1], qkv[:, :, 2]

    def attention_weights(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
        """The attention probabilities (what timm's ``attn.softmax`` outputs), for study.

        Args:
            x: window tokens ``[B * nW, N, C]``.
            mask: additive mask ``[nW, N, N]`` for shifted windows, or None.

        Returns:
            ``[B * nW, num_heads, N, N]`` float32 (float64 for a float64 model); each row sums to 1. Dropout is
            not applied.
        """
        q, k, _ = self._kernel_qkv(x)
        return attention.attention_probs(q, k, self.relative_position_bias(), mask)

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
        q, k, v = self._kernel_qkv(x)
        bias = self.relative_position_bias()
        if dropout_active(self.attn_drop):
            attn = self.attn_drop(attention.attention_probs(q, k, bias, mask).astype(v.dtype))
            x = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b_, n, -1)
        else:
            x = attention.window_attention(impl, q, k, v, bias, mask, reverse_only=in_reverse_mode())
            x = x.reshape(b_, n, -1)
        return self.proj_drop(self.proj(x))


class SwinTransformerBlock(WindowBlock):
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
        self._set_geometry(input_resolution, window_size, shift_size, always_partition)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = LayerNorm(dim, **kw)
        self.attn = WindowAttention(
            dim, num_heads, head_dim, self.window_size, qkv_bias, attn_drop, proj_drop, attn_impl, **kw
        )
        self.drop_path1 = _dropout(drop_path, rngs, broadcast_dims=(1, 2, 3))
        self.norm2 = LayerNorm(dim, **kw)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop, **kw)
        self.drop_path2 = _dropout(drop_path, rngs, broadcast_dims=(1, 2, 3))

    def _attn_input(self, x: jax.Array) -> jax.Array:
        return self.norm1(x)  # pre-norm

    def __call__(self, x: jax.Array, drop_path_keep: jax.Array | None = None) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        x = materialize_grad(x)  # the gradient flowing out of this block is computed once (see its comment)
        x = x + drop_path(self.drop_path1, self._attn(self.norm1(x)), drop_path_keep)
        return x + drop_path(self.drop_path2, self.mlp(self.norm2(x)), drop_path_keep)


class PatchMerging(nnx.Module):
    """Downsample by concatenating each 2x2 neighbourhood (timm's order), LayerNorm, linear reduction."""

    def __init__(self, dim: int, out_dim: int | None = None, *, dtype=None, param_dtype=jnp.float32, rngs):
        self.out_dim = out_dim or 2 * dim
        self.norm = LayerNorm(4 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.reduction = _linear(4 * dim, self.out_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), out_dim]`` (odd sizes zero-padded bottom/right)."""
        return self.reduction(self.norm(merge_2x2(x)))


class SwinTransformerStage(SwinStage):
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
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self._build(
            dim,
            out_dim,
            input_resolution,
            depth,
            downsample,
            window_size,
            drop_path,
            lambda: PatchMerging(dim, out_dim, **kw),
            lambda _, resolution, shift, rate: SwinTransformerBlock(
                out_dim,
                resolution,
                num_heads,
                head_dim,
                window_size,
                shift,
                always_partition,
                mlp_ratio,
                qkv_bias,
                proj_drop,
                attn_drop,
                rate,
                attn_impl,
                **kw,
            ),
        )


class SwinTransformer(SwinBase):
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
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        num_stages = len(depths)
        mlp_ratios = mlp_ratio if isinstance(mlp_ratio, (list, tuple)) else (mlp_ratio,) * num_stages
        head_dims = head_dim if isinstance(head_dim, (list, tuple)) else (head_dim,) * num_stages

        def make_stage(i: int, **stage: Any) -> SwinTransformerStage:
            return SwinTransformerStage(
                downsample=i > 0,
                head_dim=head_dims[i],
                always_partition=always_partition,
                mlp_ratio=mlp_ratios[i],
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                attn_impl=attn_impl,
                **stage,
                **kw,
            )

        self._build_trunk(make_stage, rngs, **trunk_args(locals()))

    def no_weight_decay(self) -> set[str]:
        """timm names of parameters that take no weight decay (relative position bias tables)."""
        return {
            f"layers.{i}.blocks.{j}.attn.relative_position_bias_table"
            for i, stage in enumerate(self.layers)
            for j in range(len(stage.blocks))
        }
