"""``--verify``: run timm on the same source weights and compare it with the converted model at fp32.

timm reads the weights as timm does: its own ``checkpoint_filter_fn`` (original Microsoft layout,
persisted buffers) and a strict ``load_state_dict``, into ``timm.create_model(arch, **model_args)``
with the checkpoint config's ``model_args``. Inputs: a real photo (``skimage.data.chelsea()``
through swin_jax's eval transform) and a seeded random batch of 2.

Swin V1 is compared with timm fp32 at :data:`REL_TOL`. SwinV2 and V2-CR scale cosine logits by up to 100, where fp32
itself is not exact: they are compared with timm in float64. On the photo and on the random batch apart, swin_jax's
root-mean-square error (:func:`rms_rel_err`, largest over the outputs) may be twice timm fp32's (never less than
:data:`REL_TOL`), and no element may be off by more than :data:`FP32_MAX_REL_TOL`. The largest single deviation is not
the judge there: it is a heavy-tailed draw (a row whose largest logits nearly tie), which on the tests' SwinV2 scattered
from 0.3x to 4.1x timm fp32's for the same function, with the CPU's rounding deciding.
"""

from __future__ import annotations

import contextlib
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
    "timm_outputs",
    "rms_rel_err",
    "verify_inputs",
    "compare",
    "verify",
]

# max|ours - timm| / max|timm| at fp32: the test suite's tolerance (tests/parity.py FP32_REL_TOL)
REL_TOL = 1e-5
# SwinV2: swin_jax fp32's root-mean-square error against timm float64 may be this many times timm fp32's (the tests
# use it too, tests/parity.py)
FP32_VS_TIMM_FACTOR = 2.0
# SwinV2: no element further than this from timm float64, relative to the output's largest value: a coarse guard next
# to the root-mean-square criterion (timm fp32's own worst element measured 5e-6 to 3e-5 on the tests' SwinV2 inputs
# and up to 9.5e-5 on SwinV2-CR's; the tests use it too)
FP32_MAX_REL_TOL = 1e-3
TOP_K = 5


class VerifyError(Exception):
    """The converted model does not compute what timm computes (exit code 3)."""


@dataclass
class Report:
    """Per output: max abs and max relative difference on the photo and on the random batch; top-k on the photo.

    Where the reference is timm in float64 (SwinV2, V2-CR), ``rms`` holds each output's root-mean-square relative
    error (photo, random) and ``rms_bounds`` the bound on their largest (photo, random); see the module docstring.
    """

    rows: list[tuple[str, str, float, float, float, float]]  # name, shape, photo |Δ|, rel, random |Δ|, rel
    top_timm: list[int]
    top_ours: list[int]
    rms: list[tuple[float, float]] | None = None
    rms_bounds: tuple[float, float] | None = None
    reference: str = "timm fp32"

    @property
    def max_rel(self) -> float:
        return max(max(r[3], r[5]) for r in self.rows)

    @property
    def top_agree(self) -> bool:
        return self.top_timm == self.top_ours

    @property
    def passed(self) -> bool:
        # written so that a NaN anywhere fails
        if self.rms is None:
            return all(r[3] <= REL_TOL and r[5] <= REL_TOL for r in self.rows) and self.top_agree
        within = all(rp <= self.rms_bounds[0] and rr <= self.rms_bounds[1] for rp, rr in self.rms)
        guard = all(r[3] <= FP32_MAX_REL_TOL and r[5] <= FP32_MAX_REL_TOL for r in self.rows)
        return within and guard and self.top_agree

    def table(self) -> str:
        """The comparison as a text table."""
        if self.rms is None:
            head = f"verify against {self.reference} (rel = max|Δ| / max|timm|, tolerance {REL_TOL:.0e})"
        else:
            head = (
                f"verify against {self.reference} (rel = max|Δ| / max|timm|, at most {FP32_MAX_REL_TOL:.0e}; "
                f"rms = ||Δ|| / ||timm||, largest over the outputs at most {FP32_VS_TIMM_FACTOR:g}x timm fp32's, "
                f"at least {REL_TOL:.0e}: photo {self.rms_bounds[0]:.3e}, random {self.rms_bounds[1]:.3e})"
            )
        lines = [
            head,
            f"{'output':<12}{'shape':>14}{'photo max|Δ|':>15}{'photo rel':>12}{'random max|Δ|':>15}{'random rel':>12}"
            + ("" if self.rms is None else f"{'photo rms':>12}{'random rms':>12}"),
        ]
        for i, (name, shape, pa, pr, ra, rr) in enumerate(self.rows):
            line = f"{name:<12}{shape:>14}{pa:>15.3e}{pr:>12.3e}{ra:>15.3e}{rr:>12.3e}"
            lines.append(line + ("" if self.rms is None else f"{self.rms[i][0]:>12.3e}{self.rms[i][1]:>12.3e}"))
        if self.top_timm:
            same = "same" if self.top_agree else "DIFFERENT"
            k = len(self.top_timm)
            lines.append(f"top-{k} on the photo: timm {self.top_timm}, swin_jax {self.top_ours}: {same}")
        verdict = "PASS" if self.passed else "FAIL"
        if self.rms is None:
            lines.append(f"{verdict}: max rel diff {self.max_rel:.3e} (tolerance {REL_TOL:.0e})")
        else:
            worst = max(max(r) for r in self.rms)
            lines.append(f"{verdict}: largest rms {worst:.3e}, max rel diff {self.max_rel:.3e} (bounds above)")
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


