"""Pretrained weights: the Hugging Face Hub (timm's repos), local files and Flax checkpoints.

Data flows one way: file or Hub -> numpy state dict under timm names -> :func:`filter_timm_checkpoint`
-> :func:`load_timm_state_dict` into an abstract model (no parameter is initialized first).

Sources for ``create_model(name, pretrained=...)``:

* ``True``: Hub repo ``timm/<arch>.<tag>`` (the default tag when the name has none), ``model.safetensors``
  read with safetensors' numpy API, ``config.json`` honoured. No torch anywhere on this path.
* ``"hf-hub:org/repo"``: any repo in timm's layout.
* a path: a directory in timm's Hub layout (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), a Flax checkpoint directory written by ``swin-jax convert``
  (``config.json`` + ``flax_model.safetensors``), or one ``.safetensors`` / ``.bin`` / ``.pth`` / ``.pt``
  file. Pickled files need torch and are opened only with ``torch.load(weights_only=True)``.

Downloads use huggingface_hub as is: its cache (``HF_HOME``), ``HF_HUB_OFFLINE`` and progress bar.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from .weights import (
    flax_to_timm_state_dict,
    to_flax_state_dict,
    to_timm_state_dict,
)

__all__ = [
    "CheckpointError",
    "HubUnavailableError",
    "FreshHeadWarning",
    "Checkpoint",
    "read_checkpoint",
    "read_state_dict",
    "download_from_hub",
    "save_pretrained",
    "FLAX_WEIGHTS_NAME",
    "FLAX_FORMAT",
]

HF_HUB_PREFIX = "hf-hub:"
SAFETENSORS_NAME = "model.safetensors"
PYTORCH_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"
FLAX_WEIGHTS_NAME = "flax_model.safetensors"
FLAX_FORMAT = "swin_jax.flax"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model. The message says what and how to fix it."""


class HubUnavailableError(OSError):
    """A file could not be fetched from the Hugging Face Hub (offline, unreachable, or not there).

    ``file_missing`` is True when the Hub answered that the repo has no such file.
    """

    def __init__(self, message: str, file_missing: bool = False):
        super().__init__(message)
        self.file_missing = file_missing


class FreshHeadWarning(UserWarning):
    """The checkpoint's classifier does not fit the model's ``num_classes``: a fresh head was initialized."""


class Checkpoint(dict):
    """A state dict under timm names (numpy arrays) plus the ``config`` that came with it (or {})."""

    def __init__(self, state_dict: Mapping[str, Any], config: Mapping[str, Any] | None, source: str):
        super().__init__(state_dict)
        self.config = dict(config or {})
        self.source = source


# ----------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a pickled PyTorch checkpoint, and reading one needs torch, which is not installed. "
            f"Install it (pip install 'swin-jax[dev]', or torch), or convert the file once where torch is available: "
            f"swin-jax convert timm-to-flax {path} OUTPUT_DIR"
        ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: it is a pickle that carries more than tensors (code or objects), and "
            f"it is only ever opened with torch.load(weights_only=True), which does not execute it. Details: "
            f"{str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    out = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            out[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read one weights file into a dict of numpy arrays (keys as stored).

    ``.safetensors`` via safetensors' numpy API (no torch); ``.bin`` / ``.pth`` / ``.pt`` via
    ``torch.load(weights_only=True)`` (needs torch; a pickle carrying code is refused, never run).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _read_pickle(path)
    raise CheckpointError(
        f"don't know how to read {path}: expected a .safetensors, .bin, .pth or .pt file, or a directory"
    )


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable JSON config: {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} should hold a JSON object, got {type(config).__name__}")
    return config


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a local checkpoint (file, timm Hub-layout directory, or Flax checkpoint directory).

    Returns:
        :class:`Checkpoint`: the state dict under timm names and its config ({} for a bare file).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        config = _read_config(path / CONFIG_NAME) if (path / CONFIG_NAME).is_file() else {}
        if (path / FLAX_WEIGHTS_NAME).is_file():
            flat = _read_safetensors(path / FLAX_WEIGHTS_NAME)
            return Checkpoint(flax_to_timm_state_dict(flat), config, str(path))
        for name in (SAFETENSORS_NAME, PYTORCH_NAME):
            if (path / name).is_file():
                return Checkpoint(read_state_dict(path / name), config, str(path / name))
        raise CheckpointError(
            f"{path} holds no weights: expected {FLAX_WEIGHTS_NAME} (Flax checkpoint), {SAFETENSORS_NAME} or "
            f"{PYTORCH_NAME} (timm Hub layout)"
        )
    if path.is_file():
        return Checkpoint(read_state_dict(path), {}, str(path))
    raise CheckpointError(f"no such file or directory: {path}")


