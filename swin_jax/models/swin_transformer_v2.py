"""Swin Transformer V2 in Flax NNX, computing the same function as timm's ``SwinTransformerV2``.

A port of timm 1.0.x ``timm/models/swin_transformer_v2.py``:

* `Swin Transformer V2: Scaling Up Capacity and Resolution`, https://arxiv.org/abs/2111.09883

What differs from V1 (:mod:`swin_jax.models.swin_transformer`):

* cosine attention: ``normalize(q) @ normalize(k)^T * exp(min(logit_scale, ln 100))``, one learned scale per head;
* a continuous position bias: a 2-layer MLP (``cpb_mlp``) maps log-spaced relative coordinates (normalized by
  the pre-training window, ``pretrained_window_size``) to a bias per head, squashed to ``16 * sigmoid``;
* separate ``q_bias`` / ``v_bias`` (k has none) on a bias-free ``qkv`` projection;
* residual post-norm blocks (``x + norm1(attn(x))``; norm1 / norm2 start at zero, as timm initializes them);
* PatchMerging reduces first, then normalizes (at the output width).

The NNX tree mirrors timm's names (``attn.logit_scale``, ``attn.cpb_mlp.0`` / ``.2``, ``attn.q_bias``, ...), so
the weight mapping stays the rule table of :mod:`swin_jax.weights`.
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
    MapAttention,
    Mlp,
    SwinStage,
    WindowBlock,
    _dropout,
    _linear,
    drop_path,
    dropout_active,
    in_reverse_mode,
    materialize_grad,
    merge_2x2,
)
from ._windows import Pair, relative_position_index, to_2tuple

__all__ = [
    "relative_coords_table",
    "CosineWindowAttention",
    "WindowAttention",
    "SwinTransformerV2Block",
    "PatchMerging",
    "SwinTransformerV2Stage",
    "SwinTransformerV2",
]

CPB_HIDDEN = 512  # width of timm's continuous position bias MLP
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)  # timm clamps the learned log scale at ln(100)


@functools.cache
def relative_coords_table(window_size: Pair, pretrained_window_size: Pair = (0, 0)) -> np.ndarray:
    """The continuous position bias MLP's input ``[2h-1, 2w-1, 2]``, as timm's ``relative_coords_table``.

    Relative offsets are divided by ``pretrained window - 1`` (the window's own size when 0), scaled to
    [-8, 8] and log-spaced: ``sign(t) * log2(|t| + 1) / log2(8)``. Computed in float64 (timm computes it in
    float32; the two differ by at most one float32 ulp), read-only.
    """
    (wh, ww), (ph, pw) = to_2tuple(window_size), to_2tuple(pretrained_window_size)
    offsets_h, offsets_w = np.arange(-(wh - 1), wh, dtype=np.float64), np.arange(-(ww - 1), ww, dtype=np.float64)
    table = np.stack(np.meshgrid(offsets_h, offsets_w, indexing="ij"), axis=-1)
    div_h, div_w = (ph, pw) if ph > 0 else (wh, ww)
    table[..., 0] /= max(div_h - 1, 1)  # a window of 1 has only the offset 0: no 0 / 0
    table[..., 1] /= max(div_w - 1, 1)
    table *= 8
    table = np.sign(table) * np.log2(np.abs(table) + 1.0) / math.log2(8)
    table.setflags(write=False)
    return table


def _normalize(t: jax.Array) -> jax.Array:
    """torch's ``F.normalize(t, dim=-1)``: ``t / max(||t||, 1e-12)`` (an all-zero row stays zero)."""
    norm = jnp.sqrt(jnp.sum(t * t, axis=-1, keepdims=True))
    return t / jnp.maximum(norm, jnp.asarray(1e-12, t.dtype))


class ReLU(nnx.Module):
    """The parameter-free middle entry of ``cpb_mlp`` (timm's ``nn.ReLU`` at index 1 keeps the indices 0 and 2)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class CosineWindowAttention(MapAttention):
    """Scaled cosine window attention, shared by SwinV2 and SwinV2-CR: ``normalize(q) @ normalize(k)^T`` times a
    per-head ``exp(min(logit_scale, ln 100))``, plus the family's position bias and the shift mask, softmax, ``@ v``,
    projection.

    A subclass builds ``qkv``, ``proj``, ``logit_scale`` (one per head, any shape), ``attn_drop``, ``proj_drop``,
    ``num_heads`` and ``attn_impl``, and defines :meth:`relative_position_bias` (``[heads, N, N]``) and, where the
    projection is not a plain biased Linear, :meth:`_qkv`.
    """

    num_heads: int

    def _qkv(self, x: jax.Array) -> jax.Array:
        """``[B * nW, N, C]`` -> token-major ``[B * nW, N, 3, heads, d]``."""
        b_, n, _ = x.shape
        return self.qkv(x).reshape(b_, n, 3, self.num_heads, -1)

    @staticmethod
    def _unit_qk(qkv: jax.Array) -> tuple[jax.Array, jax.Array]:
        """q and k of token-major qkv, each normalized to unit length per head (the cosine)."""
        return _normalize(qkv[:, :, 0]), _normalize(qkv[:, :, 1])

    def _kernel_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The kernels take q pre-scaled: the per-head logit scale folds into the normalized q."""
        qkv = self._qkv(x)
        q, k = self._unit_qk(qkv)
        return q * self._scale().astype(q.dtype)[None, None, :, None], k, qkv[:, :, 2]

    def _map_qkv(self, x: jax.Array) -> tuple[jax.Array, None]:
        """q (scaled), k, v stacked ``[B, T, 3, heads, d]`` (one fusion with the normalization)."""
        return jnp.stack(self._kernel_qkv(x), axis=2), None

    def _scale(self) -> jax.Array:
        """``exp(min(logit_scale, ln 100))`` per head, ``[heads]``."""
        return jnp.exp(jnp.minimum(self.logit_scale[...], LOGIT_SCALE_MAX)).reshape(-1)

    def _softmax(self, qkv: jax.Array, mask: np.ndarray | None) -> jax.Array:
        """Attention probabilities ``[B * nW, heads, N, N]`` (float32 or wider) from token-major qkv."""
        q, k = self._unit_qk(qkv)
        return attention.attention_probs(q, k, self.relative_position_bias(), mask, self._scale())

    def attention_weights(self, x: jax.Array, mask: np.ndarray | None = None) -> jax.Array:
        """The attention probabilities (timm's ``attn.softmax`` output) ``[B * nW, heads, N, N]``, float32 or wider."""
        return self._softmax(self._qkv(x), mask)

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
        if dropout_active(self.attn_drop):
            qkv = self._qkv(x)
            attn = self.attn_drop(self._softmax(qkv, mask).astype(qkv.dtype))
            x = jnp.einsum("bhqk,bkhd->bqhd", attn, qkv[:, :, 2])
        elif impl == "einsum":  # the scale on the logits, as timm
            qkv = self._qkv(x)
            q, k = self._unit_qk(qkv)
            x = attention.softmax_attention(q, k, qkv[:, :, 2], self.relative_position_bias(), mask, self._scale())
        else:
            q, k, v = self._kernel_qkv(x)
            bias = self.relative_position_bias()
            x = attention.window_attention(impl, q, k, v, bias, mask, reverse_only=in_reverse_mode())
        x = x.reshape(b_, n, -1)
        return self.proj_drop(self.proj(x))


class WindowAttention(CosineWindowAttention):
    """SwinV2's window attention: cosine similarity, a continuous relative position bias from ``cpb_mlp``, q / v
    biases."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: Pair = (8, 8),
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        pretrained_window_size: Pair = (0, 0),
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
            qkv_bias: learnable q and v biases (k has none).
            attn_drop: dropout rate on the attention weights.
            proj_drop: dropout rate on the output.
            pretrained_window_size: the window of pre-training, which normalizes the bias MLP's coordinates
                (``(0, 0)``: this window).
            attn_impl: attention implementation, one of :func:`swin_jax.attention_impls`.
        """
        self.attn_impl = attention.check_attn_impl(attn_impl)
        self.window_size = to_2tuple(window_size)
        self.pretrained_window_size = to_2tuple(pretrained_window_size)
        self.num_heads = num_heads
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.full((num_heads, 1, 1), math.log(10.0), param_dtype))
        self.cpb_mlp = nnx.List(
            [_linear(2, CPB_HIDDEN, **kw), ReLU(), _linear(CPB_HIDDEN, num_heads, use_bias=False, **kw)]
        )
        self.qkv = _linear(dim, dim * 3, use_bias=False, **kw)
        if qkv_bias:
            self.q_bias = nnx.Param(jnp.zeros((dim,), param_dtype))
            self.v_bias = nnx.Param(jnp.zeros((dim,), param_dtype))
        else:
            self.q_bias = self.v_bias = None
        self.attn_drop = _dropout(attn_drop, rngs)
        self.proj = _linear(dim, dim, **kw)
        self.proj_drop = _dropout(proj_drop, rngs)

    def set_window_size(self, window_size: Pair) -> None:
        """A new window: the bias MLP's coordinates and the index follow it (no parameter changes), as timm."""
        self.window_size = to_2tuple(window_size)

    def relative_position_bias(self) -> jax.Array:
        """The bias ``[num_heads, N, N]``: ``16 * sigmoid(cpb_mlp(coords))`` gathered for this window size."""
        n = self.window_size[0] * self.window_size[1]
        dtype = self.cpb_mlp[0].kernel.dtype if self.dtype is None else self.dtype
        x = jnp.asarray(relative_coords_table(self.window_size, self.pretrained_window_size), dtype)
        for layer in self.cpb_mlp:
            x = layer(x)
        table = x.reshape(-1, self.num_heads)
        bias = jnp.take(table, relative_position_index(*self.window_size).reshape(-1), axis=0).reshape(n, n, -1)
        return 16 * jax.nn.sigmoid(bias.transpose(2, 0, 1))

    def _qkv(self, x: jax.Array) -> jax.Array:
        """``[B * nW, N, C]`` -> token-major ``[B * nW, N, 3, heads, d]``."""
        b_, n, _ = x.shape
        qkv = self.qkv(x)
        if self.q_bias is not None:
            q_bias = self.q_bias[...]
            bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), self.v_bias[...]]).astype(qkv.dtype)
            qkv = qkv + bias
        return qkv.reshape(b_, n, 3, self.num_heads, -1)


