"""Fine-tune a Swin on an ImageFolder dataset: checks up front, Orbax checkpoints, exact resume, SIGTERM-safe.

:func:`finetune` ties together :mod:`swin_jax.datasets` (ImageFolder, checks, augmentation, resumable grain
loaders), :mod:`swin_jax.train` (timm's AdamW / layer decay / cosine schedule, the fast ``TrainStep`` with
the EMA inside it) and :func:`swin_jax.hub.save_pretrained`:

* every data check runs before any model is built or compiled: both folders (missing, empty, one class),
  the val classes equal the train classes, ``num_classes`` matches the dataset, every image decodes;
* Orbax checkpoints in ``output/checkpoints`` (every ``save_every_steps`` steps, default each epoch end, and
  at the end; ``keep`` of them; written atomically by Orbax) hold the whole ``nnx.state(model)``
  (parameters and the RNG streams of dropout / drop path), the optimizer state, the EMA (if used) and the
  step, which is also the loader position: ``resume=True`` continues with ``loader.iter_from(step)`` and
  gives the same per-step losses as an uninterrupted run;
* SIGTERM during training sets a flag; at the next step boundary a checkpoint is saved and
  :func:`finetune` returns with ``status='interrupted'`` (the previous handler is restored);
* per epoch one line is printed and appended to ``output/metrics.jsonl`` (train loss, val loss, top-1,
  top-5 in percent); per step ``output/steps.jsonl`` gets the loss (a resume first drops the lines past its
  checkpoint, so each step and epoch is logged once);
* the final weights go to ``output/model`` (Flax layout): ``create_model(arch, pretrained=output/"model")``;
* several processes (``distributed=`` / ``--coordinator ... --num-processes N --process-id I`` or
  ``--distributed``): the same global batches, losses and weights as one process with as many devices, each
  process loading only its share of every batch; checkpoints written collectively, the logs and final
  weights by process 0 alone.

Command line: ``python -m swin_jax finetune --model TAG --train-dir DIR --val-dir DIR --epochs N
--batch-size N --lr X --output DIR [--resume]`` (see :mod:`swin_jax.cli`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["FinetuneError", "finetune", "evaluate"]

CHECKPOINT_DIR = "checkpoints"
MODEL_DIR = "model"
EMA_MODEL_DIR = "model_ema"
METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"
_MIX_STREAM = 0x6D697875  # "mixu": far above any count an nnx.Rngs stream reaches


class FinetuneError(ValueError):
    """A problem with the inputs of :func:`finetune` (data, settings, checkpoints), with a message for people."""


# ----------------------------------------------------------------------------------------------------------
# checks (no jax work)
# ----------------------------------------------------------------------------------------------------------


def _open_folder(path: Any, what: str):
    from .datasets import ImageFolder

    try:
        return ImageFolder(path)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        raise FinetuneError(f"{what}: {e}") from None


def _check_data(train_dir: Any, val_dir: Any, num_classes: int | None, batch_size: int, verify: bool):
    """``(train ImageFolder, val ImageFolder, num_classes)`` after every data check; raises FinetuneError."""
    from .datasets import check_num_classes, verify_images

    train_ds = _open_folder(train_dir, "training data")
    val_ds = _open_folder(val_dir, "validation data")
    if val_ds.classes != train_ds.classes:
        only_train = sorted(set(train_ds.classes) - set(val_ds.classes))
        only_val = sorted(set(val_ds.classes) - set(train_ds.classes))
        detail = f"only in train: {only_train}, only in val: {only_val}" if only_train or only_val else "order differs"
        raise FinetuneError(
            f"the classes of {val_ds.root!r} differ from those of {train_ds.root!r} ({detail}); "
            "both need the same class sub-directories"
        )
    if num_classes is None:
        num_classes = len(train_ds.classes)
    try:
        check_num_classes(train_ds, num_classes)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    if batch_size > len(train_ds):
        raise FinetuneError(
            f"batch_size={batch_size} exceeds the {len(train_ds)} training images of {train_ds.root!r}: "
            "no full batch per epoch"
        )
    if verify:
        for ds, what in ((train_ds, "training data"), (val_ds, "validation data")):
            try:
                verify_images(ds)
            except ValueError as e:
                raise FinetuneError(f"{what}: {e}") from None
    return train_ds, val_ds, int(num_classes)


def _check_settings(
    model: str, epochs: int, batch_size: int, lr: float, keep: int, save_every: int | None, opt_eps: float
) -> None:
    from .registry import split_model_name

    try:
        split_model_name(model)
    except ValueError as e:
        raise FinetuneError(str(e)) from None
    if epochs < 1:
        raise FinetuneError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise FinetuneError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise FinetuneError(f"lr must be > 0, got {lr}")
    if keep < 1:
        raise FinetuneError(f"keep must be >= 1, got {keep}")
    if save_every is not None and save_every < 1:
        raise FinetuneError(f"save_every_steps must be >= 1, got {save_every}")
    if not opt_eps > 0:
        raise FinetuneError(f"opt_eps must be > 0, got {opt_eps}")


# ----------------------------------------------------------------------------------------------------------
# checkpoint trees: flat {path: array} dicts (PRNG keys stored as their raw key data)
# ----------------------------------------------------------------------------------------------------------


def _flat(state: Any) -> dict[str, Any]:
    import jax
    from flax import nnx

    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var.get_value() if hasattr(var, "get_value") else var
        if hasattr(value, "dtype") and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
            value = jax.random.key_data(value)
        out["/".join(map(str, path))] = value
    return out


def _unflat(state: Any, flat: dict[str, Any]) -> Any:
    """``state`` (an nnx.State) with every leaf replaced by ``flat``'s (PRNG keys re-wrapped)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    pairs = []
    for path, var in nnx.to_flat_state(state):
        old = var.get_value()
        new = flat["/".join(map(str, path))]
        if jax.dtypes.issubdtype(old.dtype, jax.dtypes.prng_key):
            new = jax.random.wrap_key_data(jnp.asarray(new), impl=jax.random.key_impl(old))
        else:
            new = jnp.asarray(new, dtype=old.dtype)
        pairs.append((path, var.replace(new)))
    return nnx.from_flat_state(pairs)


