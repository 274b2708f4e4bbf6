"""The timm <-> Flax NNX weight mapping: numpy in, numpy out, no torch.

The NNX attribute tree mirrors timm's module names, so a parameter's timm name is its NNX path joined
with dots, and only the layout differs. The whole mapping is this table of rules on the leaf:

==============================  ===========================  =====================================
NNX leaf                        timm leaf                    layout
==============================  ===========================  =====================================
``kernel`` (2-D, Linear)        ``weight``                   ``[in, out]`` <-> ``[out, in]``
``kernel`` (4-D, Conv)          ``weight``                   HWIO <-> OIHW
``scale`` (LayerNorm)           ``weight``                   same
``bias``                        ``bias``                     same
``relative_position_bias_table`` same                        same
``logit_scale`` (V2, V2-CR)     same                         same (``[heads, 1, 1]``; V2-CR ``[heads]``)
``q_bias``, ``v_bias`` (V2)     same                         same
==============================  ===========================  =====================================

timm's non-persistent buffers (``relative_position_index``, ``attn_mask``, V2's ``relative_coords_table``
and ``k_bias``, V2-CR's ``relative_coordinates_log``) are ignored; this library computes them from the window
geometry. V2-CR's stages are ``stages.{i}`` where V1 and V2 have ``layers.{i}``: the names are the tree's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "WeightMismatchError",
    "LoadResult",
    "timm_param_shapes",
    "load_timm_state_dict",
    "to_timm_state_dict",
    "to_flax_state_dict",
    "flax_to_timm_state_dict",
    "is_ignored_timm_key",
    "timm_name",
    "filter_timm_checkpoint",
    "resize_rel_pos_bias_table",
    "resample_patch_embed",
    "adapt_input_conv",
]

# timm buffers that are never loaded (recomputed from the window geometry)
IGNORED_BUFFERS = (
    "relative_position_index",
    "attn_mask",
    "relative_coords_table",
    "k_bias",
    "relative_coordinates_log",
)


def _identity(a: np.ndarray) -> np.ndarray:
    return a


# leaf name, ndim -> (timm leaf name, flax->timm, timm->flax)
_RULES: dict[tuple[str, int | None], tuple[str, Callable, Callable]] = {
    ("kernel", 2): ("weight", lambda a: a.T, lambda a: a.T),
    ("kernel", 4): ("weight", lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0)),
    ("scale", None): ("weight", _identity, _identity),
    ("bias", None): ("bias", _identity, _identity),
    ("relative_position_bias_table", None): ("relative_position_bias_table", _identity, _identity),
    ("logit_scale", None): ("logit_scale", _identity, _identity),
    ("q_bias", None): ("q_bias", _identity, _identity),
    ("v_bias", None): ("v_bias", _identity, _identity),
}


# NNX leaf name -> timm leaf name (the naming half of the table; the layout depends on ndim, the name does not)
_TIMM_LEAF = {leaf: rule[0] for (leaf, _), rule in _RULES.items()}


def timm_name(path: Sequence[Any]) -> str:
    """A parameter's NNX path (``('layers', 0, ..., 'qkv', 'kernel')``) -> its timm name (``layers.0...qkv.weight``)."""
    *module, leaf = (str(p) for p in path)
    return ".".join([*module, _TIMM_LEAF.get(leaf, leaf)])


def _rule(leaf: str, ndim: int) -> tuple[str, Callable, Callable]:
    rule = _RULES.get((leaf, ndim)) or _RULES.get((leaf, None))
    if rule is None:
        raise NotImplementedError(f"no timm layout rule for a {ndim}-D NNX parameter {leaf!r}")
    return rule


def _timm_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    _, to_timm, _ = _rule(leaf, len(shape))
    return to_timm(np.empty(shape, np.bool_)).shape