def timm_outputs(tmodel: Any, x: np.ndarray, device: str = "cpu", bf16: bool = False) -> dict[str, Any]:
    """timm's logits, ``forward_features`` (NHWC), pre-logits and stage maps (NHWC, a list) for NHWC input ``x``,
    computed on torch device ``device`` (optionally under bf16 autocast) and returned as numpy arrays in ``x``'s
    precision: float64 for float64 input (a :func:`timm_float64` model), else float32."""
    import torch
    from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr

    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
        feats = tmodel.forward_features(xt)
        maps = tmodel.forward_intermediates(xt, intermediates_only=True)  # NCHW
        out = dict(
            logits=tmodel.forward_head(feats),
            features=feats.permute(0, 2, 3, 1) if isinstance(tmodel, SwinTransformerV2Cr) else feats,  # V2-CR: NCHW
            pre_logits=tmodel.forward_head(feats, pre_logits=True),
            maps=[m.permute(0, 2, 3, 1) for m in maps],
        )
    wide = torch.float64 if x.dtype == np.float64 else torch.float32

    def host(t: Any) -> np.ndarray:
        return t.to(wide).cpu().numpy()

    return {k: [host(m) for m in v] if k == "maps" else host(v) for k, v in out.items()}


def _timm_run(tmodel: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    """:func:`timm_outputs` in :func:`_jax_run`'s form."""
    out = timm_outputs(tmodel, x)
    return {
        "logits": out["logits"],
        **{f"stage{i}": m for i, m in enumerate(out["maps"])},
        "pre_logits": out["pre_logits"],
    }


def rms_rel_err(ours: Any, ref: Any) -> float:
    """``||ours - ref|| / ||ref||``: the root-mean-square error relative to the root mean square of ``ref``."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("nan")
    return float(np.sqrt(np.sum((ours - ref) ** 2) / max(float(np.sum(ref**2)), 1e-300)))


def _diff(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        return float("nan"), float("nan")
    err = float(np.abs(ours - ref).max())
    return err, err / max(float(np.abs(ref).max()), 1e-30)


def compare(model: swin_jax.SwinTransformer, tmodel: Any, x: np.ndarray) -> Report:
    """Compare swin_jax and timm on ``x`` (the photo first, then random images); see :class:`Report`. A SwinV2 or
    V2-CR model is compared with timm in float64 by root-mean-square error, against timm fp32's own (module
    docstring)."""
    ours = jax.tree_util.tree_map(np.asarray, _jax_run(model, x))
    ref32 = _timm_run(tmodel, x)
    cosine = isinstance(model, (swin_jax.SwinTransformerV2, swin_jax.SwinTransformerV2Cr))
    ref = _timm_run(timm_float64(tmodel), x.astype(np.float64)) if cosine else ref32
    parts = (slice(0, 1), slice(1, None))  # the photo, the random batch
    rows, rms, timm_rms = [], [], []
    for name in ref:
        if name not in ours:
            rows.append((name, "missing", *(float("nan"),) * 4))
            rms.append((float("nan"), float("nan")))
            continue
        shape = "x".join(map(str, ref[name].shape[1:]))
        rows.append((name, shape, *(d for p in parts for d in _diff(ours[name][p], ref[name][p]))))
        rms.append(tuple(rms_rel_err(ours[name][p], ref[name][p]) for p in parts))
        timm_rms.append(tuple(rms_rel_err(ref32[name][p], ref[name][p]) for p in parts))
    k = min(TOP_K, model.num_classes)
    top_timm = [int(i) for i in np.argsort(-ref["logits"][0], kind="stable")[:k]]
    top_ours = [int(i) for i in np.argsort(-ours["logits"][0], kind="stable")[:k]]
    if not cosine:
        return Report(rows, top_timm, top_ours)
    bounds = tuple(max(FP32_VS_TIMM_FACTOR * max((t[i] for t in timm_rms), default=0.0), REL_TOL) for i in range(2))
    return Report(rows, top_timm, top_ours, rms=rms, rms_bounds=bounds, reference="timm float64")


def verify(model: swin_jax.SwinTransformer, source: Source) -> Report:
    """Build timm's model for ``source`` and compare ``model`` with it (see the module docstring)."""
    return compare(model, timm_reference(source, model), verify_inputs(model))