def _manager(directory: Path, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager(directory.resolve(), options=options)


def _read_meta(mgr, step: int) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    return dict(mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)


# ----------------------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------------------


def _eval_batch_impl(model, images, labels, mask):
    import jax
    import jax.numpy as jnp

    logits = model(images).astype(jnp.float32)
    label_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - label_logit[:, 0]
    rank = jnp.sum(logits > label_logit, axis=-1)  # as swin_jax.train.topk_correct
    mask = mask.astype(jnp.float32)
    return {
        "loss": jnp.sum(nll * mask),
        "top1": jnp.sum((rank < 1) * mask),
        "top5": jnp.sum((rank < min(5, logits.shape[-1])) * mask),
        "n": jnp.sum(mask),
    }


_EVAL_BATCH = None


def evaluate(model: Any, loader: Any, mesh: Any = None) -> dict[str, float]:
    """Mean cross-entropy and top-1 / top-5 accuracy (percent) of ``model`` over an eval loader.

    ``loader`` is a :func:`swin_jax.datasets.make_eval_loader` (padded batches with a ``mask``). The model is
    put in eval mode. With a ``mesh`` the batches are split over it (:func:`swin_jax.distributed.shard_batch`;
    with several processes each passes its share of every batch, and all get the same result).
    """
    global _EVAL_BATCH
    import numpy as np
    from flax import nnx

    from .distributed import shard_batch, to_host

    if _EVAL_BATCH is None:
        _EVAL_BATCH = nnx.jit(_eval_batch_impl)
    model.eval()
    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "n": 0.0}
    for batch in loader:
        mask = batch.get("mask")
        if mask is None:
            mask = np.ones(batch["label"].shape, bool)
        arrays = (batch["image"], batch["label"], mask)
        out = to_host(_EVAL_BATCH(model, *(shard_batch(arrays, mesh) if mesh is not None else arrays)))
        for k in totals:
            totals[k] += float(out[k])
    n = max(totals["n"], 1.0)
    return {"loss": totals["loss"] / n, "top1": 100.0 * totals["top1"] / n, "top5": 100.0 * totals["top5"] / n}


# ----------------------------------------------------------------------------------------------------------
# finetune
# ----------------------------------------------------------------------------------------------------------