# ----------------------------------------------------------------------------------------------------------
# The Hub
# ----------------------------------------------------------------------------------------------------------


def _hub_error(repo_id: str, filename: str, err: Exception) -> HubUnavailableError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local_hint = (
        "To use a local copy instead, pass its path: create_model(name, pretrained='/path/to/model.safetensors') "
        "or a directory in timm's Hub layout (config.json + model.safetensors)."
    )
    file_missing = False
    if isinstance(err, LocalEntryNotFoundError) or not isinstance(
        err, (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError)
    ):
        why = (
            "the Hub is offline (HF_HUB_OFFLINE=1)"
            if constants.HF_HUB_OFFLINE
            else "the Hugging Face Hub could not be reached"
        )
        msg = (
            f"could not fetch {filename} from Hub repo {repo_id}: {why}, and the file is not in the local cache "
            f"({constants.HF_HUB_CACHE}). {local_hint}"
        )
    elif isinstance(err, GatedRepoError):
        msg = f"Hub repo {repo_id} is gated: log in (huggingface-cli login) with access to it. {local_hint}"
    elif isinstance(err, (RepositoryNotFoundError, RevisionNotFoundError)):
        msg = f"Hub repo {repo_id} does not exist (or is private). {local_hint}"
    else:
        msg = f"Hub repo {repo_id} has no file {filename}. {local_hint}"
        file_missing = True
    detail = str(err).splitlines()[0] if str(err) else ""
    return HubUnavailableError(f"{msg}\n({type(err).__name__}: {detail})", file_missing=file_missing)


def download_from_hub(repo_id: str, filename: str) -> Path:
    """``hf_hub_download`` with errors a person can act on (:class:`HubUnavailableError`)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, library_name="swin_jax"))
    except Exception as e:  # noqa: BLE001 - every failure of the download becomes one clear error
        raise _hub_error(repo_id, filename, e) from None


def read_hub_checkpoint(repo_id: str) -> Checkpoint:
    """``model.safetensors`` (else ``pytorch_model.bin``) and ``config.json`` of a Hub repo in timm's layout."""
    try:
        weights = download_from_hub(repo_id, SAFETENSORS_NAME)
    except HubUnavailableError as e:
        # a repo without safetensors: timm falls back to the pickled file (which needs torch)
        if not e.file_missing:
            raise
        weights = download_from_hub(repo_id, PYTORCH_NAME)
    try:
        config = _read_config(download_from_hub(repo_id, CONFIG_NAME))
    except HubUnavailableError as e:
        if not e.file_missing:
            raise
        config = {}
    return Checkpoint(read_state_dict(weights), config, f"{HF_HUB_PREFIX}{repo_id}")


# ----------------------------------------------------------------------------------------------------------
# create_model(pretrained=...)
# ----------------------------------------------------------------------------------------------------------


def resolve_checkpoint(
    name: str, pretrained: bool | str | os.PathLike, pretrained_cfg: Mapping[str, Any]
) -> Checkpoint:
    """Read the checkpoint ``pretrained`` names for model ``name``."""
    if pretrained is True:
        if not pretrained_cfg.get("hf_hub_id"):
            raise CheckpointError(
                f"{name} has no pretrained weights (tag {pretrained_cfg.get('tag')!r}); the tags with weights are "
                f"listed by swin_jax.list_models({pretrained_cfg.get('architecture', name)!r}, pretrained=True)"
            )
        return read_hub_checkpoint(pretrained_cfg["hf_hub_id"])
    if isinstance(pretrained, str) and pretrained.startswith(HF_HUB_PREFIX):
        return read_hub_checkpoint(pretrained[len(HF_HUB_PREFIX) :])
    if isinstance(pretrained, (str, os.PathLike)):
        return read_checkpoint(pretrained)
    raise TypeError(
        f"pretrained must be True, False, 'hf-hub:org/repo' or a path, got {type(pretrained).__name__} {pretrained!r}"
    )


