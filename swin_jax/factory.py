"""``create_model``: timm's ``create_model`` for the Swin family, returning an NNX module, and pretrained loading
(:func:`load_pretrained`: a checkpoint read by :mod:`swin_jax.hub`, adapted as timm does, into an abstract model)."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from . import models
from .hub import HF_HUB_PREFIX, CheckpointError, FreshHeadWarning, resolve_checkpoint
from .models._base import SwinBase, check_output_fmt
from .registry import ARCH_FAMILY, ARCHITECTURES, get_arch_config, get_pretrained_cfg, split_model_name
from .weights import WeightMismatchError, filter_timm_checkpoint, load_timm_state_dict, timm_param_shapes

__all__ = ["create_model", "build_model", "build_abstract_model", "load_pretrained"]

DEFAULT_OUT_INDICES = (0, 1, 2, 3)

# model kwargs a caller may override (**arch_overrides), besides create_model's own arguments
_OWN = {"img_size", "in_chans", "num_classes", "global_pool", "window_size", "strict_img_size"}
_OWN |= {"drop_path_rate", "features_only", "out_indices", "dtype", "param_dtype", "rngs"}

# arguments that shape the weights or the function (recorded in a checkpoint's config.json as timm's "model_args")
_WEIGHT_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depths", "num_heads", "head_dim", "window_size")
_WEIGHT_ARGS += ("always_partition", "mlp_ratio", "qkv_bias", "pretrained_window_sizes")
_WEIGHT_ARGS += ("window_ratio", "extra_norm_period", "extra_norm_stage")


def model_class(arch: str) -> type[SwinBase]:
    """The model class of a registered architecture."""
    return getattr(models, ARCH_FAMILY[split_model_name(arch)[0]])


def _signature(arch: str) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(model_class(arch).__init__).parameters


def overridable_args(arch: str) -> tuple[str, ...]:
    """The model kwargs ``create_model(arch, **overrides)`` accepts besides its own arguments."""
    return tuple(sorted(set(_signature(arch)) - _OWN - {"self"}))


# every family's overridable kwargs (what a checkpoint's config.json or --model-args may set)
ARCH_OVERRIDES = tuple(sorted({key for arch in ARCHITECTURES for key in overridable_args(arch)}))


def _canonical(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_canonical(v) for v in value)
    return value


def model_args_of(arch: str, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The weight-shaping arguments of ``model_kwargs`` that differ from the architecture's defaults."""
    base = ARCHITECTURES[arch]
    signature = _signature(arch)
    out = {}
    for key in _WEIGHT_ARGS:
        if key not in signature:
            continue
        default = base.get(key, signature[key].default)
        value = model_kwargs.get(key, default)
        if key == "img_size":
            value, default = _canonical((value, value) if isinstance(value, int) else value), (default, default)
        if _canonical(value) != _canonical(default):
            out[key] = _canonical(value)
    return out


def build_model(arch: str, model_kwargs: Mapping[str, Any], seed: int | nnx.Rngs = 0) -> SwinBase:
    """A randomly initialized model of ``arch``'s family from its kwargs."""
    rngs = seed if isinstance(seed, nnx.Rngs) else nnx.Rngs(seed)
    return model_class(arch)(**model_kwargs, rngs=rngs)


def build_abstract_model(arch: str, model_kwargs: Mapping[str, Any], seed: int = 0) -> SwinBase:
    """The model with every parameter abstract (``jax.ShapeDtypeStruct``): nothing is initialized.

    Its non-parameter state (RNG streams of dropout / drop path, if any rate is non-zero) is made
    concrete: computed under ``jax.jit``, where XLA drops the unused parameter initialization.
    Fill the parameters with :func:`swin_jax.load_timm_state_dict`.
    """
    model = nnx.eval_shape(lambda: build_model(arch, model_kwargs, seed))
    if jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.Param))):
        rest = jax.jit(lambda: nnx.state(build_model(arch, model_kwargs, seed), nnx.Not(nnx.Param)))()
        nnx.update(model, rest)
    return model