def _drop_log_lines_after(output: Path, step: int) -> None:
    """Before a resume from checkpoint ``step``: drop the lines of ``metrics.jsonl`` and ``steps.jsonl`` past it (a
    killed run logs steps after its last checkpoint, which the resumed run logs again), so every step and epoch
    appears once. Each file is replaced whole (written next to it, then renamed)."""
    for name in (METRICS_FILE, STEPS_FILE):
        path = output / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
        if len(kept) != len(lines):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(path)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line with a single write (O_APPEND), so a killed process leaves no partial line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def finetune(
    *,
    model: str,
    pretrained: bool | str | os.PathLike = False,
    train_dir: str | os.PathLike,
    val_dir: str | os.PathLike,
    num_classes: int | None = None,
    img_size: int | None = None,
    epochs: int,
    batch_size: int,
    lr: float,
    layer_decay: float | None = None,
    weight_decay: float = 0.05,
    warmup_epochs: int = 0,
    label_smoothing: float = 0.1,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    color_jitter: float | None = 0.4,
    rand_augment: tuple[int, float] | None = None,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    grad_accum_steps: int = 1,
    steps_per_call: int = 1,
    grad_checkpointing: bool = False,
    drop_path_rate: float = 0.1,
    clip_grad_norm: float | None = None,
    opt_eps: float = 1e-8,
    ema_decay: float | None = None,
    seed: int = 0,
    output: str | os.PathLike,
    resume: bool = False,
    save_every_steps: int | None = None,
    keep: int = 3,
    max_steps: int | None = None,
    verify: bool = True,
    log_steps: bool = True,
    progress: bool | None = None,
    worker_count: int = 0,
    distributed: dict[str, Any] | None = None,
    **model_overrides: Any,
) -> dict[str, Any]:
    """Fine-tune ``model`` on ``train_dir`` (ImageFolder layout), validating on ``val_dir`` every epoch.

    Args:
        model: ``arch`` or ``arch.tag`` (see :func:`swin_jax.list_models`).
        pretrained: as :func:`swin_jax.create_model` (False, True, ``hf-hub:...`` or a local path).
        train_dir, val_dir: ``root/<class>/<image>`` folders with the same classes.
        num_classes: classifier classes (default: the number of training classes; must match it).
        img_size: input size (default: the model's).
        epochs, batch_size, lr: training length, batch size (full batches only) and peak learning rate.
        layer_decay, weight_decay, warmup_epochs, clip_grad_norm: see :func:`swin_jax.train.create_optimizer`.
        label_smoothing: label smoothing of the training loss.
        scale, hflip, color_jitter, rand_augment: the training augmentation
            (:func:`swin_jax.datasets.create_train_transform`; the defaults are timm's ImageNet recipe:
            random resized crops of 8-100% of the area, horizontal flips, colour jitter 0.4). Small or
            non-photographic images (digits, text, medical scans) usually want milder crops and no flip.
        mixup, cutmix: Beta alphas of Mixup / CutMix on every training batch (timm's ``--mixup 0.8 --cutmix 1.0``;
            0 turns each off; with both on, CutMix is chosen for half the batches). The targets become soft
            (smoothed by ``label_smoothing``); the random draw of each step depends only on ``seed`` and the
            step, so a resumed run mixes exactly as an uninterrupted one.
        grad_accum_steps: average the gradients of this many batches per optimizer update (effective batch
            ``batch_size * grad_accum_steps``); the learning-rate schedule and the EMA count updates.
        steps_per_call: training steps per call of the compiled step (:meth:`swin_jax.train.TrainStep.run`):
            the same steps and results to the bit, fewer calls. On a CPU ``8`` makes Swin-B's step ~10% faster
            (each call's temporaries are allocated once for all its steps) for ~0.25 GB more peak memory. A
            call never runs past an epoch end, a checkpoint or ``max_steps``; the steps before one that do not fill
            a call run one per call, as a second compiled program: choose epoch and checkpoint intervals that are
            multiples of it. SIGTERM is noticed between calls.
        grad_checkpointing: recompute each block in the backward pass (the model's ``set_grad_checkpointing``):
            less memory, about one more forward pass of compute; the same training up to fp32 rounding (timm's
            ``--grad-checkpointing``). Not part of the settings a resumed run must repeat.
        drop_path_rate: stochastic depth rate.
        opt_eps: AdamW's epsilon (timm's ``--opt-eps``).
        ema_decay: keep an EMA of the weights if set: evaluated every epoch too (``ema_*`` metrics), kept in
            the checkpoints, and saved at the end next to the final weights (``output/model_ema``).
        seed: model init, drop path, shuffling and augmentation seed.
        output: output directory (``checkpoints/``, ``metrics.jsonl``, ``steps.jsonl``, ``model/``, and
            ``model_ema/`` with ``ema_decay``).
        resume: continue from the latest checkpoint in ``output/checkpoints`` (from scratch if none).
        save_every_steps: checkpoint interval in steps (default: every epoch end); one is always saved at
            the end, when stopped by ``max_steps`` and on SIGTERM.
        keep: checkpoints kept.
        max_steps: stop (with a checkpoint) after this global step; for tests and step budgets.
        verify: decode every image before training (:func:`swin_jax.datasets.verify_images`).
        log_steps: append ``{"step", "epoch", "loss"}`` per step to ``output/steps.jsonl``.
        progress: tqdm progress bar (default: when stderr is a terminal).
        worker_count: grain worker processes of the training loader.
        distributed: arguments of :func:`swin_jax.distributed.initialize` (``coordinator``, ``num_processes``,
            ``process_id``, ``heartbeat_timeout_s``; ``{}`` lets JAX detect the cluster), called after every
            check and before any JAX work. The run then spans every process's devices: ``batch_size`` is the
            global batch, each process reads only its share of it, and the losses, schedule and weights are
            those of one process with as many devices. Checkpoints are written by all processes together;
            ``metrics.jsonl``, ``steps.jsonl``, ``model/`` and ``model_ema/`` by process 0 alone. (Without it, a
            run whose processes called ``jax.distributed.initialize`` themselves works the same way.)
        **model_overrides: other :func:`swin_jax.create_model` arguments (``embed_dim``, ``depths``,
            ``num_heads``, ``window_size``, ...).

    Returns:
        ``{"status": 'completed' | 'stopped' (max_steps) | 'interrupted' (SIGTERM), "step", "epoch",
        "checkpoint" (path of the last checkpoint), "model_dir" (final weights, when completed), "ema_model_dir"
        (the EMA weights, when completed with ``ema_decay``), and the last
        epoch's metrics ("loss", "val_loss", "top1", "top5", ...) if an epoch ended}``.

    Raises:
        FinetuneError (a ValueError): bad data or settings, found before any model is built.
    """
    plan = _resolve(
        model=model,
        train_dir=train_dir,
        val_dir=val_dir,
        num_classes=num_classes,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        scale=scale,
        hflip=hflip,
        color_jitter=color_jitter,
        rand_augment=rand_augment,
        mixup=mixup,
        cutmix=cutmix,
        grad_accum_steps=grad_accum_steps,
        steps_per_call=steps_per_call,
        opt_eps=opt_eps,
        ema_decay=ema_decay,
        seed=seed,
        output=output,
        keep=keep,
        save_every_steps=save_every_steps,
        max_steps=max_steps,
        verify=verify,
        log_steps=log_steps,
        progress=progress,
    )
    devices, processes, is_main = _start_processes(distributed, batch_size)
    mgr, start_step, meta = _open_checkpoints(plan, resume, keep)
    net = _build_model(plan, model, pretrained, img_size, drop_path_rate, model_overrides)
    net.set_grad_checkpointing(grad_checkpointing)
    train_loader, val_loader = _build_loaders(plan, net, worker_count, processes)
    optimizer, mesh, ema = _build_optimizer(
        plan, net, lr, weight_decay, layer_decay, clip_grad_norm, opt_eps, ema_decay, devices
    )
    mix = _build_mix(plan, mixup, cutmix)
    acc = _new_epoch_acc()
    if meta is not None:
        acc = _restore(plan, mgr, start_step, meta, net, optimizer, ema, is_main)
    status, step, last, checkpoint = _train(
        plan, net, optimizer, ema, mesh, mgr, train_loader, val_loader, mix, start_step, acc, processes, is_main
    )
    return _finish(plan, status, step, checkpoint, last, net, ema, is_main)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The checked settings of a :func:`finetune` run and what follows from them, known before any JAX work."""

    output: Path
    train_ds: Any
    val_ds: Any
    num_classes: int
    batch_size: int
    epochs: int
    seed: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    grad_accum_steps: int
    steps_per_call: int
    label_smoothing: float
    augment: dict[str, Any]  # the augmentation keywords of create_train_transform
    run_config: dict[str, Any]  # the settings that must be equal when resuming
    save_every_steps: int | None
    max_steps: int | None
    log_steps: bool
    progress: bool | None

    @property
    def ckpt_dir(self) -> Path:
        """The Orbax checkpoint directory, ``output/checkpoints``."""
        return self.output / CHECKPOINT_DIR


def _resolve(
    *,
    model: str,
    train_dir: Any,
    val_dir: Any,
    num_classes: int | None,
    epochs: int,
    batch_size: int,
    lr: float,
    warmup_epochs: int,
    label_smoothing: float,
    scale: tuple[float, float],
    hflip: float,
    color_jitter: float | None,
    rand_augment: tuple[int, float] | None,
    mixup: float,
    cutmix: float,
    grad_accum_steps: int,
    steps_per_call: int,
    opt_eps: float,
    ema_decay: float | None,
    seed: int,
    output: Any,
    keep: int,
    save_every_steps: int | None,
    max_steps: int | None,
    verify: bool,
    log_steps: bool,
    progress: bool | None,
) -> _Plan:
    """Run every check of the settings and the data (no JAX work, nothing written); raises FinetuneError."""
    output = Path(output)
    _check_settings(model, epochs, batch_size, lr, keep, save_every_steps, opt_eps)
    train_ds, val_ds, num_classes = _check_data(train_dir, val_dir, num_classes, batch_size, verify)
    steps_per_epoch = len(train_ds) // batch_size
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(warmup_epochs) * steps_per_epoch
    if total_steps <= warmup_steps:
        raise FinetuneError(
            f"warmup_epochs={warmup_epochs} must be smaller than epochs={epochs} (total steps {total_steps})"
        )
    augment = {
        "scale": [float(v) for v in scale],
        "hflip": float(hflip),
        "color_jitter": None if color_jitter is None else float(color_jitter),
        "rand_augment": None if rand_augment is None else [int(rand_augment[0]), float(rand_augment[1])],
    }
    from .datasets import create_train_transform

    try:  # the same checks the real transform makes, before anything is built or written
        create_train_transform(1, **augment)
    except (ValueError, TypeError, IndexError) as e:
        raise FinetuneError(f"bad augmentation setting: {e}") from None
    if mixup < 0 or cutmix < 0:
        raise FinetuneError(f"mixup and cutmix are Beta alphas >= 0 (0 = off), got mixup={mixup}, cutmix={cutmix}")
    if steps_per_call < 1:
        raise FinetuneError(f"steps_per_call must be >= 1, got {steps_per_call}")
    if grad_accum_steps < 1 or steps_per_epoch % grad_accum_steps:
        raise FinetuneError(
            f"grad_accum_steps={grad_accum_steps} must be >= 1 and divide the {steps_per_epoch} batches of an epoch"
        )
    # settings that must be equal when resuming (they decide the data order, the schedule and the state kept)
    run_config = {
        "model": model,
        "num_classes": num_classes,
        "batch_size": batch_size,
        "epochs": epochs,
        "seed": seed,
        "steps_per_epoch": steps_per_epoch,
        "ema": ema_decay is not None,
        "augment": augment,
        "mixup": [float(mixup), float(cutmix)],
        "grad_accum_steps": grad_accum_steps,
    }
    return _Plan(
        output=output,
        train_ds=train_ds,
        val_ds=val_ds,
        num_classes=num_classes,
        batch_size=batch_size,
        epochs=epochs,
        seed=seed,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        grad_accum_steps=grad_accum_steps,
        steps_per_call=steps_per_call,
        label_smoothing=label_smoothing,
        augment=augment,
        run_config=run_config,
        save_every_steps=save_every_steps,
        max_steps=max_steps,
        log_steps=log_steps,
        progress=progress,
    )


def _start_processes(distributed: dict[str, Any] | None, batch_size: int) -> tuple[int, int, bool]:
    """``(devices, processes, is_main)`` after ``jax.distributed`` is set up (if asked); checks the batch split."""
    import jax

    from .distributed import initialize

    if distributed is not None:
        try:
            initialize(**distributed)
        except ValueError as e:
            raise FinetuneError(f"distributed: {e}") from None
    devices, processes, is_main = jax.device_count(), jax.process_count(), jax.process_index() == 0
    if batch_size % devices:
        raise FinetuneError(
            f"batch_size={batch_size} must be divisible by the number of devices ({devices}): each device gets an "
            f"equal share of every batch"
        )
    return devices, processes, is_main


def _open_checkpoints(plan: _Plan, resume: bool, keep: int) -> tuple[Any, int, dict[str, Any] | None]:
    """``(manager, start step, meta of the checkpoint to resume from or None)``; creates the output directory.

    Refuses an output that holds checkpoints without ``resume``, and a checkpoint made with other settings.
    """
    ckpt_dir = plan.ckpt_dir
    has_checkpoints = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if has_checkpoints and not resume:
        raise FinetuneError(f"{ckpt_dir} already holds checkpoints: pass resume=True (--resume) or another output")
    plan.output.mkdir(parents=True, exist_ok=True)  # every process: the directory may be on a host's own disk
    mgr = _manager(ckpt_dir, keep)
    start_step, meta = 0, None
    if resume and mgr.latest_step() is not None:
        start_step = int(mgr.latest_step())
        meta = _read_meta(mgr, start_step)
        differ = {k: (meta["config"].get(k), v) for k, v in plan.run_config.items() if meta["config"].get(k) != v}
        if differ:
            details = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in differ.items())
            raise FinetuneError(f"cannot resume from {ckpt_dir / str(start_step)}: settings differ ({details})")
    return mgr, start_step, meta


def _build_model(
    plan: _Plan, model: str, pretrained: Any, img_size: int | None, drop_path_rate: float, overrides: dict[str, Any]
):
    """The model to fine-tune (:func:`swin_jax.create_model`, pretrained or not), initialised from ``plan.seed``."""
    from flax import nnx

    from .factory import create_model

    return create_model(
        model,
        pretrained=pretrained,
        num_classes=plan.num_classes,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        rngs=nnx.Rngs(plan.seed),
        **overrides,
    )


def _build_loaders(plan: _Plan, net, worker_count: int, processes: int) -> tuple[Any, Any]:
    """``(train loader, val loader)`` with ``net``'s data config; each process reads its share of every batch."""
    import jax

    from .data import create_transform, resolve_data_config
    from .datasets import create_train_transform, make_eval_loader, make_loader

    cfg = resolve_data_config(net)
    # global batches; each process reads only its rows of each (the same batches for any process count)
    share = dict(shard_index=jax.process_index(), shard_count=processes)
    train_loader = make_loader(
        plan.train_ds,
        transform=create_train_transform(**cfg, **plan.augment),
        batch_size=plan.batch_size,
        shuffle=True,
        seed=plan.seed,
        num_epochs=plan.epochs,
        drop_remainder=True,
        worker_count=worker_count,
        **share,
    )
    val_loader = make_eval_loader(plan.val_ds, transform=create_transform(**cfg), batch_size=plan.batch_size, **share)
    return train_loader, val_loader