# ----------------------------------------------------------------------------------------------------------
# Writing checkpoints
# ----------------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def checkpoint_config(model: nnx.Module, fmt: str) -> dict[str, Any]:
    """config.json for a model: timm's ``save_for_hf`` layout (plus ``format`` for a Flax checkpoint)."""
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    arch = pretrained_cfg.pop("architecture", None)
    if arch is None:
        raise ValueError("the model has no pretrained_cfg['architecture']: create it with swin_jax.create_model")
    pretrained_cfg["num_classes"] = model.num_classes
    for key in ("hf_hub_id", "url", "file"):  # where the weights came from; the saved files are new weights
        pretrained_cfg.pop(key, None)
    input_size = (model.in_chans, *model.img_size)
    if tuple(pretrained_cfg.get("input_size") or ()) != input_size:
        # trained or adapted at another resolution / channel count: the data config must describe this model
        pretrained_cfg["input_size"] = input_size
        for key in ("test_input_size", "test_crop_pct"):
            pretrained_cfg.pop(key, None)
    config = {
        "architecture": arch,
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": model.global_pool,
        "model_args": dict(getattr(model, "model_args", {}) or {}),
        "pretrained_cfg": pretrained_cfg,
    }
    if fmt == "flax":
        config = {"format": FLAX_FORMAT, "format_version": 1, **config}
    return _jsonable(config)


def write_directory(output_dir: Path, write: Callable[[Path], None]) -> None:
    """Create ``output_dir`` complete or not at all: ``write(tmp)`` fills a temporary sibling directory, which is
    then renamed into place (replacing an existing ``output_dir``). On any error nothing is left behind."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        write(tmp)
        # ordinary permissions (mkdtemp makes the directory 0700, safetensors writes files 0600)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        if output_dir.exists():
            old = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
            output_dir.rename(old)
            tmp.rename(output_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_pretrained(
    model: nnx.Module, output_dir: str | os.PathLike, *, fmt: str = "flax", force: bool = False
) -> Path:
    """Write ``model`` to ``output_dir`` atomically: a Flax checkpoint, or timm's Hub layout.

    ``fmt='flax'``: ``config.json`` + ``flax_model.safetensors`` (Flax layout: NNX paths and shapes),
    loadable with ``create_model(arch, pretrained=output_dir)``. ``fmt='timm'``: ``config.json`` +
    ``model.safetensors`` under timm names, loadable by timm (``pretrained_cfg_overlay=dict(file=...)``
    or ``'local-dir:' + output_dir``) and by ``create_model``.

    Files are written to a temporary directory next to ``output_dir`` and renamed into place, so a
    failure leaves nothing behind. An existing ``output_dir`` is refused unless ``force``.
    """
    from safetensors.numpy import save_file

    if fmt not in ("flax", "timm"):
        raise ValueError(f"fmt must be 'flax' or 'timm', got {fmt!r}")
    if getattr(model, "features_only", False):
        raise ValueError("save the full model, not a features_only one (its head and final norm are dropped)")
    output_dir = Path(output_dir).expanduser().resolve()
    if output_dir.exists() and not force:
        raise FileExistsError(f"{output_dir} already exists; pass force=True (--force) to replace it")
    config = checkpoint_config(model, fmt)
    weights = to_flax_state_dict(model) if fmt == "flax" else to_timm_state_dict(model)
    weights = {k: np.ascontiguousarray(v) for k, v in weights.items()}

    def write(tmp: Path) -> None:
        save_file(weights, str(tmp / (FLAX_WEIGHTS_NAME if fmt == "flax" else SAFETENSORS_NAME)))
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    write_directory(output_dir, write)
    return output_dir