def resolve_model_kwargs(
    name: str, options: Mapping[str, Any], arch_overrides: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model kwargs, pretrained cfg)`` for a model name and create_model's arguments.

    Args:
        name: ``arch`` or ``arch.tag``.
        options: create_model's own model arguments (``num_classes``, ``img_size``, ...) as given;
            None for ``num_classes`` / ``img_size`` / ``window_size`` means the tag's / arch's.
        arch_overrides: other model arguments.
    """
    arch, tag = split_model_name(name)
    allowed = overridable_args(arch)
    unknown = sorted(set(arch_overrides) - set(allowed))
    if unknown:
        raise TypeError(
            f"create_model() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"{model_class(arch).__name__} overrides are: {', '.join(allowed)}"
        )
    pretrained_cfg = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    kwargs = get_arch_config(arch)
    kwargs.update(arch_overrides)
    kwargs.update({k: v for k, v in options.items() if v is not None})
    num_classes = options.get("num_classes")
    kwargs["num_classes"] = pretrained_cfg["num_classes"] if num_classes is None else int(num_classes)
    out_indices = kwargs.get("out_indices", DEFAULT_OUT_INDICES)
    if not isinstance(out_indices, int):
        out_indices = tuple(out_indices)
        if out_indices == DEFAULT_OUT_INDICES:  # the default means every stage, as timm (len(depths) of them)
            out_indices = tuple(range(len(kwargs["depths"])))
    kwargs["out_indices"] = out_indices
    return kwargs, pretrained_cfg


def _checkpoint_arch_args(arch: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture arguments a checkpoint's config.json records (timm's ``model_args``, ours ``model_kwargs``)."""
    args = dict(config.get("model_args") or {})
    args.update(config.get("model_kwargs") or {})
    keep = set(overridable_args(arch)) | {"img_size", "window_size", "in_chans"}
    args = {k: v for k, v in args.items() if k in keep}
    for key, value in args.items():
        if isinstance(value, list):
            args[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return args


def load_pretrained(
    name: str,
    pretrained: bool | str | os.PathLike,
    model_kwargs: dict[str, Any],
    pretrained_cfg: dict[str, Any],
    *,
    num_classes: int | None,
    explicit: set[str],
    seed: int = 0,
) -> nnx.Module:
    """Build the model abstractly and fill it from a checkpoint, adapting it as timm does.

    Args:
        name: the requested model name (``arch`` or ``arch.tag``).
        pretrained: the source (see module docstring).
        model_kwargs: model kwargs resolved by create_model.
        pretrained_cfg: the registry's pretrained cfg for the name.
        num_classes: the caller's ``num_classes`` (None: take the checkpoint's).
        explicit: names of the kwargs the caller passed explicitly (a checkpoint's config won't override them).
        seed: seed of the RNG streams (dropout) and of a fresh head.

    A different ``img_size`` / ``window_size`` resizes the relative position tables; a different
    ``num_classes`` leaves a fresh head (with a warning); ``num_classes=0`` / ``features_only`` drop it.
    """
    arch = pretrained_cfg["architecture"]
    ckpt = resolve_checkpoint(name, pretrained, pretrained_cfg)
    config = ckpt.config
    ckpt_arch = config.get("architecture")
    if ckpt_arch and ckpt_arch != arch:
        raise CheckpointError(
            f"{ckpt.source} holds weights for {ckpt_arch!r}, not {arch!r}: create the model as "
            f"create_model({ckpt_arch!r}, pretrained=...)"
        )
    for key, value in _checkpoint_arch_args(arch, config).items():
        if key not in explicit:
            model_kwargs[key] = value  # create_model records the final kwargs as model.model_args
    kwargs = model_kwargs
    head_w = ckpt.get("head.fc.weight", ckpt.get("head.weight"))
    weights_classes = 0 if head_w is None else int(head_w.shape[0])
    if "num_classes" in config and int(config["num_classes"]) != weights_classes:
        raise CheckpointError(
            f"{ckpt.source} is inconsistent: its config.json says num_classes={config['num_classes']}, its "
            f"classifier has {weights_classes} classes"
        )
    if num_classes is None:
        kwargs["num_classes"] = weights_classes  # a headless checkpoint gives a headless model, never a random head
    model = build_abstract_model(arch, kwargs, seed)
    state = filter_timm_checkpoint(ckpt, model)
    fresh_head = False
    if model.head is not None and model.head.fc is not None:
        have = state.get("head.fc.weight")
        if have is None or have.shape[0] != model.num_classes:
            got = "no classifier" if have is None else f"{have.shape[0]} classes"
            warnings.warn(
                f"{ckpt.source} has {got}, the model has num_classes={model.num_classes}: the classifier "
                f"(head.fc) is freshly initialized, for fine-tuning",
                FreshHeadWarning,
                stacklevel=3,
            )
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            fresh_head = True
    try:
        if fresh_head:
            model.reset_classifier(model.num_classes, rngs=nnx.Rngs(seed))
            _, unexpected = load_timm_state_dict(model, state, strict=False)
            missing = [k for k in timm_param_shapes(model) if k not in state and not k.startswith("head.fc.")]
            if missing or unexpected:
                raise WeightMismatchError(missing, unexpected, [])
        else:
            load_timm_state_dict(model, state, strict=True)
    except WeightMismatchError as e:
        raise CheckpointError(f"{ckpt.source} does not fit {name}: {e}") from None
    cfg = dict(pretrained_cfg)
    ckpt_cfg = config.get("pretrained_cfg") or {}
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in ckpt_cfg.items()})
    cfg["architecture"] = arch
    cfg["num_classes"] = model.num_classes
    if pretrained is not True:  # record where the weights came from, as timm does
        for key in ("hf_hub_id", "url", "file"):
            cfg.pop(key, None)
        source = str(pretrained)
        if source.startswith(HF_HUB_PREFIX):
            cfg["hf_hub_id"] = source[len(HF_HUB_PREFIX) :]
        else:
            cfg["file"] = ckpt.source
    model.pretrained_cfg = cfg
    return model


