"""Serving export: the model as one StableHLO artifact (``jax.export``) with its weights inside.

The artifact's only input is the NHWC float32 image batch (preprocessed as :func:`swin_jax.create_transform`
does). Loading it needs jax alone, no flax, no swin_jax, no model code::

    import jax
    exported = jax.export.deserialize(open("model.jaxexport", "rb").read())
    logits = exported.call(images)  # images: float32 [B, H, W, 3], any B with a symbolic batch

:func:`export_model` returns the ``jax.export.Exported``; :func:`save_export` writes ``model.jaxexport`` and a
``config.json`` that says how to feed it (input size, mean / std, interpolation, crop_pct, classes, platforms,
versions), atomically. ``python -m swin_jax export`` is the command for both.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from . import attention
from .hub import write_directory

__all__ = ["DEFAULT_PLATFORMS", "EXPORT_FILE", "EXPORT_CONFIG", "ExportError", "export_model", "save_export"]

DEFAULT_PLATFORMS = ("cpu", "cuda", "tpu")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
EXPORT_FILE = "model.jaxexport"
EXPORT_CONFIG = "config.json"
METHODS = ("__call__", "forward_features")


class ExportError(ValueError):
    """An export that cannot be done as asked (unknown platform or method, bad batch size, existing output)."""


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    if isinstance(platforms, str):
        platforms = (platforms,)
    platforms = tuple(p.strip().lower() for p in platforms)
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        raise ExportError(f"unknown platform(s) {unknown or platforms!r}; expected some of {', '.join(PLATFORMS)}")
    if len(set(platforms)) != len(platforms):
        raise ExportError(f"platforms listed twice: {platforms!r}")
    return platforms


# Pallas on CUDA lowers to a Triton kernel, a custom call jax.export gives no compatibility guarantee for: the
# artifact runs with a jaxlib close to the one that exported it. jax >= 0.11 names the call's target (its value "is
# not guaranteed to be stable"); before that, this name was the only one.
_TRITON_CALL = "__gpu$xla.gpu.triton"


def _triton_call() -> str:
    from jax.experimental.pallas import triton as pl_triton

    return getattr(pl_triton, "CUSTOM_CALL_TARGET_NAME", _TRITON_CALL)


def _has_cuda() -> bool:
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def _lowering_platform(model: nnx.Module, platforms: tuple[str, ...]) -> str:
    """The platform attention is traced for. A kernel (Pallas, or cuDNN on CUDA) lowers for one platform only,
    and jax.export cannot put per-platform kernels in one multi-platform artifact: refuse that clearly."""
    impl = getattr(model, "attn_impl", "auto")
    picks = {p: attention.resolve(impl, p) for p in platforms}
    bound = [p for p, pick in picks.items() if pick.startswith("pallas") or (pick == "cudnn" and p == "cuda")]
    if len(platforms) > 1 and (bound or len(set(picks.values())) > 1):
        raise ExportError(
            f"attn_impl={impl!r} lowers a platform-specific kernel ({', '.join(bound) or 'different picks'}), and "
            "kernels lowered for one platform cannot share a multi-platform artifact; export one platform at a "
            f"time (platforms=['{bound[0] if bound else platforms[0]}']), or set attn_impl='einsum' or 'xla' "
            "(model.set_attn_impl) for one artifact that runs everywhere"
        )
    if "cuda" in bound and picks["cuda"] == "cudnn" and not _has_cuda():
        raise ExportError(
            "attn_impl='cudnn' lowers cuDNN attention, and jax lowers that only where cuDNN is present: export for "
            "CUDA on a GPU machine, or set attn_impl='xla' or 'pallas' (model.set_attn_impl)"
        )
    return platforms[0]


def export_model(
    model: nnx.Module,
    *,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    batch_size: int | None = None,
    method: str = "__call__",
) -> jax.export.Exported:
    """Lower ``model`` (weights embedded as constants) to a serializable ``jax.export.Exported``.

    Args:
        model: a swin_jax model (fp32 or bf16 compute), exported in eval mode; a ``features_only`` model returns its
            list of stage maps.
        platforms: the platforms the artifact runs on; lowering for them needs no such device here (except cuDNN
            attention, whose lowering needs cuDNN). A model whose ``attn_impl`` lowers a kernel (``'pallas'`` and
            ``'pallas_fused'``; ``'cudnn'`` on CUDA) exports for one platform at a time; a Pallas kernel for CUDA is
            Triton code, which jax does not promise to run on later jaxlib versions.
        batch_size: a fixed batch size, or None for a symbolic batch dimension (one artifact for any batch).
        method: ``"__call__"`` (logits; stage maps for ``features_only``) or ``"forward_features"``.

    Returns:
        The ``Exported``: ``.call(images)`` runs it, ``.serialize()`` gives the bytes to ship. Its only input is a
        float32 ``[B, H, W, in_chans]`` batch at the model's input size.
    """
    platforms = _check_platforms(platforms)
    if method not in METHODS:
        raise ExportError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "forward_features" and getattr(model, "features_only", False):
        raise ExportError("a features_only model has no forward_features: export its __call__ (the stage maps)")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ExportError(f"batch_size must be a positive int or None (symbolic), got {batch_size!r}")
    target = _lowering_platform(model, platforms)
    graphdef, state = nnx.split(model)

    def serve(images: jax.Array) -> Any:
        module = nnx.merge(graphdef, state)  # state: closed over, so the weights are embedded as constants
        module.eval()  # serving is inference: no dropout / drop path, whatever mode the model was left in
        return getattr(module, method)(images)

    (batch,) = jax.export.symbolic_shape("batch") if batch_size is None else (batch_size,)
    h, w = model.img_size
    spec = jax.ShapeDtypeStruct((batch, h, w, model.in_chans), jnp.float32)
    checks = [jax.export.DisabledSafetyCheck.custom_call(_triton_call())] if target == "cuda" else []
    with attention.lowering_for(target):
        return jax.export.export(jax.jit(serve), platforms=platforms, disabled_checks=checks)(spec)


def _config(model: nnx.Module, exported: jax.export.Exported, name: str, method: str) -> dict[str, Any]:
    from . import __version__
    from .data import resolve_data_config

    data = resolve_data_config(model)
    (aval,) = exported.in_avals
    batch = aval.shape[0]
    return {
        "model": name,
        "method": method,
        "input_shape": ["batch" if not isinstance(batch, int) else batch, *aval.shape[1:]],
        "input_dtype": "float32",
        "layout": "NHWC",
        "input_size": list(data["input_size"]),
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "interpolation": data["interpolation"],
        "crop_pct": data["crop_pct"],
        "crop_mode": data.get("crop_mode", "center"),
        "num_classes": int(model.num_classes),
        "features_only": bool(getattr(model, "features_only", False)),
        "compute_dtype": jnp.dtype(model.dtype).name,
        "attn_impl": getattr(model, "attn_impl", "auto"),
        "platforms": list(exported.platforms),
        "swin_jax_version": __version__,
        "jax_version": jax.__version__,
        "load": "jax.export.deserialize(open('model.jaxexport', 'rb').read()).call(images)",
    }


def save_export(
    model: nnx.Module,
    output_dir: str | os.PathLike,
    *,
    name: str,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    batch_size: int | None = None,
    method: str = "__call__",
    force: bool = False,
) -> Path:
    """Export ``model`` and write ``OUTPUT_DIR/model.jaxexport`` and ``OUTPUT_DIR/config.json``.

    The directory appears complete or not at all: both files are written to a temporary sibling that is renamed
    into place. An existing ``output_dir`` is refused unless ``force`` (then it is replaced).

    Args:
        model: the model (see :func:`export_model`).
        output_dir: the directory to create.
        name: the model name recorded in config.json (``arch`` or ``arch.tag``).
        platforms, batch_size, method: as :func:`export_model`.
        force: replace an existing ``output_dir``.

    Returns:
        ``output_dir`` as a resolved path.
    """
    out = Path(output_dir).expanduser().resolve()
    if out.exists() and not force:
        raise ExportError(f"{out} exists; choose another directory or pass force=True (--force) to replace it")
    exported = export_model(model, platforms=platforms, batch_size=batch_size, method=method)
    blob = exported.serialize()
    config = _config(model, exported, name, method)

    def write(tmp: Path) -> None:
        (tmp / EXPORT_FILE).write_bytes(blob)
        (tmp / EXPORT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    write_directory(out, write)
    return out