class WeightMismatchError(ValueError):
    """A state dict does not fit the model. Lists every missing, unexpected and misshaped key at once."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = ["the state dict does not match the model:"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s): " + ", ".join(unexpected))
        if mismatched:
            lines.append(
                f"  {len(mismatched)} key(s) with the wrong shape: "
                + ", ".join(
                    f"{k} (checkpoint {tuple(got)}, model expects {tuple(want)})" for k, got, want in mismatched
                )
            )
        super().__init__("\n".join(lines))


class LoadResult(NamedTuple):
    """Keys that were not loaded (only non-empty with ``strict=False``), like torch's result."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _param_entries(model: nnx.Module) -> dict[str, tuple[tuple, Any]]:
    """timm name -> (NNX path, Param variable) for every parameter of the model (abstract or not)."""
    entries = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        _rule(str(path[-1]), len(var.shape))  # every parameter must have a layout rule
        entries[timm_name(path)] = (path, var)
    return entries


def timm_param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """timm parameter name -> timm-layout shape for every parameter of ``model``."""
    return {name: _timm_shape(tuple(var.shape), str(path[-1])) for name, (path, var) in _param_entries(model).items()}


def is_ignored_timm_key(model: nnx.Module, key: str) -> bool:
    """Whether a timm checkpoint key is dropped for this model rather than loaded.

    Non-persistent buffers always are; like timm when it builds such models from a full checkpoint,
    a head-less model (``num_classes=0``) drops ``head.*``, and a ``features_only`` model also drops
    the final ``norm.*`` and the stages it does not build.
    """
    if any(b in key for b in IGNORED_BUFFERS):
        return True
    head = getattr(model, "head", None)
    if key.startswith("head.") and (head is None or head.fc is None):
        return True
    if getattr(model, "features_only", False):
        if key.startswith("norm."):
            return True
        parts = key.split(".")
        stages = model.stage_modules
        if parts[0] == model.stages_attr and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= len(stages):
            return True
    return False


def _to_numpy(value: Any) -> np.ndarray:
    """Anything with ``__array__`` (numpy, jax, torch tensors, ...) -> numpy, without importing torch."""
    try:
        return np.asarray(value)
    except (TypeError, RuntimeError):
        # e.g. a torch bfloat16 tensor (numpy has no bfloat16) or a tensor that requires grad
        if hasattr(value, "detach") and hasattr(value, "float"):
            return np.asarray(value.detach().float())
        raise


def load_timm_state_dict(model: nnx.Module, state_dict: Mapping[str, Any], strict: bool = True) -> LoadResult:
    """Fill ``model`` in place from a timm state dict (timm parameter names -> arrays).

    Works on a concrete model or on an abstract one from ``nnx.eval_shape`` (nothing is initialized
    twice). Values are converted to the model's parameter dtype.

    Args:
        model: a :class:`swin_jax.SwinTransformer` (or any module following timm's names).
        state_dict: timm names -> arrays (numpy, jax, or anything with ``__array__`` such as torch tensors).
        strict: raise if any key is missing or unexpected. Shape mismatches always raise.

    Returns:
        :class:`LoadResult` with the keys that were missing / unexpected (empty when ``strict``).

    Raises:
        WeightMismatchError: listing every missing, unexpected and misshaped key in one message.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of timm names to arrays, got {type(state_dict).__name__}")
    entries = _param_entries(model)
    given = {k: v for k, v in state_dict.items() if not is_ignored_timm_key(model, k)}
    missing = [k for k in entries if k not in given]
    unexpected = [k for k in given if k not in entries]
    mismatched, updates = [], []
    for name, (path, var) in entries.items():
        if name not in given:
            continue
        value = _to_numpy(given[name])
        want = _timm_shape(tuple(var.shape), str(path[-1]))
        if tuple(value.shape) != want:
            mismatched.append((name, tuple(value.shape), want))
            continue
        _, _, from_timm = _rule(str(path[-1]), value.ndim)
        # a copy: the model must not share memory with the caller's arrays (e.g. a timm model trained on)
        updates.append((path, var.replace(jnp.array(from_timm(value), dtype=var.dtype))))
    if mismatched or (strict and (missing or unexpected)):
        raise WeightMismatchError(missing if strict else [], unexpected if strict else [], mismatched)
    nnx.update(model, nnx.from_flat_state(updates))
    return LoadResult(missing, unexpected)


def to_timm_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters as a timm state dict of numpy arrays (timm names and layouts).

    ``timm.create_model(arch).load_state_dict({k: torch.from_numpy(v) ...}, strict=True)`` accepts it,
    and the round trip is bit-exact.
    """
    out = {}
    for name, (path, var) in _param_entries(model).items():
        _, to_timm, _ = _rule(str(path[-1]), len(var.shape))
        out[name] = np.array(to_timm(np.asarray(var[...])), order="C")  # a writable copy (torch.from_numpy)
    return out