def _build_optimizer(
    plan: _Plan,
    net,
    lr: float,
    weight_decay: float,
    layer_decay: float | None,
    clip_grad_norm: float | None,
    opt_eps: float,
    ema_decay: float | None,
    devices: int,
) -> tuple[Any, Any, Any]:
    """``(optimizer, mesh, ema)`` for ``net``: timm's AdamW and schedule, data parallel placement, the EMA.

    ``net`` and the optimizer are placed over a mesh of every device (``mesh`` is None on one device); ``ema`` is
    None without ``ema_decay``.
    """
    from flax import nnx

    from .distributed import make_mesh, shard_model
    from .train import EMA, create_optimizer

    tx = create_optimizer(
        net,
        lr=lr,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        warmup_steps=plan.warmup_steps // plan.grad_accum_steps,
        total_steps=plan.total_steps // plan.grad_accum_steps,
        clip_grad_norm=clip_grad_norm,
        eps=opt_eps,
        grad_accum_steps=plan.grad_accum_steps,
    )
    optimizer = nnx.Optimizer(net, tx, wrt=nnx.Param)
    # data parallel over every device (a no-op placement on one): XLA all-reduces the gradients
    mesh = make_mesh() if devices > 1 else None
    if mesh is not None:
        shard_model(net, mesh)
        shard_model(optimizer, mesh)
    ema = EMA(net, decay=ema_decay) if ema_decay is not None else None
    return optimizer, mesh, ema


