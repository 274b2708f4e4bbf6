"""``--verify``: run timm on the same source weights and compare it with the converted model at fp32.

timm reads the weights as timm does: its own ``checkpoint_filter_fn`` (original Microsoft layout,
persisted buffers) and a strict ``load_state_dict``, into ``timm.create_model(arch, **model_args)``
with the checkpoint config's ``model_args``. Inputs: a real photo (``skimage.data.chelsea()``
through swin_jax's eval transform) and a seeded random batch of 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

import swin_jax
from swin_jax import hub
from swin_jax.registry import get_pretrained_cfg

from .sources import Source

__all__ = ["REL_TOL", "TOP_K", "Report", "VerifyError", "timm_reference", "verify_inputs", "compare", "verify"]

# max|ours - timm| / max|timm| at fp32: the test suite's tolerance (tests/parity.py FP32_REL_TOL)
REL_TOL = 1e-5
TOP_K = 5


class VerifyError(Exception):
    """The converted model does not compute what timm computes (exit code 3)."""


@dataclass
class Report:
    """Per output: max abs and max relative difference on the photo and on the random batch; top-k on the photo."""

    rows: list[tuple[str, str, float, float, float, float]]  # name, shape, photo |Δ|, rel, random |Δ|, rel
    top_timm: list[int]
    top_ours: list[int]

    @property
    def max_rel(self) -> float:
        return max(max(r[3], r[5]) for r in self.rows)

    @property
    def top_agree(self) -> bool:
        return self.top_timm == self.top_ours

    @property
    def passed(self) -> bool:
        # written so that a NaN anywhere fails
        return all(r[3] <= REL_TOL and r[5] <= REL_TOL for r in self.rows) and self.top_agree

    def table(self) -> str:
        """The comparison as a text table."""
        lines = [
            f"verify against timm at fp32 (rel = max|Δ| / max|timm|, tolerance {REL_TOL:.0e})",
            f"{'output':<12}{'shape':>14}{'photo max|Δ|':>15}{'photo rel':>12}{'random max|Δ|':>15}{'random rel':>12}",
        ]
        for name, shape, pa, pr, ra, rr in self.rows:
            lines.append(f"{name:<12}{shape:>14}{pa:>15.3e}{pr:>12.3e}{ra:>15.3e}{rr:>12.3e}")
        if self.top_timm:
            same = "same" if self.top_agree else "DIFFERENT"
            k = len(self.top_timm)
            lines.append(f"top-{k} on the photo: timm {self.top_timm}, swin_jax {self.top_ours}: {same}")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict}: max rel diff {self.max_rel:.3e} (tolerance {REL_TOL:.0e})")
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
    import timm
    import torch
    from timm.models.swin_transformer import checkpoint_filter_fn

    arch = model.pretrained_cfg["architecture"]
    ckpt = hub.resolve_checkpoint(source.name, source.pretrained, get_pretrained_cfg(source.name))
    kwargs = {**(ckpt.config.get("model_args") or {}), **source.model_args, "num_classes": model.num_classes}
    tmodel = timm.create_model(arch, pretrained=False, **kwargs).eval()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in ckpt.items()}
    try:
        tmodel.load_state_dict(checkpoint_filter_fn(state, tmodel), strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise VerifyError(f"timm cannot load {source.text} into {arch}: {detail}") from None
    return tmodel


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
    """Compare swin_jax and timm on ``x`` (the photo first, then random images); see :class:`Report`."""
    ours, ref = jax.tree_util.tree_map(np.asarray, _jax_run(model, x)), _timm_outputs(tmodel, x)
    rows = []
    for name in ref:
        if name not in ours:
            rows.append((name, "missing", *(float("nan"),) * 4))
            continue
        shape = "x".join(map(str, ref[name].shape[1:]))
        rows.append((name, shape, *_diff(ours[name][:1], ref[name][:1]), *_diff(ours[name][1:], ref[name][1:])))
    k = min(TOP_K, model.num_classes)
    top_timm = [int(i) for i in np.argsort(-ref["logits"][0], kind="stable")[:k]]
    top_ours = [int(i) for i in np.argsort(-ours["logits"][0], kind="stable")[:k]]
    return Report(rows, top_timm, top_ours)


def verify(model: swin_jax.SwinTransformer, source: Source) -> Report:
    """Build timm's model for ``source`` and compare ``model`` with it (see the module docstring)."""
    return compare(model, timm_reference(source, model), verify_inputs(model))