# ----------------------------------------------------------------------------------------------------------
# Flax layout (NNX paths and layouts), as the converter writes it
# ----------------------------------------------------------------------------------------------------------


def to_flax_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's parameters in Flax layout: dotted NNX paths (``...attn.qkv.kernel``) -> numpy arrays."""
    return {
        ".".join(str(p) for p in path): np.asarray(var[...])
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def flax_to_timm_state_dict(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax-layout names and arrays (see :func:`to_flax_state_dict`) -> timm names and layouts."""
    out = {}
    for key, value in flat.items():
        value = _to_numpy(value)
        prefix, _, leaf = key.rpartition(".")
        timm_leaf, to_timm, _ = _rule(leaf, value.ndim)
        out[f"{prefix}.{timm_leaf}"] = np.ascontiguousarray(to_timm(value))
    return out


# ----------------------------------------------------------------------------------------------------------
# Checkpoint adaptation (ports of timm's checkpoint_filter_fn and load_pretrained steps, numpy only)
# ----------------------------------------------------------------------------------------------------------


def _geometric_positions(src: int, dst: int) -> list[float]:
    """timm's source positions for a table of ``src`` entries stretched over ``dst`` (geometric spacing)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        gp = (1.0 - q ** (src // 2)) / (1.0 - q)
        if gp > dst // 2:
            right = q
        else:
            left = q
    dis, cur = [], 1.0
    for i in range(src // 2):
        dis.append(cur)
        cur += q ** (i + 1)
    return [-d for d in reversed(dis)] + [0.0] + dis


def _interp_linear(points: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """1-D pieces of timm's RegularGridInterpolator: left/right indices and distances for ``x``."""
    idx_right = np.searchsorted(points, x, side="left")
    idx_right = np.minimum(idx_right, len(points) - 1)
    idx_left = np.clip(idx_right - 1, 0, len(points) - 1)
    dist_left = np.maximum(x - points[idx_left], 0.0)
    dist_right = np.maximum(points[idx_right] - x, 0.0)
    both_zero = (dist_left == 0) & (dist_right == 0)
    dist_left = np.where(both_zero, 1.0, dist_left).astype(np.float32)
    dist_right = np.where(both_zero, 1.0, dist_right).astype(np.float32)
    return idx_left, idx_right, dist_left, dist_right


def resize_rel_pos_bias_table(
    table: np.ndarray, new_window_size: tuple[int, int], old_window_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Resize a flat relative position bias table ``[(2h-1)(2w-1), heads]`` to a new window size.

    A numpy port of timm's ``resize_rel_pos_bias_table`` (its default, scipy-free path): the source
    table is placed on geometrically spaced positions and sampled with (bi)linear interpolation on the
    target's integer offsets, per head, in float32.

    Args:
        table: the source table.
        new_window_size: target window ``(h, w)``.
        old_window_size: the source window; inferred (square, or the target's shape) when None, as timm.

    Returns:
        The resized table ``[(2h'-1)(2w'-1), heads]`` in the source dtype.
    """
    table = _to_numpy(table)
    dst = (2 * new_window_size[0] - 1, 2 * new_window_size[1] - 1)
    num_pos, num_heads = table.shape
    if old_window_size is not None:
        src = (2 * old_window_size[0] - 1, 2 * old_window_size[1] - 1)
    else:
        side = int(num_pos**0.5)
        if side * side == num_pos:
            src = (side, side)
        elif num_pos == dst[0] * dst[1]:
            src = dst
        else:
            raise ValueError(
                f"cannot infer the window of a relative position table with {num_pos} entries; pass old_window_size"
            )
    if src == dst:
        return table
    ys = np.asarray(_geometric_positions(src[0], dst[0]), np.float32)
    xs = np.asarray(_geometric_positions(src[1], dst[1]), np.float32)
    ty, tx = dst[0] // 2, dst[1] // 2
    dy = np.arange(-ty, ty + 0.1, 1.0, dtype=np.float32)
    dx = np.arange(-tx, tx + 0.1, 1.0, dtype=np.float32)
    gy, gx = np.meshgrid(dy, dx, indexing="ij")
    yl, yr, dyl, dyr = _interp_linear(ys, gy)
    xl, xr, dxl, dxr = _interp_linear(xs, gx)
    z = table.astype(np.float32).reshape(src[0], src[1], num_heads)
    # the four corners, each weighted by the distances to the opposite corner (timm's formulation)
    num = (
        z[yl, xl] * (dyr * dxr)[..., None]
        + z[yl, xr] * (dyr * dxl)[..., None]
        + z[yr, xl] * (dyl * dxr)[..., None]
        + z[yr, xr] * (dyl * dxl)[..., None]
    )
    den = ((dyl + dyr) * (dxl + dxr))[..., None]
    return (num / den).reshape(-1, num_heads).astype(table.dtype)


def _bicubic_aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """``[out_size, in_size]``: torch's ``F.interpolate(mode='bicubic', antialias=True, align_corners=False)`` along
    one axis (its separable antialiased kernel: Keys' cubic with a = -0.5, widened by the scale when shrinking,
    each row normalized to sum 1; ATen's ``_compute_weights_aa``), in float32 as torch computes it."""
    scale = np.float32(in_size / out_size)
    support = np.float32(2.0 * scale if scale >= 1.0 else 2.0)
    invscale = np.float32(1.0 / scale if scale >= 1.0 else 1.0)

    def cubic(x: np.ndarray) -> np.ndarray:
        a = np.float32(-0.5)
        x = np.abs(x)
        near = ((a + 2) * x - (a + 3)) * x * x + 1
        far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
        return np.where(x < 1, near, np.where(x < 2, far, np.float32(0))).astype(np.float32)

    out = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        center = scale * np.float32(i + 0.5)
        lo = max(int(center - support + np.float32(0.5)), 0)
        hi = min(int(center + support + np.float32(0.5)), in_size)
        w = cubic((np.arange(lo, hi, dtype=np.float32) - center + np.float32(0.5)) * invscale)
        total = w.sum(dtype=np.float32)
        out[i, lo:hi] = w / total if total != 0 else w
    return out


def resample_patch_embed(weight: np.ndarray, new_size: tuple[int, int]) -> np.ndarray:
    """A patch embedding conv weight (OIHW) for a new patch size, as timm's ``resample_patch_embed`` (FlexiViT): the
    pseudo-inverse of the bicubic antialiased resize of each basis patch, so that an image resized with the patch
    gives the same embedding. Float32, as timm.

    Args:
        weight: ``[out, in, h, w]``.
        new_size: the new patch ``(h', w')``.

    Returns:
        ``[out, in, h', w']`` in ``weight``'s dtype.
    """
    weight = _to_numpy(weight)
    old = tuple(weight.shape[-2:])
    new = (int(new_size[0]), int(new_size[1]))
    if old == new:
        return weight
    # row (y', x') of the resize of basis patch (y, x): the product of the two axes' weights
    resize = np.kron(_bicubic_aa_weights(old[0], new[0]), _bicubic_aa_weights(old[1], new[1]))  # [h'w', hw]
    # singular values below float32 eps x max(shape) of the largest are dropped, as torch.linalg.pinv does on
    # timm's float32 matrix (a resize that shrinks one axis and grows the other is singular)
    cutoff = np.finfo(np.float32).eps * max(resize.shape)
    pinv = np.linalg.pinv(resize.astype(np.float64), rcond=cutoff).astype(np.float32)  # [hw, h'w']
    c_out, c_in = weight.shape[:2]
    out = weight.reshape(c_out, c_in, -1).astype(np.float32) @ pinv
    return out.reshape(c_out, c_in, *new).astype(weight.dtype)


def adapt_input_conv(in_chans: int, conv_weight: np.ndarray) -> np.ndarray:
    """Adapt RGB stem weights (OIHW) to ``in_chans`` inputs as timm does: sum for 1, repeat and rescale else."""
    conv_weight = _to_numpy(conv_weight)
    o, i, kh, kw = conv_weight.shape
    if in_chans == i:
        return conv_weight
    if i != 3:
        raise ValueError(f"cannot adapt a stem with {i} input channels to {in_chans}")
    w = conv_weight.astype(np.float32)
    if in_chans == 1:
        w = w.sum(axis=1, keepdims=True)
    else:
        w = np.tile(w, (1, int(math.ceil(in_chans / 3)), 1, 1))[:, :in_chans] * (3 / float(in_chans))
    return w.astype(conv_weight.dtype)


def _unwrap(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("model", "state_dict"):
        inner = state_dict.get(key)
        if isinstance(inner, Mapping):
            state_dict = inner
    return state_dict


def filter_timm_checkpoint(state_dict: Mapping[str, Any], model: nnx.Module) -> dict[str, np.ndarray]:
    """Bring a timm or original Microsoft Swin (V1, V2) or V2-CR checkpoint to this model, as timm's
    ``checkpoint_filter_fn``.

    * unwraps ``{"model": ...}`` / ``{"state_dict": ...}``;
    * drops the non-persistent buffers (``relative_position_index``, ``attn_mask``, V2's ``relative_coords_table``
      and ``k_bias``, V2-CR's ``relative_coordinates_log``);
    * original Microsoft layout (downsample stored at the end of the previous stage, ``head.`` instead
      of ``head.fc.``) is renamed to timm's;
    * old V2-CR checkpoints: ``tau`` (the paper's temperature) becomes ``logit_scale = ln(1 / tau)``, and ``head.``
      ``head.fc.``;
    * relative position tables are resized to the model's (possibly clipped) window per block;
    * the stem is adapted to the model's ``in_chans``.

    Returns a new dict of numpy arrays under timm names; nothing else is checked here.
    """
    state_dict = _unwrap(state_dict)
    old_layout = "layers.0.downsample.reduction.weight" in state_dict
    old_cr = model.stages_attr == "stages" and "head.fc.weight" not in state_dict
    out = {}
    for key, value in state_dict.items():
        if any(b in key for b in IGNORED_BUFFERS):
            continue
        value = _to_numpy(value)
        if old_layout:
            key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) + 1}.downsample", key)
        if old_layout or old_cr:
            key = key.replace("head.", "head.fc.") if key.startswith("head.") and "head.fc." not in key else key
        if old_cr and key.endswith(".tau"):
            key, value = key[: -len("tau")] + "logit_scale", np.log(1.0 / value).astype(value.dtype)
        match = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table", key)
        if match and value.ndim == 2:
            stage, block = int(match.group(1)), int(match.group(2))
            attn = None
            stages = model.stage_modules
            if stage < len(stages) and block < len(stages[stage].blocks):
                attn = stages[stage].blocks[block].attn
            if getattr(attn, "relative_position_bias_table", None) is not None:  # a V1 table for a V1 model
                want = tuple(attn.relative_position_bias_table.shape)
                if value.shape != want or attn.window_size[0] != attn.window_size[1]:
                    value = resize_rel_pos_bias_table(value, attn.window_size)
        if key == "patch_embed.proj.weight" and value.ndim == 4 and value.shape[1] != model.in_chans:
            value = adapt_input_conv(model.in_chans, value)
        out[key] = value
    return out