def _build_mix(plan: _Plan, mixup: float, cutmix: float) -> Callable[[Any, Any, int], tuple[Any, Any, Any]] | None:
    """``mix(images, targets, step) -> (images, targets, lam)``, or None when Mixup and CutMix are both off.

    The jitted :func:`swin_jax.train.mixup_cutmix` of the batch of ``step``, its random draw from ``plan.seed`` and
    ``step`` alone (so a resumed run mixes exactly as an uninterrupted one).
    """
    if not (mixup > 0 or cutmix > 0):
        return None
    import jax

    from .train import mixup_cutmix

    # its own stream: nnx.Rngs(seed) draws fold_in(key(seed), 0, 1, ...) for the initializers and drop path
    mix_key = jax.random.fold_in(jax.random.key(plan.seed), _MIX_STREAM)
    mix_batch = jax.jit(
        functools.partial(
            mixup_cutmix,
            alpha_mixup=mixup,
            alpha_cutmix=cutmix,
            num_classes=plan.num_classes,
            label_smoothing=plan.label_smoothing,
        )
    )

    def mix(images: Any, targets: Any, step: int) -> tuple[Any, Any, Any]:
        return mix_batch(images, targets, jax.random.fold_in(mix_key, step))

    return mix


def _new_epoch_acc() -> dict[str, Any]:
    """Empty train stats of an epoch (summed over its steps; kept in the checkpoints)."""
    return {"loss_sum": 0.0, "top1": 0.0, "top5": 0.0, "n": 0, "steps": 0}