def create_model(
    name: str,
    *,
    pretrained: bool | str = False,
    num_classes: int | None = None,
    in_chans: int = 3,
    img_size: int | Sequence[int] | None = None,
    window_size: Any = None,
    global_pool: str = "avg",
    strict_img_size: bool = True,
    drop_path_rate: float = 0.0,
    features_only: bool = False,
    out_indices: int | Sequence[int] = DEFAULT_OUT_INDICES,
    output_fmt: str = "NHWC",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
    **arch_overrides: Any,
) -> SwinBase:
    """Create a Swin Transformer (V1, V2 or V2-CR) by name, with timm's ``create_model`` semantics.

    Args:
        name: architecture (``'swin_base_patch4_window7_224'``), optionally with a pretrained tag
            (``'swin_base_patch4_window7_224.ms_in22k_ft_in1k'``). See :func:`swin_jax.list_models`.
        pretrained: False for random init; True for the tag's (or the default tag's) Hub weights;
            ``'hf-hub:org/repo'``; or a local path (timm Hub-layout directory, a ``.safetensors`` /
            ``.bin`` / ``.pth`` file, or a Flax checkpoint written by ``swin-jax convert``).
        num_classes: classifier classes; the tag's count if None; 0 for no classifier.
        in_chans: input channels.
        img_size: input size ``H`` or ``(H, W)``; the architecture's if None.
        window_size: window size (int, ``(h, w)`` or one per stage); the architecture's if None.
        global_pool: 'avg', 'max', 'avgmax', 'catavgmax' or '' (no pooling: per-position logits).
        strict_img_size: require inputs of exactly ``img_size``.
        drop_path_rate: stochastic depth rate (active only in train mode).
        features_only: return a model whose call gives the list of NHWC stage maps.
        out_indices: stages returned by a ``features_only`` model: indices (negative from the end), or an
            int n for the last n stages. The default means every stage, as timm.
        output_fmt: layout of a ``features_only`` model's maps: ``'NHWC'`` (the JAX layout, the default) or
            ``'NCHW'`` (timm's).
        dtype: compute dtype (e.g. ``jnp.bfloat16``).
        param_dtype: parameter dtype.
        rngs: NNX RNGs for initialization and dropout; ``nnx.Rngs(0)`` if None.
        **arch_overrides: other arguments of the family's model class (``embed_dim``, ``depths``, ``num_heads``,
            ``mlp_ratio``, ``drop_rate``, ...).

    Returns:
        A :class:`swin_jax.SwinTransformer` (``swin_*``), :class:`swin_jax.SwinTransformerV2` (``swinv2_*``) or
        :class:`swin_jax.SwinTransformerV2Cr` (``swinv2_cr_*``) in eval mode, with ``pretrained_cfg`` set.

    Raises:
        ValueError: unknown model name or tag (with close matches), bad configuration.
        TypeError: an unknown keyword argument.
    """
    options = {k: v for k, v in locals().items() if k in _OWN and k != "rngs"}
    check_output_fmt(output_fmt)
    kwargs, pretrained_cfg = resolve_model_kwargs(name, options, arch_overrides)
    if pretrained is not False and pretrained is not None:
        # what the caller set wins over a checkpoint's config.json (in_chans=3, the default, does not count)
        explicit = set(arch_overrides) | {k for k, v in (("img_size", img_size), ("window_size", window_size)) if v}
        explicit |= {"in_chans"} if in_chans != 3 else set()
        seed = 0 if rngs is None else int(jax.random.randint(rngs.params(), (), 0, 2**31 - 1))
        model = load_pretrained(
            name, pretrained, kwargs, pretrained_cfg, num_classes=num_classes, explicit=explicit, seed=seed
        )
    else:
        model = build_model(split_model_name(name)[0], kwargs, rngs if rngs is not None else nnx.Rngs(0))
        model.pretrained_cfg = pretrained_cfg
    model.model_args = model_args_of(model.pretrained_cfg["architecture"], kwargs)
    model.output_fmt = output_fmt
    return model