class SwinTransformerV2Block(WindowBlock):
    """SwinV2 block: (shifted) cosine window attention and MLP, each with a residual post-norm and drop path."""

    def __init__(
        self,
        dim: int,
        input_resolution: Pair,
        num_heads: int = 4,
        window_size: Pair = (8, 8),
        shift_size: Pair = (0, 0),
        always_partition: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        pretrained_window_size: Pair = (0, 0),
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
            window_size: target window ``(h, w)``.
            shift_size: target shift ``(h, w)`` (0 for a regular block).
            always_partition: never clip the window or drop the shift.
            mlp_ratio: MLP hidden width / dim.
            qkv_bias: learnable q and v biases.
            proj_drop: dropout after projections.
            attn_drop: dropout on attention weights.
            drop_path: stochastic depth rate.
            pretrained_window_size: the pre-training window (normalizes the position bias MLP's input).
            attn_impl: attention implementation (:func:`swin_jax.attention_impls`).
        """
        self._set_geometry(input_resolution, window_size, shift_size, always_partition)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = WindowAttention(
            dim,
            num_heads,
            self.window_size,
            qkv_bias,
            attn_drop,
            proj_drop,
            to_2tuple(pretrained_window_size),
            attn_impl,
            **kw,
        )
        self.norm1 = LayerNorm(dim, init_scale=0.0, **kw)
        self.drop_path1 = _dropout(drop_path, rngs, broadcast_dims=(1, 2, 3))
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop, **kw)
        self.norm2 = LayerNorm(dim, init_scale=0.0, **kw)
        self.drop_path2 = _dropout(drop_path, rngs, broadcast_dims=(1, 2, 3))

    def __call__(self, x: jax.Array, drop_path_keep: jax.Array | None = None) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        x = materialize_grad(x)  # the gradient flowing out of this block is computed once (see its comment)
        x = x + drop_path(self.drop_path1, self.norm1(self._attn(x)), drop_path_keep)
        return x + drop_path(self.drop_path2, self.norm2(self.mlp(x)), drop_path_keep)


class PatchMerging(nnx.Module):
    """Downsample by concatenating each 2x2 neighbourhood (timm's order), linear reduction, then LayerNorm."""

    def __init__(self, dim: int, out_dim: int | None = None, *, dtype=None, param_dtype=jnp.float32, rngs):
        self.out_dim = out_dim or 2 * dim
        self.reduction = _linear(4 * dim, self.out_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(self.out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), out_dim]`` (odd sizes zero-padded bottom/right)."""
        return self.norm(self.reduction(merge_2x2(x)))


class SwinTransformerV2Stage(SwinStage):
    """One stage: optional PatchMerging at the start, then ``depth`` blocks alternating W-MSA / SW-MSA."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        input_resolution: Pair,
        depth: int,
        downsample: bool = True,
        num_heads: int = 4,
        window_size: Pair = (8, 8),
        always_partition: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: Sequence[float] | float = 0.0,
        pretrained_window_size: Pair = (0, 0),
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
            lambda _, resolution, shift, rate: SwinTransformerV2Block(
                out_dim,
                resolution,
                num_heads,
                window_size,
                shift,
                always_partition,
                mlp_ratio,
                qkv_bias,
                proj_drop,
                attn_drop,
                rate,
                pretrained_window_size,
                attn_impl,
                **kw,
            ),
        )


class SwinTransformerV2(SwinBase):
    """Swin Transformer V2, NHWC in and out, numerically the same function as timm's ``SwinTransformerV2``.

    Build it with :func:`swin_jax.create_model` (``swinv2_*`` names). Created in eval mode; ``model.train()``
    turns dropout and drop path on. Every method of :class:`swin_jax.SwinTransformer` is here too.
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
        window_size: Any = 7,
        always_partition: bool = False,
        strict_img_size: bool = True,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pretrained_window_sizes: Sequence[int | Pair] = (0, 0, 0, 0),
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
            window_size: an int or ``(h, w)`` for all stages, or one per stage.
            always_partition: always partition into full windows and shift.
            strict_img_size: require inputs of exactly ``img_size``; otherwise any multiple of the patch (the
                construction-time windows and shifts are kept; only the shift mask follows the input).
            mlp_ratio: MLP hidden width / dim.
            qkv_bias: learnable q and v biases.
            drop_rate: head dropout.
            proj_drop_rate: dropout after projections.
            attn_drop_rate: attention weight dropout.
            drop_path_rate: stochastic depth rate at the last block (linear over blocks, as timm).
            pretrained_window_sizes: per stage, the window the weights were pre-trained with (0: the stage's
                own), e.g. ``(12, 12, 12, 6)`` for the 192-to-256 / 384 fine-tunes.
            dynamic_img_size: timm's alias of ``strict_img_size=False``.
            features_only: build only the stages needed for ``out_indices``, no final norm and no head.
            out_indices: stage indices returned by a ``features_only`` model (an int n: the last n).
            dtype: compute dtype.
            param_dtype: parameter storage dtype.
            attn_impl: window attention implementation, one of :func:`swin_jax.attention_impls`.
            rngs: NNX RNGs (``params`` for init, ``dropout`` for dropout/drop path).
        """
        if len(pretrained_window_sizes) < len(depths):  # timm reads the first len(depths) entries
            raise ValueError(
                f"pretrained_window_sizes {tuple(pretrained_window_sizes)} needs an entry for each of the "
                f"{len(depths)} stages"
            )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        def make_stage(i: int, **stage: Any) -> SwinTransformerV2Stage:
            return SwinTransformerV2Stage(
                downsample=i > 0,
                always_partition=always_partition,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate,
                pretrained_window_size=to_2tuple(pretrained_window_sizes[i]),
                attn_impl=attn_impl,
                **stage,
                **kw,
            )

        self._build_trunk(make_stage, rngs, **trunk_args(locals()))

    def no_weight_decay(self) -> set[str]:
        """timm names of parameters that take no weight decay: the position bias MLPs and the logit scales."""
        leaves = ("logit_scale", "cpb_mlp.0.weight", "cpb_mlp.0.bias", "cpb_mlp.2.weight")
        return {
            f"layers.{i}.blocks.{j}.attn.{leaf}"
            for i, stage in enumerate(self.layers)
            for j in range(len(stage.blocks))
            for leaf in leaves
        }