def _restore(plan: _Plan, mgr, step: int, meta: dict[str, Any], net, optimizer, ema, is_main: bool) -> dict[str, Any]:
    """Load checkpoint ``step`` into ``net``, ``optimizer`` and ``ema`` (in place); returns its epoch's train stats."""
    import orbax.checkpoint as ocp
    from flax import nnx

    targets = {"model": _flat(nnx.state(net)), "opt": _flat(nnx.state(optimizer))}
    if ema is not None:
        targets["ema"] = _flat(ema.params)
    restored = mgr.restore(
        step, args=ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in targets.items()})
    )
    nnx.update(net, _unflat(nnx.state(net), dict(restored["model"])))
    nnx.update(optimizer, _unflat(nnx.state(optimizer), dict(restored["opt"])))
    if ema is not None:
        ema.params = _unflat(ema.params, dict(restored["ema"]))
    acc = dict(meta["epoch_acc"])
    if is_main:
        _drop_log_lines_after(plan.output, step)
        print(f"resuming from {plan.ckpt_dir / str(step)} (step {step} of {plan.total_steps})", flush=True)
    return acc


def _save(plan: _Plan, mgr, step: int, net, optimizer, ema, acc: dict[str, Any]) -> Path:
    """Checkpoint ``step`` (unless it is the latest already: all processes together); returns its path."""
    import orbax.checkpoint as ocp
    from flax import nnx

    if mgr.latest_step() != step:
        items = {
            "model": ocp.args.StandardSave(_flat(nnx.state(net))),
            "opt": ocp.args.StandardSave(_flat(nnx.state(optimizer))),
            "meta": ocp.args.JsonSave({"step": step, "loader_step": step, "config": plan.run_config, "epoch_acc": acc}),
        }
        if ema is not None:
            items["ema"] = ocp.args.StandardSave(_flat(ema.params))
        mgr.save(step, args=ocp.args.Composite(**items))
        mgr.wait_until_finished()
    return plan.ckpt_dir.resolve() / str(step)


