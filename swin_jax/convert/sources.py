"""SOURCE -> what to pass to ``swin_jax.create_model``: a model name and its ``pretrained=`` argument.

SOURCE is a timm model name (``arch`` or ``arch.tag``: Hub repo ``timm/arch.tag``), ``hf-hub:org/repo``,
a directory (timm Hub layout or a Flax checkpoint) or one weights file. The architecture comes from
``--model``, else the name, else ``config.json``'s ``architecture``, else it is inferred from the
weights (:func:`infer_architecture`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from swin_jax import hub
from swin_jax.factory import ARCH_OVERRIDES, build_abstract_model
from swin_jax.registry import ARCH_FAMILY, ARCHITECTURES, get_arch_config, split_model_name
from swin_jax.weights import filter_timm_checkpoint, timm_param_shapes

__all__ = ["Source", "resolve_source", "infer_architecture", "parse_model_args", "read_config", "MODEL_ARG_KEYS"]

# what --model-args may set: what a checkpoint's config.json "model_args" may set (swin_jax.hub)
MODEL_ARG_KEYS = frozenset(ARCH_OVERRIDES) | {"img_size", "window_size"}
WEIGHT_SUFFIXES = (".safetensors", *hub.PICKLE_SUFFIXES)


@dataclass(frozen=True)
class Source:
    """A resolved SOURCE: ``create_model(name, pretrained=pretrained, num_classes=num_classes, **model_args)``."""

    text: str
    name: str
    pretrained: bool | str
    num_classes: int | None = None  # None: the checkpoint's; 0 for a bare file without a classifier
    model_args: dict[str, Any] = field(default_factory=dict)

    @property
    def arch(self) -> str:
        return split_model_name(self.name)[0]

    @property
    def local_path(self) -> Path | None:
        """The file or directory, for a local source."""
        if isinstance(self.pretrained, str) and not self.pretrained.startswith(hub.HF_HUB_PREFIX):
            return Path(self.pretrained).expanduser()
        return None


def parse_model_args(text: str) -> dict[str, Any]:
    """``--model-args`` JSON (``'{"embed_dim": 32, "depths": [2, 2, 2, 2]}'``) -> create_model overrides."""
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-args must be a JSON object, e.g. '{{\"embed_dim\": 32}}': {e}") from None
    if not isinstance(args, dict):
        raise ValueError(f"--model-args must be a JSON object, got {type(args).__name__}")
    unknown = sorted(set(args) - MODEL_ARG_KEYS)
    if unknown:
        allowed = ", ".join(sorted(MODEL_ARG_KEYS))
        raise ValueError(f"--model-args: unknown argument(s) {', '.join(unknown)}; allowed: {allowed}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def read_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict (:class:`CheckpointError` if unreadable)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise hub.CheckpointError(f"{path} is not a readable JSON config: {e}") from None
    if not isinstance(config, dict):
        raise hub.CheckpointError(f"{path} should hold a JSON object, got {type(config).__name__}")
    return config


def _hub_architecture(repo_id: str) -> str | None:
    """``architecture`` of a Hub repo's config.json (None if it has no config.json)."""
    try:
        return read_config(hub.download_from_hub(repo_id, hub.CONFIG_NAME)).get("architecture")
    except hub.HubUnavailableError as e:
        if e.file_missing:
            return None
        raise


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.endswith((*WEIGHT_SUFFIXES, ".json")) or text.startswith((".", "~"))


