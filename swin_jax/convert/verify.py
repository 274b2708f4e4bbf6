"""``--verify``: run timm on the same source weights and compare it with the converted model at fp32.

timm reads the weights as timm does: its own ``checkpoint_filter_fn`` (original Microsoft layout,
persisted buffers) and a strict ``load_state_dict``, into ``timm.create_model(arch, **model_args)``
with the checkpoint config's ``model_args``. Inputs: a real photo (``skimage.data.chelsea()``
through swin_jax's eval transform) and a seeded random batch of 2.

Swin V1 is compared with timm fp32 at :data:`REL_TOL`. SwinV2 and V2-CR scale cosine logits by up to 100, where fp32
itself is not exact: they are compared with timm in float64, and may be as far from it as twice timm fp32's own
distance (never less than :data:`REL_TOL`), per output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

import swin_jax
from swin_jax import hub
from swin_jax.models.swin_transformer_v2 import relative_coords_table
from swin_jax.models.swin_transformer_v2_cr import relative_coordinates_log
from swin_jax.registry import get_pretrained_cfg

from .sources import Source

__all__ = [
    "REL_TOL",
    "TOP_K",
    "Report",
    "VerifyError",
    "timm_reference",
    "timm_float64",
    "verify_inputs",
    "compare",
    "verify",
]

# max|ours - timm| / max|timm| at fp32: the test suite's tolerance (tests/parity.py FP32_REL_TOL)
REL_TOL = 1e-5
# SwinV2: swin_jax fp32 may be this many times as far from timm float64 as timm fp32 is (tests/parity.py)
FP32_VS_TIMM_FACTOR = 2.0
TOP_K = 5


class VerifyError(Exception):
    """The converted model does not compute what timm computes (exit code 3)."""


@dataclass
class Report:
    """Per output: max abs and max relative difference on the photo and on the random batch; top-k on the photo.

    ``tolerances`` (per row: photo, random) replace :data:`REL_TOL` where the reference is timm in float64.
    """

    rows: list[tuple[str, str, float, float, float, float]]  # name, shape, photo |Δ|, rel, random |Δ|, rel
    top_timm: list[int]
    top_ours: list[int]
    tolerances: list[tuple[float, float]] | None = None
    reference: str = "timm fp32"

    def _tols(self) -> list[tuple[float, float]]:
        return self.tolerances if self.tolerances is not None else [(REL_TOL, REL_TOL)] * len(self.rows)

    @property
    def max_rel(self) -> float:
        return max(max(r[3], r[5]) for r in self.rows)

    @property
    def top_agree(self) -> bool:
        return self.top_timm == self.top_ours

    @property
    def passed(self) -> bool:
        # written so that a NaN anywhere fails
        return all(r[3] <= tp and r[5] <= tr for r, (tp, tr) in zip(self.rows, self._tols())) and self.top_agree

    def table(self) -> str:
        """The comparison as a text table."""
        if self.tolerances is None:
            head = f"verify against {self.reference} (rel = max|Δ| / max|timm|, tolerance {REL_TOL:.0e})"
        else:
            head = (
                f"verify against {self.reference} (rel = max|Δ| / max|timm|; tolerance per output: "
                f"{FP32_VS_TIMM_FACTOR:g}x timm fp32's own rel diff, at least {REL_TOL:.0e})"
            )
        lines = [
            head,
            f"{'output':<12}{'shape':>14}{'photo max|Δ|':>15}{'photo rel':>12}{'random max|Δ|':>15}{'random rel':>12}"
            + ("" if self.tolerances is None else f"{'photo tol':>12}{'random tol':>12}"),
        ]
        for (name, shape, pa, pr, ra, rr), (tp, tr) in zip(self.rows, self._tols()):
            line = f"{name:<12}{shape:>14}{pa:>15.3e}{pr:>12.3e}{ra:>15.3e}{rr:>12.3e}"
            lines.append(line + ("" if self.tolerances is None else f"{tp:>12.3e}{tr:>12.3e}"))
        if self.top_timm:
            same = "same" if self.top_agree else "DIFFERENT"
            k = len(self.top_timm)
            lines.append(f"top-{k} on the photo: timm {self.top_timm}, swin_jax {self.top_ours}: {same}")
        verdict = "PASS" if self.passed else "FAIL"
        tol = f"tolerance {REL_TOL:.0e}" if self.tolerances is None else "tolerances above"
        lines.append(f"{verdict}: max rel diff {self.max_rel:.3e} ({tol})")
        return "\n".join(lines)


def _require_dev() -> None:
    """``--verify`` runs timm (torch) on a photo from scikit-image: say what to install when they are missing."""
    import importlib.util

    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except ImportError:
            return False

    missing = [m for m in ("torch", "timm", "skimage") if not installed(m)]
    if missing:
        raise ModuleNotFoundError(
            f"--verify compares with timm and needs torch, timm and scikit-image ({', '.join(missing)} not installed): "
            "pip install 'swin-jax[dev]', or convert without --verify"
        )


def timm_reference(source: Source, model: swin_jax.SwinTransformer) -> Any:
    """timm's model for ``source``'s weights, loaded as timm loads them (strict), in eval mode."""
    _require_dev()
    import importlib

    import timm
    import torch

    arch = model.pretrained_cfg["architecture"]
    ckpt = hub.resolve_checkpoint(source.name, source.pretrained, get_pretrained_cfg(source.name))
    kwargs = {**(ckpt.config.get("model_args") or {}), **source.model_args, "num_classes": model.num_classes}
    tmodel = timm.create_model(arch, pretrained=False, **kwargs).eval()
    checkpoint_filter_fn = importlib.import_module(type(tmodel).__module__).checkpoint_filter_fn  # the family's
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ckpt.items()}
    try:
        tmodel.load_state_dict(checkpoint_filter_fn(state, tmodel), strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise VerifyError(f"timm cannot load {source.text} into {arch}: {detail}") from None
    return tmodel


def timm_float64(tmodel: Any) -> Any:
    """A float64 copy of a timm model: the reference where fp32 is not exact.

    timm computes SwinV2's ``relative_coords_table`` and V2-CR's ``relative_coordinates_log`` buffers in float32
    whatever the model's dtype; the copy gets the same formulas in float64 (swin_jax's, equal to timm's float32
    tables within one float32 ulp, as the tests check), so it is the exact function that timm's float32 model
    approximates.
    """
    import copy

    import torch

    t64 = copy.deepcopy(tmodel).double().eval()
    for module in t64.modules():
        if getattr(module, "relative_coords_table", None) is not None:
            table = relative_coords_table(tuple(module.window_size), tuple(module.pretrained_window_size))
            module.relative_coords_table = torch.from_numpy(np.array(table))[None]
        if getattr(module, "relative_coordinates_log", None) is not None:
            table = relative_coordinates_log(tuple(module.window_size))
            module.relative_coordinates_log = torch.from_numpy(np.array(table))
    return t64


def verify_inputs(model: swin_jax.SwinTransformer, seed: int = 0) -> np.ndarray:
    """NHWC float32 ``[3, H, W, 3]``: the photo (preprocessed for ``model``), then 2 random images ~ N(0, 1)."""
    from PIL import Image
    from skimage.data import chelsea

    transform = swin_jax.create_transform(**swin_jax.resolve_data_config(model))
    photo = transform(Image.fromarray(chelsea()))[None]
    noise = np.random.default_rng(seed).standard_normal((2, *photo.shape[1:])).astype(np.float32)
    return np.concatenate([photo, noise])


@jax.jit
def _jax_run(model: swin_jax.SwinTransformer, x: jax.Array) -> dict[str, jax.Array]:
    final, maps = model.forward_intermediates(x)  # final: after the final norm, what forward_features returns
    return {
        "logits": model.forward_head(final),
        **{f"stage{i}": m for i, m in enumerate(maps)},
        "pre_logits": model.forward_head(final, pre_logits=True),
    }


def _timm_outputs(tmodel: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        feats = tmodel.forward_features(xt)
        maps = tmodel.forward_intermediates(xt, intermediates_only=True)
        return {
            "logits": tmodel.forward_head(feats).numpy(),
            **{f"stage{i}": m.permute(0, 2, 3, 1).numpy() for i, m in enumerate(maps)},  # NCHW -> NHWC
            "pre_logits": tmodel.forward_head(feats, pre_logits=True).numpy(),
        }


def _diff(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("nan"), float("nan")
    err = float(np.abs(ours - ref).max())
    return err, err / max(float(np.abs(ref).max()), 1e-30)


def compare(model: swin_jax.SwinTransformer, tmodel: Any, x: np.ndarray) -> Report:
    """Compare swin_jax and timm on ``x`` (the photo first, then random images); see :class:`Report`. A SwinV2 or
    V2-CR model is compared with timm in float64, within twice timm fp32's own distance from it (module docstring)."""
    ours = jax.tree_util.tree_map(np.asarray, _jax_run(model, x))
    ref32 = _timm_outputs(tmodel, x)
    cosine = isinstance(model, (swin_jax.SwinTransformerV2, swin_jax.SwinTransformerV2Cr))
    ref = _timm_outputs(timm_float64(tmodel), x.astype(np.float64)) if cosine else ref32
    rows, tolerances = [], []
    for name in ref:
        if name not in ours:
            rows.append((name, "missing", *(float("nan"),) * 4))
            tolerances.append((REL_TOL, REL_TOL))
            continue
        shape = "x".join(map(str, ref[name].shape[1:]))
        rows.append((name, shape, *_diff(ours[name][:1], ref[name][:1]), *_diff(ours[name][1:], ref[name][1:])))
        timm_own = (_diff(ref32[name][:1], ref[name][:1])[1], _diff(ref32[name][1:], ref[name][1:])[1])
        tolerances.append(tuple(max(FP32_VS_TIMM_FACTOR * e, REL_TOL) for e in timm_own))
    k = min(TOP_K, model.num_classes)
    top_timm = [int(i) for i in np.argsort(-ref["logits"][0], kind="stable")[:k]]
    top_ours = [int(i) for i in np.argsort(-ours["logits"][0], kind="stable")[:k]]
    if not cosine:
        return Report(rows, top_timm, top_ours)
    return Report(rows, top_timm, top_ours, tolerances=tolerances, reference="timm float64")


def verify(model: swin_jax.SwinTransformer, source: Source) -> Report:
    """Build timm's model for ``source`` and compare ``model`` with it (see the module docstring)."""
    return compare(model, timm_reference(source, model), verify_inputs(model))