def _call_size(plan: _Plan, step: int) -> int:
    """Steps the next call of the train step runs from ``step``: ``plan.steps_per_call`` when that many fit before
    the next epoch end, due checkpoint, ``max_steps`` or the end; otherwise 1 (the steps up to that point run one
    per call, so at most two programs are compiled: one step and ``steps_per_call`` steps)."""
    k = plan.steps_per_call
    if k == 1:
        return 1
    ends = [plan.total_steps, (step // plan.steps_per_epoch + 1) * plan.steps_per_epoch]
    if plan.save_every_steps is not None:
        ends.append((step // plan.save_every_steps + 1) * plan.save_every_steps)
    if plan.max_steps is not None and plan.max_steps > step:
        ends.append(plan.max_steps)
    return k if min(ends) - step >= k else 1


def _train(
    plan: _Plan,
    net,
    optimizer,
    ema,
    mesh,
    mgr,
    train_loader,
    val_loader,
    mix,
    start_step: int,
    acc: dict[str, Any],
    processes: int,
    is_main: bool,
) -> tuple[str, int, dict[str, Any], Path]:
    """The step loop from ``start_step``: ``(status, step, last epoch's metrics or {}, path of the last checkpoint)``.

    Runs ``plan.steps_per_call`` steps per call of the train step where they fit (:func:`_call_size`), so the
    epoch ends, checkpoints and stops below only ever fall on the last step of a call.

    Evaluates at each epoch end (:func:`_end_epoch`), checkpoints every ``save_every_steps`` (default: each epoch
    end) and when it stops (the end, ``max_steps``, SIGTERM, which it catches meanwhile); closes ``mgr``.
    """
    import jax.numpy as jnp

    from .distributed import shard_batch, to_host
    from .train import TrainStep

    stop = threading.Event()
    previous_handler = None
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread:
        previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    bar = None
    if is_main and (plan.progress or (plan.progress is None and sys.stderr.isatty())):
        from tqdm import tqdm

        bar = tqdm(total=plan.total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    steps_per_epoch, max_steps, save_every_steps = plan.steps_per_epoch, plan.max_steps, plan.save_every_steps
    step = start_step
    status = "completed"
    last: dict[str, Any] = {}
    checkpoint = None
    try:
        net.train()
        # one jitted pure function over the flat state (EMA included), buffers donated; sync() writes the
        # state back into net / optimizer / ema before they are evaluated or saved
        train_step = TrainStep(
            net,
            optimizer,
            num_classes=plan.num_classes,
            label_smoothing=plan.label_smoothing,
            ema=ema,
            ema_every=plan.grad_accum_steps,
        )
        if stop.is_set():
            status = "interrupted"
        elif max_steps is not None and step >= max_steps and step < plan.total_steps:
            status = "stopped"
        else:
            batches = iter(train_loader.iter_from(step))
            while True:
                size = _call_size(plan, step)
                group = []
                for batch in itertools.islice(batches, size):
                    arrays = (batch["image"], batch["label"])
                    images, targets = shard_batch(arrays, mesh) if mesh is not None else tuple(map(jnp.asarray, arrays))
                    if mix is not None:
                        images, targets, _ = mix(images, targets, step + len(group))
                    group.append((images, targets))
                if not group:
                    break
                if len(group) > 1:  # one call for the whole group (TrainStep.run); its metrics come stacked
                    stacked = to_host(train_step.run(tuple(jnp.stack(arrays) for arrays in zip(*group))))
                    outs = [{k: v[i] for k, v in stacked.items()} for i in range(len(group))]
                else:
                    outs = [to_host(train_step(group[0]))]
                for out in outs:
                    step += 1
                    loss = float(out["loss"])
                    epoch = (step - 1) // steps_per_epoch + 1
                    acc["loss_sum"] += loss
                    acc["top1"] += float(out["top1"])
                    acc["top5"] += float(out["top5"])
                    acc["n"] += plan.batch_size
                    acc["steps"] += 1
                    if plan.log_steps and is_main:
                        _append_jsonl(plan.output / STEPS_FILE, {"step": step, "epoch": epoch, "loss": loss})
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                        bar.update(1)
                # a call ends at the latest where an epoch ends, a checkpoint is due or max_steps is reached
                if step % steps_per_epoch == 0:
                    train_step.sync()
                    last = _end_epoch(net, ema, val_loader, mesh, acc, epoch, step, plan.output if is_main else None)
                    acc = _new_epoch_acc()
                    net.train()
                periodic = save_every_steps is None and step % steps_per_epoch == 0
                periodic |= save_every_steps is not None and step % save_every_steps == 0
                if step >= plan.total_steps:
                    break
                if _any_process(stop.is_set(), processes):
                    status = "interrupted"
                    break
                if max_steps is not None and step >= max_steps:
                    status = "stopped"
                    break
                if periodic:
                    train_step.sync()
                    checkpoint = _save(plan, mgr, step, net, optimizer, ema, acc)
            train_step.sync()
        checkpoint = _save(plan, mgr, step, net, optimizer, ema, acc)
    finally:
        if bar is not None:
            bar.close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
        mgr.close()
    return status, step, last, checkpoint


def _finish(
    plan: _Plan, status: str, step: int, checkpoint: Path, last: dict[str, Any], net, ema, is_main: bool
) -> dict[str, Any]:
    """:func:`finetune`'s result; when completed, the final (and EMA) weights are saved, else the stop is printed."""
    from .hub import save_pretrained

    metrics = {k: v for k, v in last.items() if k not in ("step", "epoch")}  # the run's own step and epoch win
    result: dict[str, Any] = {
        "status": status,
        "step": step,
        "epoch": step / plan.steps_per_epoch,
        "checkpoint": str(checkpoint),
        **metrics,
    }
    if status == "completed":
        # every process reads the weights (a collective where they are split); process 0 writes them
        finals = {MODEL_DIR: _host_model(net)}
        if ema is not None:
            finals[EMA_MODEL_DIR] = _host_model(_ema_model(net, ema))
        for name, host_net in finals.items():
            key = "model_dir" if name == MODEL_DIR else "ema_model_dir"
            result[key] = str((plan.output / name).expanduser().resolve())
            if is_main:
                save_pretrained(host_net, plan.output / name, fmt="flax", force=True)
    elif status == "interrupted":
        print(f"stopped by SIGTERM at step {step}; checkpoint {checkpoint}; continue with resume=True", flush=True)
    else:
        print(f"stopped at step {step} (max_steps); checkpoint {checkpoint}", flush=True)
    return result


def _any_process(flag: bool, processes: int) -> bool:
    """``flag`` of any process (a collective with several processes: all must call it at the same step)."""
    if processes == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


def _ema_model(net, ema):
    """A copy of ``net`` holding the EMA weights."""
    from flax import nnx

    ema_net = nnx.clone(net)
    ema.copy_to(ema_net)
    return ema_net


def _host_model(net):
    """A copy of ``net`` whose arrays are host numpy arrays of the global values (for saving on any process)."""
    from flax import nnx

    from .distributed import to_host

    host_net = nnx.clone(net)
    nnx.update(host_net, to_host(nnx.state(net)))
    return host_net


def _end_epoch(net, ema, val_loader, mesh, acc, epoch, step, output: Path | None) -> dict[str, Any]:
    """Evaluate, and on the writing process (``output`` set) append the epoch's metrics and print them."""
    val = evaluate(net, val_loader, mesh)
    record = {
        "epoch": epoch,
        "step": step,
        "loss": acc["loss_sum"] / max(acc["steps"], 1),
        "train_top1": 100.0 * acc["top1"] / max(acc["n"], 1),
        "val_loss": val["loss"],
        "top1": val["top1"],
        "top5": val["top5"],
    }
    if ema is not None:
        ema_val = evaluate(_ema_model(net, ema), val_loader, mesh)
        record.update({f"ema_{k}" if k != "loss" else "ema_val_loss": v for k, v in ema_val.items()})
    if output is None:
        return record
    _append_jsonl(output / METRICS_FILE, record)
    line = (
        f"epoch {epoch} step {step}: train loss {record['loss']:.4f} | val loss {record['val_loss']:.4f} "
        f"top1 {record['top1']:.2f} top5 {record['top5']:.2f}"
    )
    if ema is not None:
        line += f" | ema top1 {record['ema_top1']:.2f}"
    print(line, flush=True)
    return record
