"""The model-level API every Swin family shares, as timm's Swin models have it: the trunk (patch embedding,
stages, final norm, classifier head), input checks, ``forward_features`` / ``forward_head`` /
``forward_intermediates``, ``features_only``, head management, gradient checkpointing and the attention
implementation switch. A family supplies its stages."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import attention
from ..weights import resample_patch_embed
from ._layers import ClassifierHead, LayerNorm, PatchEmbed, _check_pool_type
from ._windows import (
    Pair,
    calc_stage_window_sizes,
    feature_take_indices,
    resolve_stage_window_sizes,
    resolve_window_args,
    to_2tuple,
)

__all__ = ["SwinBase", "trunk_args", "OUTPUT_FMTS", "check_output_fmt"]

OUTPUT_FMTS = ("NHWC", "NCHW")


def check_output_fmt(output_fmt: str) -> str:
    """``output_fmt`` if it is ``'NHWC'`` or ``'NCHW'``, else a ValueError."""
    if output_fmt not in OUTPUT_FMTS:
        raise ValueError(f"output_fmt must be one of {OUTPUT_FMTS}, got {output_fmt!r}")
    return output_fmt


# the constructor arguments every family passes on to SwinBase._build_trunk
TRUNK_ARGS = (
    "img_size",
    "patch_size",
    "in_chans",
    "num_classes",
    "global_pool",
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "strict_img_size",
    "dynamic_img_size",
    "drop_rate",
    "drop_path_rate",
    "features_only",
    "out_indices",
    "dtype",
    "param_dtype",
    "attn_impl",
)


def trunk_args(arguments: dict[str, Any]) -> dict[str, Any]:
    """The shared constructor arguments out of a family constructor's ``locals()``."""
    return {name: arguments[name] for name in TRUNK_ARGS}


def _reduction(patch_size: tuple[int, int], stage: int) -> int:
    """A stage's feature stride, as timm's ``feature_info`` gives it: the patch size times 2 per patch merging."""
    return max(patch_size) * 2**stage