def resolve_source(source: str, model: str | None = None, model_args: Mapping[str, Any] | None = None) -> Source:
    """Resolve SOURCE (and ``--model``) to a :class:`Source`.

    Raises:
        CheckpointError: a missing or unreadable file, weights of no (or several) known architectures.
        HubUnavailableError: a Hub config.json that cannot be fetched.
        ValueError: an unknown model name or tag, or ``--model`` contradicting a model name SOURCE.
    """
    args = dict(model_args or {})
    if model is not None:
        split_model_name(model)  # an unknown --model fails here, with close matches
    if source.startswith(hub.HF_HUB_PREFIX):
        arch = model or _hub_architecture(source[len(hub.HF_HUB_PREFIX) :])
        if not arch:
            raise hub.CheckpointError(f"{source} has no config.json naming its architecture: pass --model ARCH")
        return Source(source, arch, source, model_args=args)
    path = Path(source).expanduser()
    if path.is_dir():
        config = read_config(path / hub.CONFIG_NAME) if (path / hub.CONFIG_NAME).is_file() else {}
        arch = model or config.get("architecture")
        if not arch:
            ckpt = hub.read_checkpoint(path)
            arch = infer_architecture(ckpt, {**_config_args(config), **args}, source)
        return Source(source, arch, source, model_args=args)
    if path.is_file():
        ckpt = hub.read_checkpoint(path)  # a pickle carrying code is refused here, never run
        headless = "head.fc.weight" not in ckpt and "head.weight" not in ckpt
        arch = model or infer_architecture(ckpt, args, source)
        return Source(source, arch, source, num_classes=0 if headless else None, model_args=args)
    if _looks_like_path(source):
        raise hub.CheckpointError(f"no such file or directory: {source}")
    arch, _ = split_model_name(source)  # unknown names fail here, with close matches
    if model is not None and split_model_name(model)[0] != arch:
        raise ValueError(f"SOURCE {source} is a {arch} checkpoint, but --model says {model}: drop --model")
    return Source(source, source, True, model_args=args)


def _config_args(config: Mapping[str, Any]) -> dict[str, Any]:
    args = config.get("model_args") or {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items() if k in MODEL_ARG_KEYS}


def _stage_depths(keys: Any) -> tuple[int, ...]:
    """Blocks per stage, from ``layers.{i}.blocks.{j}.*`` (V2-CR: ``stages.{i}...``) keys."""
    blocks: dict[int, set[int]] = {}
    for key in keys:
        m = re.match(r"(?:layers|stages)\.(\d+)\.blocks\.(\d+)\.", key)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(len(blocks.get(i, ())) for i in range(max(blocks) + 1)) if blocks else ()


def _checkpoint_shapes(state: Mapping[str, np.ndarray], model: Any) -> dict[str, tuple[int, ...]]:
    """timm name -> shape of the checkpoint for ``model``: renamed as the filter does, but not resized."""
    filtered = filter_timm_checkpoint(state, model)
    # the filter resizes relative position tables and adapts the stem; compare what is stored (never renamed)
    kept = ("relative_position_bias_table", "patch_embed.proj.weight")
    raw = {k: v.shape for k, v in state.items() if k.endswith(kept)}
    return {k: tuple(raw.get(k, v.shape)) for k, v in filtered.items()}


def infer_architecture(state: Mapping[str, np.ndarray], model_args: Mapping[str, Any], source: str) -> str:
    """The one registered architecture whose parameters have exactly the checkpoint's names and shapes.

    ``model_args`` (``--model-args``) apply to every candidate. Candidates are narrowed by family (SwinV2 weights
    have a position-bias MLP, ``cpb_mlp``; V2-CR's is ``meta_mlp``), ``embed_dim`` and blocks per stage read from the
    keys, then compared key by key and shape by shape (relative position tables as stored, so the window size counts)
    against an abstract model. SwinV2's and V2-CR's parameters do not depend on the window or the image size, so such
    variants stay ambiguous (``--model``).
    """
    stem = state.get("patch_embed.proj.weight")
    embed_dim = int(stem.shape[0]) if stem is not None else None
    depths = _stage_depths(state)
    head = state.get("head.fc.weight", state.get("head.weight"))
    num_classes = int(head.shape[0]) if head is not None else 0
    family = "SwinTransformer"
    if any(".cpb_mlp." in k for k in state):
        family = "SwinTransformerV2"
    elif any(".meta_mlp." in k for k in state):
        family = "SwinTransformerV2Cr"
    matches = []
    for arch in ARCHITECTURES:
        if ARCH_FAMILY[arch] != family:
            continue
        cfg = {**get_arch_config(arch), **model_args}
        if cfg["embed_dim"] != embed_dim or tuple(cfg["depths"]) != depths:
            continue
        model = build_abstract_model(arch, {**cfg, "num_classes": num_classes})
        if _checkpoint_shapes(state, model) == timm_param_shapes(model):
            matches.append(arch)
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise hub.CheckpointError(
            f"{source}: the weights fit {len(matches)} architectures ({', '.join(matches)}): pass --model to choose"
        )
    raise hub.CheckpointError(
        f"{source}: the weights (embed_dim={embed_dim}, depths={depths}) match no registered architecture"
        f"{' with these --model-args' if model_args else ''}: pass --model ARCH, and --model-args for a "
        f"non-standard configuration\n(architectures: {', '.join(ARCHITECTURES)})"
    )
