"""Real Hugging Face Hub cache layouts built offline from timm's own export (``save_for_hf``).

``HF_HOME/hub/models--ORG--NAME/snapshots/<40-hex>/{config.json, model.safetensors}`` plus
``refs/main``: exactly what ``hf_hub_download`` leaves behind, so with ``HF_HUB_OFFLINE=1`` the real
download code path finds the files there. huggingface_hub reads HF_HOME / HF_HUB_OFFLINE when it is
imported, so run code that uses the cache in a subprocess with :func:`hub_env`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import timm
import torch


def export_timm(model: torch.nn.Module, out_dir: Path) -> Path:
    """timm's Hub layout (config.json + model.safetensors) for ``model``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    timm.models.save_for_hf(model, str(out_dir), safe_serialization=True)
    return out_dir


def add_to_hf_cache(hf_home: Path, repo_id: str, files_dir: Path) -> Path:
    """Put the files of ``files_dir`` into ``hf_home``'s Hub cache as repo ``repo_id`` at ``main``."""
    org, name = repo_id.split("/")
    repo = hf_home / "hub" / f"models--{org}--{name}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in files_dir.iterdir():
        if f.suffix in (".json", ".safetensors"):
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def hub_env(hf_home: Path, offline: bool = True) -> dict[str, str]:
    """Environment for a subprocess that uses ``hf_home`` as its cache, offline."""
    env = dict(os.environ)
    env["HF_HOME"] = str(hf_home)
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def python() -> str:
    return sys.executable


def tmp_hf_home() -> Path:
    return Path(tempfile.mkdtemp(prefix="hf_home_"))


def ms_state_dict(tmodel: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm weights in the original Microsoft layout: downsample at the end of the previous stage,
    ``head.`` for ``head.fc.``, and the buffers persisted (V1 and V2)."""
    out = {}
    for key, value in tmodel.state_dict().items():
        if key.startswith("layers.") and ".downsample." in key:
            stage = int(key.split(".")[1])
            key = key.replace(f"layers.{stage}.downsample.", f"layers.{stage - 1}.downsample.", 1)
        out[key.replace("head.fc.", "head.")] = value
    for name, buf in tmodel.named_buffers():
        if name.endswith(("relative_position_index", "attn_mask", "relative_coords_table")):
            out[name] = buf
    return out
