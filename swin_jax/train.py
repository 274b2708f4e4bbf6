"""Training utilities: timm's optimizer parameter groups, an optax AdamW, jitted train / eval steps, EMA.

The pieces mirror timm's training recipe for Swin:

* :func:`param_groups` gives each parameter the ``(lr_scale, weight_decay)`` that
  ``timm.optim.create_optimizer_v2(model, 'adamw', weight_decay=wd, layer_decay=ld)`` gives the timm
  model's parameter of the same name (timm's scheduler multiplies a group's lr by its ``lr_scale``).
* :func:`create_optimizer` builds the optax transformation: global-norm clipping, AdamW (decoupled weight
  decay masked per parameter, as ``torch.optim.AdamW``), the per-parameter layer-decay lr scale, a
  linear-warmup + cosine schedule, and optional gradient accumulation (``optax.MultiSteps``). Wrap it
  with ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
* :class:`TrainStep` is the fast training step: one jitted pure function over the flat arrays of the
  model, the optimizer and the EMA, with donated buffers (a few ms of host time per call for Swin-B,
  where an ``nnx.jit`` step spends ~70 ms walking the objects). :func:`train_step` is the same step
  as a convenient ``nnx.jit`` function, :func:`eval_step` its evaluation twin. Both use softmax
  cross-entropy with label smoothing (or soft targets) and return the loss and top-1 / top-5 counts.
  The mode is the caller's: call ``model.train()`` before training (drop path / dropout on, their RNG
  streams live in the model and advance every step) and ``model.eval()`` before evaluating.
* :class:`EMA` keeps an exponential moving average of the parameters.

Example::

    model = swin_jax.create_model("swin_tiny_patch4_window7_224", num_classes=10, drop_path_rate=0.1)
    tx = create_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.75, warmup_steps=100,
                          total_steps=10_000, clip_grad_norm=5.0)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    model.train()
    step = TrainStep(model, optimizer, label_smoothing=0.1, num_classes=10)
    for images, labels in loader:
        metrics = step((images, labels))
    step.sync()  # model and optimizer now hold the trained state
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .models import reverse_mode
from .weights import timm_name

__all__ = [
    "GroupSpec",
    "timm_param_names",
    "layer_ids",
    "param_groups",
    "create_schedule",
    "create_optimizer",
    "scale_by_param_name",
    "ScaleByParamNameState",
    "smooth_targets",
    "cross_entropy",
    "topk_correct",
    "train_step",
    "TrainStep",
    "eval_step",
    "EMA",
    "mixup_target",
    "mixup_cutmix",
]

# timm's SwinTransformer.group_matcher(coarse=False): (regex, suffix) per entry of the 'blocks' group; V2's is the
# same, V2-CR's names its stages ``stages`` (and has no final norm)
_BLOCKS_MATCHER = (
    (re.compile(r"^(?:layers|stages)\.(\d+).downsample"), (0,)),
    (re.compile(r"^(?:layers|stages)\.(\d+)\.\w+\.(\d+)"), None),
    (re.compile(r"^norm"), (99999,)),
)
_STEM_MATCHER = re.compile(r"^patch_embed")
_MATCH_PREV_GROUP = 99999  # timm.models._manipulate.MATCH_PREV_GROUP: joins the previous group


class GroupSpec(NamedTuple):
    """One parameter's optimizer settings: multiply the lr by ``lr_scale``; decoupled decay ``weight_decay``."""

    lr_scale: float
    weight_decay: float


