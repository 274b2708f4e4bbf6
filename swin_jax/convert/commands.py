"""The two conversions. Each reads with ``swin_jax.create_model(pretrained=...)`` and writes with
``swin_jax.hub.save_pretrained`` (a temporary directory renamed into place): on any failure,
including a failed ``--verify``, nothing is left behind."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

import swin_jax
from swin_jax import hub
from swin_jax.weights import to_flax_state_dict

from .sources import Source, infer_architecture, read_config, resolve_source
from .verify import Report, VerifyError, _require_dev, verify

__all__ = ["timm_to_flax", "flax_to_timm", "check_output_dir"]


def check_output_dir(output_dir: str | Path, force: bool) -> Path:
    """Refuse an existing OUTPUT_DIR unless ``force`` (and anything there that is not a directory)."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists: pass --force to replace it")
    return path


def _wrong_arch_hint(source: Source) -> str:
    """For local weights that do not fit ``--model``: which architecture they do fit, if one."""
    path = source.local_path
    if path is None:
        return ""
    try:
        arch = infer_architecture(hub.read_checkpoint(path), source.model_args, source.text)
    except (hub.CheckpointError, ValueError):
        return ""
    return f"\nthese weights fit {arch}: pass --model {arch}" if arch != source.arch else ""


def _load(source: Source) -> swin_jax.SwinTransformer:
    """The swin_jax model filled from the source. A conversion never invents weights: swin_jax's warning
    that it initialized a fresh classifier (a config.json contradicting the weights) is an error here."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", category=hub.FreshHeadWarning)
            return swin_jax.create_model(
                source.name, pretrained=source.pretrained, num_classes=source.num_classes, **source.model_args
            )
    except hub.FreshHeadWarning as e:
        raise hub.CheckpointError(f"{e}\nrefused: a conversion does not write random weights") from None
    except hub.CheckpointError as e:
        raise hub.CheckpointError(f"{e}{_wrong_arch_hint(source)}") from None


def _same_params(a: swin_jax.SwinTransformer, b: swin_jax.SwinTransformer) -> bool:
    sa, sb = to_flax_state_dict(a), to_flax_state_dict(b)
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


def timm_to_flax(
    source: str,
    output_dir: str | Path,
    *,
    model: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    verify_with_timm: bool = False,
    force: bool = False,
) -> tuple[Path, Report | None]:
    """Convert SOURCE (see :mod:`swin_jax.convert.sources`) to a Flax checkpoint in ``output_dir``.

    With ``verify_with_timm``, the converted model is compared with timm before anything is written
    (:class:`VerifyError` if it differs), and the written checkpoint is read back and checked bit-exact.
    """
    output = check_output_dir(output_dir, force)
    if verify_with_timm:
        _require_dev()  # before the (slow) load: say at once what --verify needs
    src = resolve_source(source, model, model_args)
    flax_model = _load(src)
    report = None
    if verify_with_timm:
        report = verify(flax_model, src)
        print(report.table(), flush=True)
        if not report.passed:
            raise VerifyError("the converted model differs from timm (see the table above); nothing was written")
    written = hub.save_pretrained(flax_model, output, fmt="flax", force=force)
    if verify_with_timm and not _same_params(flax_model, swin_jax.create_model(src.arch, pretrained=str(written))):
        shutil.rmtree(written, ignore_errors=True)
        raise VerifyError(f"{written} does not read back bit-exact; it was removed")
    return written, report


def flax_to_timm(flax_dir: str | Path, output_dir: str | Path, *, force: bool = False) -> Path:
    """Convert a Flax checkpoint directory to timm's Hub layout (``config.json`` + ``model.safetensors``)."""
    output = check_output_dir(output_dir, force)
    path = Path(flax_dir).expanduser()
    if not path.is_dir():
        raise hub.CheckpointError(f"no such directory: {path}")
    if not (path / hub.FLAX_WEIGHTS_NAME).is_file():
        raise hub.CheckpointError(
            f"{path} is not a Flax checkpoint (no {hub.FLAX_WEIGHTS_NAME}); write one with "
            f"swin-jax convert timm-to-flax SOURCE {path}"
        )
    arch = read_config(path / hub.CONFIG_NAME).get("architecture")
    if not arch:
        raise hub.CheckpointError(f"{path / hub.CONFIG_NAME} does not name the architecture")
    written = hub.save_pretrained(swin_jax.create_model(arch, pretrained=str(path)), output, fmt="timm", force=force)
    return written