class SwinBase(nnx.Module):
    """Base of the Swin models: NHWC in and out, the stages in ``self.layers`` (``self.stages`` for SwinV2-CR, as timm
    names them; :attr:`stage_modules` either way), each with ``blocks``, each block with ``attn``. Subclasses build
    themselves with :meth:`_build_trunk`."""

    # the attribute holding the stages (timm's name: the parameters' prefix)
    stages_attr: str = "layers"
    # floor inputs that are not a multiple of the patch (SwinV2-CR's stem does); others refuse them
    floor_input_to_patch: bool = False
    # builds the classifier's fc (None: timm's Swin init, trunc_normal(.02) weight and zero bias)
    head_linear: Callable[..., nnx.Linear] | None = None

    @property
    def stage_modules(self) -> nnx.List:
        """The stages, in order (``self.layers``, or ``self.stages`` for SwinV2-CR)."""
        return getattr(self, self.stages_attr)

    def _build_trunk(
        self,
        make_stage: Callable[..., nnx.Module],
        rngs: nnx.Rngs,
        *,
        img_size: int | Pair,
        patch_size: int,
        in_chans: int,
        num_classes: int,
        global_pool: str,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: Any,
        strict_img_size: bool,
        dynamic_img_size: bool,
        drop_rate: float,
        drop_path_rate: float,
        features_only: bool,
        out_indices: int | Sequence[int],
        dtype: Any,
        param_dtype: Any,
        attn_impl: str,
        final_norm: bool = True,
    ) -> None:
        """Set the shared attributes and build patch embedding, stages, final norm and head.

        ``make_stage(i, dim=, out_dim=, input_resolution=, depth=, num_heads=, window_size=, drop_path=)`` builds
        stage ``i`` (stage 0 does not downsample; the others halve the resolution first). Without ``final_norm``
        (SwinV2-CR, whose last block ends with a norm) ``self.norm`` is None.
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
        self.output_fmt = "NHWC"  # of a features_only model's maps (create_model(..., output_fmt=))
        self.embed_dim = embed_dim
        self.num_layers = num_layers
        self.num_features = int(embed_dim * 2 ** (num_layers - 1))
        dims = [int(embed_dim * 2**i) for i in range(num_layers)]
        self.window_sizes = resolve_stage_window_sizes(window_size, num_layers)
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        # set_input_size scales these with the patch grid (timm's _ref_window_sizes / _ref_grid_size)
        self.ref_window_sizes, self.ref_grid_size = self.window_sizes, self.grid_size

        # stage-wise split of a linear drop path schedule over all blocks, as timm
        rates = np.linspace(0.0, drop_path_rate, sum(depths), dtype=np.float32)
        dpr = [rates[sum(depths[:i]) : sum(depths[: i + 1])].tolist() for i in range(num_layers)]

        self.feature_info = [
            dict(num_chs=dims[i], reduction=_reduction(self.patch_size, i), module=f"{self.stages_attr}.{i}")
            for i in range(num_layers)
        ]
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
            resolution = ((self.grid_size[0] + scale - 1) // scale, (self.grid_size[1] + scale - 1) // scale)
            layers.append(
                make_stage(
                    i,
                    dim=in_dim,
                    out_dim=dims[i],
                    input_resolution=resolution,
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=self.window_sizes[i],
                    drop_path=dpr[i],
                )
            )
            in_dim = dims[i]
            if i > 0:
                scale *= 2
        setattr(self, self.stages_attr, nnx.List(layers))
        if features_only:
            self.norm = None
            self.head = None
        else:
            norm = LayerNorm(self.num_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if final_norm else None
            self.norm = norm
            self.head = ClassifierHead(self.num_features, num_classes, global_pool, drop_rate, self.head_linear, **kw)
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
        elif (h % self.patch_size[0] or w % self.patch_size[1]) and not self.floor_input_to_patch:
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
        output_fmt: str = "NHWC",
        intermediates_only: bool = False,
    ) -> list[jax.Array] | tuple[jax.Array, list[jax.Array]]:
        """Forward returning the stage maps (timm's ``forward_intermediates``; NHWC by default, the JAX layout).

        Args:
            x: ``[B, H, W, C]`` images.
            indices: stages to take: None = all, int n = last n, or a sequence of indices.
            norm: apply the final norm to the last stage's map when it is taken.
            stop_early: stop after the last stage taken.
            output_fmt: layout of the maps, ``'NHWC'`` or ``'NCHW'`` (timm's default there).
            intermediates_only: return only the list of maps.

        Returns:
            The list of maps, or ``(final_features, maps)`` where ``final_features`` (NHWC) has the final
            norm applied if the last stage ran.
        """
        output_fmt = check_output_fmt(output_fmt)
        x = self._check_input(x)
        take, last = feature_take_indices(len(self.stage_modules), indices)
        stages = self.stage_modules[: last + 1] if stop_early else self.stage_modules
        num_stages = self.num_layers
        maps = []
        i = 0
        x = self.patch_embed(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                m = self.norm(x) if (norm and i == num_stages - 1 and self.norm is not None) else x
                maps.append(m.transpose(0, 3, 1, 2) if output_fmt == "NCHW" else m)
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
        for stage in self.stage_modules:
            x = stage(x)
        return x if self.norm is None else self.norm(x)

    def forward_head(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        """Pool (and classify unless ``pre_logits``) the output of :meth:`forward_features`."""
        if self.head is None:
            raise ValueError("a features_only model has no head")
        return self.head(x, pre_logits=pre_logits)

    def __call__(self, x: jax.Array) -> jax.Array | list[jax.Array]:
        """Logits ``[B, num_classes]`` (pooled features when ``num_classes == 0``); for a
        ``features_only`` model, the list of stage maps picked by ``out_indices``, in ``self.output_fmt`` (NHWC
        unless created with ``output_fmt='NCHW'``)."""
        if self.features_only:
            return self.forward_intermediates(x, self.out_indices, output_fmt=self.output_fmt, intermediates_only=True)
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
            self.num_features,
            num_classes,
            pool,
            drop_rate,
            self.head_linear,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            rngs=rngs,
        )
        self.head.drop.deterministic = deterministic  # keep the model's train/eval mode
        self.num_classes = num_classes
        self.global_pool = pool
        self.head_hidden_size = self.head.num_features

    def set_attn_impl(self, attn_impl: str) -> None:
        """Switch every block to another attention implementation (:func:`swin_jax.attention_impls`).
        Weights are untouched; the next trace of the model uses it."""
        self.attn_impl = attention.check_attn_impl(attn_impl)
        for stage in self.stage_modules:
            for block in stage.blocks:
                block.attn.attn_impl = attn_impl

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (``nnx.remat``), as timm's method of
        the same name: less memory for training, about one extra forward of compute. The parameter
        tree (and so the timm mapping) is unchanged.

        On XLA:CPU ``nnx.remat`` saves nothing: the compiled program merges the recomputation with the forward's
        identical computation and keeps the forward's activations after all (Swin-T's fp32 training step at batch
        8: 897 MB of temporaries without it, 901 MB with it; jax 0.10.2). So in :func:`swin_jax.models.reverse_mode`
        traces (``TrainStep``, ``train_step``) the blocks use a derivative rule of their own that
        recomputes them in a form XLA cannot merge (``_layers._remat_block``): 478 MB for that step."""
        for stage in self.stage_modules:
            stage.grad_checkpointing = enable

    def set_scan_blocks(self, enable: bool = True) -> None:
        """Run each stage's repeated pairs of blocks as one ``lax.scan`` over their stacked parameters
        (:func:`swin_jax.models._layers.run_blocks`): the compiled program holds one pair of blocks per stage
        instead of all of them. On the CPU that did not compile Swin-B's training step faster, and the step ran 10%
        slower (BENCHMARKS.md), so it is off by default; the GPU check measures it there. The same function (drop
        path masks included); the parameter tree, and so the timm mapping and checkpoints, are unchanged."""
        for stage in self.stage_modules:
            stage.scan_blocks = enable

    def _resample_patch_embed(self, patch: tuple[int, int]) -> None:
        """The stem for patch size ``patch``: timm's resampled kernel (OIHW <-> our HWIO), stride = kernel."""
        conv = self.patch_embed.proj
        kernel = np.asarray(conv.kernel[...])
        resampled = resample_patch_embed(kernel.transpose(3, 2, 0, 1), patch).transpose(2, 3, 1, 0)
        conv.kernel = nnx.Param(jnp.asarray(resampled, kernel.dtype))
        conv.kernel_size = conv.strides = patch
        conv.kernel_shape = resampled.shape
        self.patch_embed.patch_size = self.patch_size = patch
        for i, info in enumerate(self.feature_info):
            info["reduction"] = _reduction(patch, i)

    def set_input_size(
        self,
        img_size: int | Pair | None = None,
        patch_size: int | Pair | None = None,
        window_size: Any = None,
        window_ratio: int | Sequence[int] | None = None,
        always_partition: bool | None = None,
    ) -> None:
        """A new input size and windows, in place, as timm 1.0.31's ``set_input_size``.

        With neither ``window_size`` nor ``window_ratio``, each stage's window scales with the patch grid (the window
        to grid ratio is kept; at the current size nothing changes). Swin V1's relative position bias tables are
        resized as timm resizes them; SwinV2's bias MLP takes the new window as it is. ``model_args`` records the
        new ``img_size`` / ``window_size`` / ``always_partition``, so a saved checkpoint reloads as this model.

        Args:
            img_size: new input size ``H`` or ``(H, W)``; the current one if None.
            patch_size: a new patch size ``P`` or ``(Ph, Pw)``: the patch embedding's kernel is resampled as timm's
                ``resample_patch_embed`` does (:func:`swin_jax.weights.resample_patch_embed`).
            window_size: an int or ``(h, w)`` for every stage, or one per stage; overrides ``window_ratio``.
            window_ratio: divisor of the new patch grid (before stage downsampling), one for all stages or one per
                stage (a sequence of two is two stages).
            always_partition: always partition and shift, even where a window covers the map; unchanged if None.
        """
        num_stages = len(self.stage_modules)
        sizes, ratios = resolve_window_args(window_size, window_ratio, num_stages)  # before anything changes
        new_patch = None if patch_size is None else tuple(int(p) for p in to_2tuple(patch_size))
        if new_patch is not None and (len(new_patch) != 2 or min(new_patch) < 1):
            raise ValueError(f"patch_size must be a positive int or (h, w), got {patch_size!r}")
        new_img = self.img_size if img_size is None else to_2tuple(img_size)
        patch = new_patch or self.patch_size
        if any(s < p for s, p in zip(new_img, patch)):
            raise ValueError(f"patch size {patch} is larger than the input size {new_img}")
        if new_patch is not None and new_patch != self.patch_size:
            self._resample_patch_embed(new_patch)
        if img_size is not None or new_patch is not None:
            self.img_size = new_img
            self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        window_sizes = calc_stage_window_sizes(
            self.grid_size, self.ref_window_sizes[:num_stages], self.ref_grid_size, sizes, ratios
        )
        if sizes is not None or ratios is not None:  # explicit windows become the reference for later resizes
            self.ref_window_sizes, self.ref_grid_size = window_sizes, self.grid_size
        for index, stage in enumerate(self.stage_modules):
            scale = 2 ** max(index - 1, 0)
            feat = tuple((g + scale - 1) // scale for g in self.grid_size)
            stage.set_input_size(feat, window_sizes[index], always_partition)
        self.window_sizes = window_sizes
        args = dict(getattr(self, "model_args", None) or {})
        args.update(img_size=self.img_size, window_size=window_sizes)
        if new_patch is not None:
            args["patch_size"] = self.patch_size
        if always_partition is not None:
            args["always_partition"] = always_partition
        self.model_args = args