def _key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_to_timm_name(path: tuple[Any, ...]) -> str:
    """A key path into a parameter tree (an ``nnx.State`` of Params or of raw arrays) -> the timm name."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]  # an nnx.Variable is a pytree node with a ``value`` leaf
    return timm_name([_key_str(k) for k in path])


def timm_param_names(model: nnx.Module) -> dict[str, int]:
    """timm name -> number of dimensions of every ``nnx.Param`` (in NNX state order)."""
    return {
        _path_to_timm_name(tuple(path)): len(var.shape) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def _grouping(name: str) -> tuple[float, ...]:
    """timm's ``group_with_matcher`` ordinal of a parameter name under Swin's group matcher."""
    if _STEM_MATCHER.match(name):
        return (0.0,)
    for regex, suffix in _BLOCKS_MATCHER:
        m = regex.match(name)
        if m:
            return tuple(float(v) for v in (1, *m.groups(), *(suffix or ())))
    return (math.inf,)  # the head: the last group


def layer_ids(names: Iterable[str]) -> dict[str, int]:
    """timm's layer id of each parameter name (``group_parameters(model, model.group_matcher(), reverse=True)``).

    The stem is layer 0, then every block in order (a stage's PatchMerging shares its first block's
    id), the final norm shares the last block's id, and the classifier head comes last.
    """
    names = list(names)
    ordinals = {n: _grouping(n) for n in names}
    out: dict[str, int] = {}
    lid = -1
    for key in sorted(set(ordinals.values())):
        if lid < 0 or key[-1] != _MATCH_PREV_GROUP:
            lid += 1
        for n in names:
            if ordinals[n] == key:
                out[n] = lid
    return out


def param_groups(model: nnx.Module, *, weight_decay: float, layer_decay: float | None = None) -> dict[str, GroupSpec]:
    """Each parameter's ``(lr_scale, weight_decay)`` as timm's ``create_optimizer_v2`` groups a timm Swin.

    No weight decay for 1-D parameters (norm scales / shifts, biases) and for ``model.no_weight_decay()``
    (the relative position bias tables); none at all if ``weight_decay`` is 0. With ``layer_decay``,
    ``lr_scale = layer_decay ** (num_layers - 1 - layer_id)`` with the layer ids of :func:`layer_ids`
    (so the head gets 1); without it every scale is 1.

    Args:
        model: a :class:`swin_jax.SwinTransformer` (any module whose NNX paths are timm names works).
        weight_decay: the decoupled weight decay of the decayed parameters.
        layer_decay: layer-wise lr decay factor, or None.

    Returns:
        timm name -> :class:`GroupSpec` (in NNX state order).
    """
    ndims = timm_param_names(model)
    no_wd = set(getattr(model, "no_weight_decay", lambda: set())())
    out = {}
    if layer_decay is None:
        for name, ndim in ndims.items():
            excluded = ndim <= 1 or name.endswith(".bias") or name in no_wd
            out[name] = GroupSpec(1.0, 0.0 if (not weight_decay or excluded) else float(weight_decay))
        return out
    ids = layer_ids(ndims)
    layer_max = max(ids.values())
    for name, ndim in ndims.items():
        excluded = ndim <= 1 or name in no_wd
        out[name] = GroupSpec(float(layer_decay ** (layer_max - ids[name])), 0.0 if excluded else float(weight_decay))
    return out


def _by_name(tree: Any, fn: Callable[[str], Any]) -> Any:
    return jax.tree_util.tree_map_with_path(lambda path, _: fn(_path_to_timm_name(tuple(path))), tree)


class ScaleByParamNameState(NamedTuple):
    """The distinct scales, ascending, as float32 scalars (layer decay has one per layer, not per parameter)."""

    scales: tuple[jax.Array, ...]


def scale_by_param_name(scales: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply each update by its parameter's scale (looked up by timm name; 1 where not listed).

    The scale values are optimizer state, not constants of the program: with a constant per parameter every
    parameter's update became its own kernel, and XLA compiled Swin-B's AdamW update with layer decay in 7-10 s
    instead of ~3 s (kernels of same-shaped parameters are shared when only their inputs differ). The state holds
    each distinct value once, so it adds a few scalars, not one per parameter. The product is the same, bit for
    bit."""
    values = sorted({1.0, *map(float, scales.values())})

    def init_fn(params: Any) -> ScaleByParamNameState:
        del params
        return ScaleByParamNameState(tuple(jnp.asarray(v, jnp.float32) for v in values))

    def update_fn(updates: Any, state: ScaleByParamNameState, params: Any = None) -> tuple[Any, ScaleByParamNameState]:
        del params

        def scale(path: Any, u: jax.Array) -> jax.Array:
            value = state.scales[values.index(float(scales.get(_path_to_timm_name(tuple(path)), 1.0)))]
            return u * value.astype(u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def create_schedule(*, lr: float, warmup_steps: int = 0, total_steps: int, min_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.

    ``optax.warmup_cosine_decay_schedule``: ``total_steps`` includes the warmup; the value at step 0 is
    ``lr`` when ``warmup_steps`` is 0.
    """
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=total_steps, end_value=min_lr
    )


def create_optimizer(
    model: nnx.Module,
    *,
    lr: float,
    weight_decay: float = 0.05,
    layer_decay: float | None = None,
    warmup_steps: int = 0,
    total_steps: int,
    min_lr: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    clip_grad_norm: float | None = None,
    grad_accum_steps: int = 1,
) -> optax.GradientTransformation:
    """timm's AdamW recipe as an optax transformation; use ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.

    The chain is: clip by global norm (optional) -> Adam moments (``betas``, ``eps``) -> decoupled weight
    decay on the parameters :func:`param_groups` decays -> lr schedule (:func:`create_schedule`) ->
    per-parameter layer-decay scale. One step equals ``torch.optim.AdamW`` on timm's parameter groups
    with each group's lr multiplied by its ``lr_scale`` (what timm's scheduler does). With
    ``grad_accum_steps > 1`` gradients are averaged over that many calls (``optax.MultiSteps``) and the
    parameters change only on every ``grad_accum_steps``-th; the schedule counts real updates.

    Args:
        model: the model to optimize (its parameter names define the groups).
        lr: peak learning rate.
        weight_decay: decoupled weight decay.
        layer_decay: layer-wise lr decay factor (e.g. 0.75), or None.
        warmup_steps: linear warmup steps (from 0).
        total_steps: schedule length in optimizer updates, warmup included.
        min_lr: the lr at the end of the cosine.
        betas: Adam's ``(beta1, beta2)``.
        eps: Adam's epsilon (added to ``sqrt(v_hat)``, as torch).
        clip_grad_norm: max global gradient norm, or None for no clipping.
        grad_accum_steps: micro-batches per update.
    """
    groups = param_groups(model, weight_decay=weight_decay, layer_decay=layer_decay)
    decay_mask = {n for n, g in groups.items() if g.weight_decay}
    scales = {n: g.lr_scale for n, g in groups.items() if g.lr_scale != 1.0}
    parts: list[optax.GradientTransformation] = []
    if clip_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_grad_norm))
    parts.append(optax.scale_by_adam(b1=betas[0], b2=betas[1], eps=eps))
    if weight_decay:
        parts.append(optax.add_decayed_weights(weight_decay, mask=lambda p: _by_name(p, lambda n: n in decay_mask)))
    parts.append(
        optax.scale_by_learning_rate(
            create_schedule(lr=lr, warmup_steps=warmup_steps, total_steps=total_steps, min_lr=min_lr)
        )
    )
    if scales:
        parts.append(scale_by_param_name(scales))
    tx = optax.chain(*parts)
    if grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps)
    return tx


# ----------------------------------------------------------------------------------------------------------
# Loss, metrics, steps
# ----------------------------------------------------------------------------------------------------------


def smooth_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """Integer labels -> ``(1 - s) * one_hot + s / num_classes`` (timm's smoothed one-hot / mixup_target)."""
    off = label_smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - label_smoothing) + off


def cross_entropy(
    logits: jax.Array, targets: jax.Array, *, num_classes: int, label_smoothing: float = 0.0
) -> jax.Array:
    """Mean softmax cross-entropy (computed in fp32).

    Integer ``targets`` ``[B]`` are smoothed (timm's ``LabelSmoothingCrossEntropy``; plain cross-entropy
    at 0); soft ``targets`` ``[B, C]`` are used as they are (timm's ``SoftTargetCrossEntropy``).
    """
    logits = logits.astype(jnp.float32)
    if targets.ndim == logits.ndim - 1:
        targets = smooth_targets(targets, num_classes, label_smoothing)
    return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def topk_correct(logits: jax.Array, targets: jax.Array, ks: tuple[int, ...] = (1, 5)) -> dict[str, jax.Array]:
    """``{'top1': n, 'top5': n}``: how many rows have their label among the k largest logits.

    Soft targets count their argmax as the label; k is capped at the number of classes.
    """
    labels = targets if targets.ndim == logits.ndim - 1 else jnp.argmax(targets, axis=-1)
    # rank of the label's logit = number of logits strictly greater (ties count in the label's favour)
    label_logit = jnp.take_along_axis(logits, labels[:, None].astype(jnp.int32), axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)
    return {f"top{k}": jnp.sum(rank < min(k, logits.shape[-1])) for k in ks}


def _loss_and_metrics(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    batch: tuple[jax.Array, jax.Array],
    label_smoothing: float,
    num_classes: int,
) -> dict[str, jax.Array]:
    """The step itself, on live NNX objects (traced once inside a jitted pure function). The model is traced in
    :func:`swin_jax.models.reverse_mode` (layers keep fewer tensors for the backward pass)."""
    images, targets = batch

    def loss_fn(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
        with reverse_mode():
            logits = model(images)
        return cross_entropy(logits, targets, num_classes=num_classes, label_smoothing=label_smoothing), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    return {"loss": loss, **topk_correct(logits, targets)}


_STEP_CACHE: list[tuple[tuple[Any, ...], tuple[Callable[..., Any], Callable[..., Any]]]] = []  # most recent first
_STEP_CACHE_SIZE = 16


def _pure_step(
    graphdef: Any,
    treedef: Any,
    ema_treedef: Any,
    label_smoothing: float,
    num_classes: int,
    ema_decay: float | None,
    ema_every: int,
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """Two jitted pure functions: one step and several steps in one call.

    The first is ``(leaves, ema_leaves, batch) -> (leaves, ema_leaves, metrics)``; the second takes
    ``batches`` with a leading steps axis and runs the same step once per slice (``lax.scan``), returning
    the metrics stacked along that axis. ``leaves`` are the flat arrays of ``nnx.split((model,
    optimizer))`` (parameters, RNG streams, optimizer state); the NNX graph is rebuilt from ``graphdef``
    only while tracing, so a call costs one dispatch of a flat list. Cached per graph and settings
    (compared with ``==``: a Swin's graph holds timm's dict attributes, so it cannot be hashed): every
    :class:`TrainStep` of the same model and optimizer structure and settings shares the compiled
    programs.
    """
    key = (graphdef, treedef, ema_treedef, label_smoothing, num_classes, ema_decay, ema_every)
    for i, (cached_key, fn) in enumerate(_STEP_CACHE):
        if cached_key == key:
            _STEP_CACHE.insert(0, _STEP_CACHE.pop(i))
            return fn

    def step(leaves: list[jax.Array], ema_leaves: list[jax.Array] | None, batch: Any) -> tuple[Any, Any, Any]:
        model, optimizer = nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves))
        metrics = _loss_and_metrics(model, optimizer, batch, label_smoothing, num_classes)
        new_leaves, new_treedef = jax.tree_util.tree_flatten(nnx.split((model, optimizer))[1])
        if new_treedef != treedef:  # a step that adds or drops state would silently misalign the leaves
            raise RuntimeError("the train step changed the structure of the model / optimizer state")
        if ema_leaves is not None:
            params = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
            # with gradient accumulation the parameters move on every ema_every-th call only
            decay = jnp.where(optimizer.step[...] % ema_every == 0, ema_decay, 1.0).astype(jnp.float32)
            ema_leaves = _ema_update(ema_leaves, params, decay)
        return new_leaves, ema_leaves, metrics

    def steps(leaves: list[jax.Array], ema_leaves: list[jax.Array] | None, batches: Any) -> tuple[Any, Any, Any]:
        def body(carry: tuple[Any, Any], batch: Any) -> tuple[tuple[Any, Any], Any]:
            leaves, ema_leaves, metrics = step(*carry, batch)
            return (leaves, ema_leaves), metrics

        (leaves, ema_leaves), metrics = jax.lax.scan(body, (leaves, ema_leaves), batches)
        return leaves, ema_leaves, metrics

    fns = (jax.jit(step, donate_argnums=(0, 1)), jax.jit(steps, donate_argnums=(0, 1)))
    _STEP_CACHE.insert(0, (key, fns))
    del _STEP_CACHE[_STEP_CACHE_SIZE:]
    return fns


def _committed(leaves: list[Any]) -> list[Any]:
    """``leaves`` committed to the devices they are on (no copy). A freshly initialized model's arrays are
    uncommitted and a restored checkpoint's are committed; jit lowers the two differently, so without this a
    resumed run compiles a different program than a fresh one (and neither reuses the other's cached one)."""
    return [jax.device_put(x, x.sharding) if isinstance(x, jax.Array) and not x.committed else x for x in leaves]


class TrainStep:
    """The fast training step: one jitted pure function over the flat state, buffers donated.

    It splits ``model`` and ``optimizer`` (and the ``ema``, if given) once, keeps their arrays as a
    flat list between calls and runs one compiled program per call: the NNX graph is walked only
    while tracing, never per step (Flax's performance guide: ``nnx.split`` outside the loop,
    ``jax.jit``, ``nnx.merge`` inside). The old buffers are donated to the new ones, so a step needs
    no second copy of the weights and the optimizer state.

    While the loop runs, ``model``, ``optimizer`` and ``ema`` are stale: call :meth:`sync` to write the
    current arrays back into them (before evaluating, saving or leaving the loop). After a sync they
    share the step's buffers, which the next call donates, so sync again after further steps before
    reading them. The model's mode (``model.train()`` / ``model.eval()``) when the step is created is
    the mode of every call.

    :meth:`run` takes several batches stacked along a leading axis and runs as many steps in one call, with the
    same results to the bit. On a CPU it is the faster loop: each call's temporaries (1.8 GB for Swin-B at
    batch 8) are one block that glibc maps afresh for every call, whose pages the kernel faults in and zeroes
    each time, and :meth:`run` pays that once for all its steps. Starting the process with
    ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (Linux) makes the kernel fault in 512 times fewer pages instead.
    Each gives Swin-B's CPU step ~10% (README, BENCHMARKS.md).

    Example::

        model.train()
        step = TrainStep(model, optimizer, num_classes=10, label_smoothing=0.1)
        for images, labels in loader:
            metrics = step((images, labels))      # {'loss', 'top1', 'top5'}
        step.sync()                               # model and optimizer hold the trained state

        for images, labels in loader_of_8_batches:  # images [8, B, H, W, 3], labels [8, B]
            metrics = step.run((images, labels))    # 8 steps; {'loss': [8], 'top1': [8], 'top5': [8]}

    Args:
        model: the model (already sharded with :func:`swin_jax.distributed.shard_model` for a mesh).
        optimizer: its ``nnx.Optimizer``.
        num_classes: classes of the targets.
        label_smoothing: smoothing of integer targets (soft targets are used as given).
        ema: an :class:`EMA` of the model, updated inside the same program.
        ema_every: fold the parameters into the EMA on every ``ema_every``-th call (the optimizer's
            gradient accumulation steps), as parameters change only then.
    """

    def __init__(
        self,
        model: nnx.Module,
        optimizer: nnx.Optimizer,
        *,
        num_classes: int,
        label_smoothing: float = 0.0,
        ema: EMA | None = None,
        ema_every: int = 1,
    ):
        if ema_every < 1:
            raise ValueError(f"ema_every must be >= 1, got {ema_every}")
        self.model, self.optimizer, self.ema = model, optimizer, ema
        graphdef, state = nnx.split((model, optimizer))
        self._leaves, self._treedef = jax.tree_util.tree_flatten(state)
        self._leaves = _committed(self._leaves)
        self._ema_leaves, self._ema_treedef = (None, None)
        if ema is not None:
            self._ema_leaves, self._ema_treedef = jax.tree_util.tree_flatten(ema.params)
            self._ema_leaves = _committed(self._ema_leaves)
        self._fn, self._steps_fn = _pure_step(
            graphdef,
            self._treedef,
            self._ema_treedef,
            float(label_smoothing),
            int(num_classes),
            None if ema is None else float(ema.decay),
            int(ema_every),
        )

    def __call__(self, batch: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
        """One optimizer step on ``batch = (images NHWC, labels [B] int or soft targets [B, C])``.

        Returns ``{'loss', 'top1', 'top5'}`` (loss before the update; counts) as device arrays.
        """
        self._leaves, self._ema_leaves, metrics = self._fn(self._leaves, self._ema_leaves, batch)
        return metrics

    def run(self, batches: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
        """``K`` optimizer steps in one call: ``batches = (images [K, B, H, W, 3], labels [K, B] or [K, B, C])``.

        The same steps as ``K`` calls on ``batches[0][i], batches[1][i]`` in order, with the same results to
        the bit (one compiled step run ``K`` times by a ``lax.scan``). Returns the metrics of each step
        stacked: ``{'loss': [K], 'top1': [K], 'top5': [K]}``.

        Why: each call's temporaries are allocated once and reused by all ``K`` steps, and the host
        dispatches once. On a CPU the temporaries are one fresh block per call (1.8 GB for Swin-B at batch 8)
        whose pages the kernel faults in and zeroes every time: with ``K = 8`` Swin-B's fp32 step goes from
        1.01x to 1.10x timm eager in one run (0.95x to 1.05x in another; 2-core AMD EPYC, BENCHMARKS.md).
        Costs: each ``K`` compiles its own program (once); inside the loop the weights' in-place update needs
        copies of the weights that the one-step program mostly avoids, 0.14 GB more temporaries for Swin-B
        (peak 4.1 GB against 3.8 at batch 8, the 8 stacked batches included; timm eager's is 4.3); and the
        host sees the metrics only after all ``K`` steps.
        """
        images = batches[0]
        if not hasattr(images, "ndim") or images.ndim != 5:
            raise ValueError(
                "run() takes batches stacked along a leading steps axis: images [K, B, H, W, 3], "
                f"got shape {getattr(images, 'shape', type(images).__name__)}"
            )
        self._leaves, self._ema_leaves, metrics = self._steps_fn(self._leaves, self._ema_leaves, batches)
        return metrics

    def sync(self) -> None:
        """Write the current state into ``model``, ``optimizer`` and ``ema``."""
        nnx.update((self.model, self.optimizer), jax.tree_util.tree_unflatten(self._treedef, self._leaves))
        if self.ema is not None:
            self.ema.params = jax.tree_util.tree_unflatten(self._ema_treedef, self._ema_leaves)


@nnx.jit(static_argnames=("label_smoothing", "num_classes"))
def train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    batch: tuple[jax.Array, jax.Array],
    *,
    label_smoothing: float = 0.0,
    num_classes: int,
) -> dict[str, jax.Array]:
    """One optimizer step on ``batch = (images NHWC, labels [B] int or soft targets [B, C])``.

    The convenient form of :class:`TrainStep` (the same computation): an ``nnx.jit`` function that
    walks the model and optimizer on every call (~70 ms of host time for Swin-B's ~1000 state arrays,
    against ~6-9 ms for :class:`TrainStep`; BENCHMARKS.md). Use it for a few steps; use
    :class:`TrainStep` in a loop.

    Runs in the model's current mode (call ``model.train()`` first for drop path / dropout; their RNG
    streams advance every call). Returns ``{'loss', 'top1', 'top5'}`` (loss before the update; counts).
    """
    return _loss_and_metrics(model, optimizer, batch, label_smoothing, num_classes)


@nnx.jit
def eval_step(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> dict[str, jax.Array]:
    """Loss (plain cross-entropy, or against soft targets) and top-1 / top-5 counts on ``batch``.

    Runs in the model's current mode: call ``model.eval()`` first for deterministic results.
    """
    images, targets = batch
    logits = model(images)
    loss = cross_entropy(logits, targets, num_classes=logits.shape[-1])
    return {"loss": loss, **topk_correct(logits, targets)}


# ----------------------------------------------------------------------------------------------------------
# Mixup / CutMix (timm's Mixup, mode='batch')
# ----------------------------------------------------------------------------------------------------------


def mixup_target(
    labels: jax.Array, num_classes: int, lam: jax.Array | float, label_smoothing: float = 0.0
) -> jax.Array:
    """timm's ``mixup_target``: ``lam * smoothed(labels) + (1 - lam) * smoothed(labels reversed over the batch)``."""
    y1 = smooth_targets(labels, num_classes, label_smoothing)
    return y1 * lam + y1[::-1] * (1.0 - lam)


def mixup_cutmix(
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    alpha_mixup: float = 0.8,
    alpha_cutmix: float = 1.0,
    num_classes: int = 1000,
    label_smoothing: float = 0.1,
    switch_prob: float = 0.5,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """timm's ``Mixup(mode='batch', prob=1, correct_lam=True)`` on NHWC images: jit-able.

    Each image is mixed with the image at the mirrored batch position. With both alphas > 0, CutMix is
    chosen with probability ``switch_prob``, else Mixup. Mixup: ``x * lam + x[::-1] * (1 - lam)`` with
    ``lam ~ Beta(alpha_mixup, alpha_mixup)``. CutMix: a box of area ``(1 - lam)`` of the image
    (``lam ~ Beta(alpha_cutmix, alpha_cutmix)``, centre uniform, clipped at the border) is pasted from
    ``x[::-1]``, and ``lam`` is corrected to the pasted area.

    Args:
        x: images ``[B, H, W, C]``.
        y: integer labels ``[B]``.
        key: a PRNG key.
        alpha_mixup: Mixup's Beta parameter (0 disables Mixup).
        alpha_cutmix: CutMix's Beta parameter (0 disables CutMix).
        num_classes: classes of the soft targets.
        label_smoothing: smoothing of the targets.
        switch_prob: probability of CutMix when both are enabled.

    Returns:
        ``(mixed images, soft targets [B, num_classes], lam)``.
    """
    if alpha_mixup <= 0 and alpha_cutmix <= 0:
        raise ValueError("mixup_cutmix needs alpha_mixup > 0 or alpha_cutmix > 0")
    k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(key, 5)
    if alpha_mixup > 0 and alpha_cutmix > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(alpha_cutmix > 0)
    lam_mix = jax.random.beta(k_mix, alpha_mixup, alpha_mixup) if alpha_mixup > 0 else jnp.float32(1.0)
    lam_cut = jax.random.beta(k_cut, alpha_cutmix, alpha_cutmix) if alpha_cutmix > 0 else jnp.float32(1.0)

    # CutMix box (timm's rand_bbox) and the area-corrected lam
    _, h, w, _ = x.shape
    ratio = jnp.sqrt(1.0 - lam_cut)
    cut_h, cut_w = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
    cy, cx = jax.random.randint(k_cy, (), 0, h), jax.random.randint(k_cx, (), 0, w)
    yl, yh = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + (cut_h + 1) // 2, 0, h)
    xl, xh = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + (cut_w + 1) // 2, 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
    lam_cut = 1.0 - (yh - yl) * (xh - xl) / (h * w)

    flipped = x[::-1]
    x_cut = jnp.where(box[None, :, :, None], flipped, x)
    x_mix = (x * lam_mix + flipped * (1.0 - lam_mix)).astype(x.dtype)
    lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
    return jnp.where(use_cutmix, x_cut, x_mix), mixup_target(y, num_classes, lam, label_smoothing), lam


# ----------------------------------------------------------------------------------------------------------
# EMA
# ----------------------------------------------------------------------------------------------------------


@jax.jit
def _ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)


class EMA:
    """An exponential moving average of a model's parameters: ``ema = decay * ema + (1 - decay) * params``.

    Example::

        ema = EMA(model, decay=0.9998)
        ... after each train_step: ema.update(model)
        ema.copy_to(eval_model)  # or nnx.update(eval_model, ema.params)
    """

    def __init__(self, model: nnx.Module, decay: float = 0.9998):
        self.decay = float(decay)
        self.params: nnx.State = jax.tree_util.tree_map(jnp.array, nnx.state(model, nnx.Param))  # a copy

    def update(self, model: nnx.Module) -> None:
        """Fold the model's current parameters into the average."""
        self.params = _ema_update(self.params, nnx.state(model, nnx.Param), jnp.float32(self.decay))

    def copy_to(self, model: nnx.Module) -> None:
        """Write the averaged parameters into ``model`` (same architecture)."""
        nnx.update(model, jax.tree_util.tree_map(jnp.array, self.params))
