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
==============================  ===========================  =====================================

timm's non-persistent buffers (``relative_position_index``, ``attn_mask``) are ignored; this library
computes them from the window geometry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
    "is_ignored_timm_key",
]

# timm buffers that are never loaded (recomputed from the window geometry)
IGNORED_BUFFERS = ("relative_position_index", "attn_mask")


def _identity(a: np.ndarray) -> np.ndarray:
    return a


# leaf name, ndim -> (timm leaf name, flax->timm, timm->flax)
_RULES: dict[tuple[str, int | None], tuple[str, Callable, Callable]] = {
    ("kernel", 2): ("weight", lambda a: a.T, lambda a: a.T),
    ("kernel", 4): ("weight", lambda a: a.transpose(3, 2, 0, 1), lambda a: a.transpose(2, 3, 1, 0)),
    ("scale", None): ("weight", _identity, _identity),
    ("bias", None): ("bias", _identity, _identity),
    ("relative_position_bias_table", None): ("relative_position_bias_table", _identity, _identity),
}


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
        leaf = str(path[-1])
        timm_leaf, _, _ = _rule(leaf, len(var.shape))
        name = ".".join(str(p) for p in path[:-1]) + "." + timm_leaf
        entries[name] = (path, var)
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
        if parts[0] == "layers" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) >= len(model.layers):
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
        model: a :class:`swin_jax.model.SwinTransformer` (or any module following timm's names).
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
        updates.append((path, var.replace(jnp.asarray(from_timm(value), dtype=var.dtype))))
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
        out[name] = np.ascontiguousarray(to_timm(np.asarray(var[...])))
    return out
