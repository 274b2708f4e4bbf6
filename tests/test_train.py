"""swin_jax.train against timm / torch: gradients, timm's optimizer groups, one AdamW step, the steps."""

from __future__ import annotations

import copy
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm.loss
import timm.optim
import torch
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from parity import (
    FP32_REL_TOL,
    adamw_divergence_bound,
    assert_grads_close,
    grads_as_timm,
    images,
    jax_from_timm,
    jax_grads,
    rel_err,
    timm_grads,
    timm_model,
)

import swin_jax
from swin_jax import attention
from swin_jax.models import reverse_mode
from swin_jax.models._layers import Linear, Mlp, PatchEmbed, layer_norm
from swin_jax.train import (
    EMA,
    TrainStep,
    create_optimizer,
    create_schedule,
    cross_entropy,
    eval_step,
    mixup_cutmix,
    mixup_target,
    param_groups,
    scale_by_param_name,
    topk_correct,
    train_step,
)
from swin_jax.weights import load_timm_state_dict, to_timm_state_dict

ARCH = "swin_tiny_patch4_window7_224"
# the small parity model: 64 px -> 16x16 patches; windows of 4 (shifted in stages 0-2, clamped at 2x2 in stage 3)
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), img_size=64, window_size=4, num_classes=10)
# a tinier JAX-only model for the training-step tests (each step function compiles per model / optimizer; the
# shifted blocks are covered by the parity tests above): one block per stage
TINY = dict(embed_dim=16, depths=(1, 1), num_heads=(2, 2), img_size=32, window_size=4, num_classes=10)
LABELS = np.array([3, 7, 0, 9])


@pytest.fixture(scope="module")
def pair():
    tm = timm_model(ARCH, **SMALL)
    return tm, jax_from_timm(tm, ARCH, **SMALL)


@pytest.fixture(scope="module")
def batch():
    return images((4, 64, 64, 3), seed=1), LABELS


@nnx.jit
def _apply(model: nnx.Module, optimizer: nnx.Optimizer, grads: nnx.State) -> None:
    """``optimizer.update`` compiled once (eager, each of its hundreds of ops would compile on its own)."""
    optimizer.update(model, grads)


def _assert_update_close(new, old, ref_new, ref_old, tol: float, what: str) -> None:
    """The update ``new - old`` within ``tol * max|ref update|`` of ``ref_new - ref_old``, plus the fp32 rounding
    of storing ``old + update`` (2 ulps of the parameter): small layer-decayed updates of O(1) weights lose
    digits there."""
    d_ours = np.asarray(new, np.float64) - old
    d_ref = np.asarray(ref_new, np.float64) - ref_old
    bound = tol * np.abs(d_ref).max() + 2 * np.spacing(np.abs(ref_new).max())
    err = np.abs(d_ours - d_ref).max()
    assert err <= bound, f"{what}: update error {err:.3e} > {bound:.3e} (max update {np.abs(d_ref).max():.3e})"


def _from_timm(model: nnx.Module, timm_arrays: dict[str, np.ndarray]) -> nnx.State:
    """timm-named arrays (e.g. torch's ``.grad``) as the model's ``nnx.Param`` state."""
    holder = nnx.clone(model)
    load_timm_state_dict(holder, timm_arrays)
    return nnx.state(holder, nnx.Param)


def _tiny(**kw) -> swin_jax.SwinTransformer:
    return swin_jax.create_model(ARCH, **{**TINY, **kw}, rngs=nnx.Rngs(0))


def _tiny_batch(n: int = 4, seed: int = 2) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(images((n, 32, 32, 3), seed=seed)), jnp.asarray(np.arange(n) % 10)


# ----------------------------------------------------------------------------------------------------------
# parity with timm / torch
# ----------------------------------------------------------------------------------------------------------


def test_gradients_match_timm(pair, batch):
    tm, model = pair
    assert_grads_close(grads_as_timm(model, jax_grads(model, *batch)), timm_grads(tm, *batch))


def test_layer_decay_scales_are_data_not_program():
    """The per-parameter lr scales live in the optimizer state: the update compiles to the same program whatever
    their values (constants made every parameter's update its own kernel: Swin-B's AdamW update compiled in 7-10 s
    instead of ~3 s), and each update is scaled by its own parameter's value."""
    model = _tiny()
    params = nnx.state(model, nnx.Param)

    def program(layer_decay: float) -> str:
        tx = create_optimizer(model, lr=1e-3, total_steps=10, layer_decay=layer_decay)
        return jax.jit(tx.update).lower(params, tx.init(params), params).as_text()

    assert program(0.75) == program(0.5)
    scales = {"head.fc.weight": 3.0, "layers.0.blocks.0.attn.qkv.bias": 0.5}
    tx = scale_by_param_name(scales)
    ones = jax.tree.map(jnp.ones_like, params)
    got = grads_as_timm(model, jax.jit(tx.update)(ones, tx.init(params))[0])  # the updates, timm-named
    for name, value in got.items():
        np.testing.assert_array_equal(value, np.full_like(value, scales.get(name, 1.0)), err_msg=name)


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_param_groups_match_timm(pair, layer_decay):
    tm, model = pair
    opt = timm.optim.create_optimizer_v2(tm, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=layer_decay)
    names = {id(p): n for n, p in tm.named_parameters()}
    ref = {names[id(p)]: (g.get("lr_scale", 1.0), g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    ours = param_groups(model, weight_decay=0.05, layer_decay=layer_decay)
    assert set(ours) == {n for n, _ in tm.named_parameters()}
    for name, (scale, wd) in ref.items():
        assert ours[name].lr_scale == pytest.approx(scale, rel=1e-12), name
        assert ours[name].weight_decay == wd, name
    if layer_decay:  # stem, 8 blocks (downsample with its stage's first block, final norm with the last), head
        assert len({g.lr_scale for g in ours.values()}) == 10
        assert ours["head.fc.weight"].lr_scale == 1.0 and ours["norm.weight"].lr_scale == 0.75
        assert ours["layers.1.downsample.reduction.weight"] == ours["layers.1.blocks.0.attn.qkv.weight"]
        assert ours["layers.0.blocks.0.attn.relative_position_bias_table"].weight_decay == 0.0


def test_adamw_steps_match_torch(pair, batch):
    """Two AdamW steps with layer decay 0.75, the weight-decay mask and grad clipping equal torch.optim.AdamW
    on timm's groups (each group's lr = the schedule's lr * lr_scale, as timm's scheduler sets it).

    Both optimizers get timm's gradients (the gradients themselves are compared above): Adam's
    ``g / (|g| + eps)`` turns fp32 noise in gradients that are 0 in exact arithmetic (the key bias) into O(1)
    differences of the update, which says nothing about the optimizer."""
    lr, clip = 1e-3, 0.5
    tm = copy.deepcopy(pair[0])  # (the JAX model may share memory with pair[0]'s tensors: leave those alone)
    model = nnx.clone(pair[1])
    topt = timm.optim.create_optimizer_v2(tm, "adamw", lr=lr, weight_decay=0.05, layer_decay=0.75)
    tx = create_optimizer(model, lr=lr, weight_decay=0.05, layer_decay=0.75, total_steps=100, clip_grad_norm=clip)
    sched = create_schedule(lr=lr, total_steps=100)
    assert float(sched(0)) == pytest.approx(lr, rel=1e-7)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    before = to_timm_state_dict(model)
    x2 = images((4, 64, 64, 3), seed=3)
    for step, x in enumerate((batch[0], x2)):
        for g in topt.param_groups:  # what timm's scheduler does: the schedule's lr times the group's scale
            g["lr"] = float(sched(step)) * g["lr_scale"]
        tbefore = {n: p.detach().numpy().copy() for n, p in tm.named_parameters()}
        old = to_timm_state_dict(model)
        grads = _from_timm(model, timm_grads(tm, x, batch[1]))
        norm = torch.nn.utils.clip_grad_norm_(tm.parameters(), clip)
        assert float(norm) > clip  # clipping is active
        topt.step()
        _apply(model, optimizer, grads)
        ours = to_timm_state_dict(model)
        for name, p in tm.named_parameters():
            ref = p.detach().numpy()
            _assert_update_close(ours[name], old[name], ref, tbefore[name], 1e-4, name)
            assert rel_err(ours[name], ref) <= 1e-5, name
    # the layer decay and the weight decay mask did something: the stem moved less than the head
    moved = {n: np.abs(ours[n] - before[n]).max() for n in ("patch_embed.proj.weight", "head.fc.weight")}
    assert moved["patch_embed.proj.weight"] < moved["head.fc.weight"]


def test_label_smoothing_matches_hand_formula_and_timm():
    rng = np.random.default_rng(0)
    logits, y, s, c = rng.standard_normal((6, 10)).astype(np.float32), rng.integers(0, 10, 6), 0.1, 10
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    hand = np.mean(-(1 - s) * logp[np.arange(6), y] - s / c * logp.sum(-1))
    ours = float(cross_entropy(jnp.asarray(logits), jnp.asarray(y), num_classes=c, label_smoothing=s))
    assert ours == pytest.approx(hand, rel=1e-6)
    ref = timm.loss.LabelSmoothingCrossEntropy(s)(torch.from_numpy(logits), torch.from_numpy(y))
    assert ours == pytest.approx(float(ref), rel=1e-6)
    soft = rng.dirichlet(np.ones(c), 6).astype(np.float32)
    ref = timm.loss.SoftTargetCrossEntropy()(torch.from_numpy(logits), torch.from_numpy(soft))
    assert float(cross_entropy(jnp.asarray(logits), jnp.asarray(soft), num_classes=c)) == pytest.approx(
        float(ref), rel=1e-6
    )
    plain = float(cross_entropy(jnp.asarray(logits), jnp.asarray(y), num_classes=c))
    assert plain == pytest.approx(
        float(torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y)))
    )


def test_topk_counts_match_timm_accuracy():
    rng = np.random.default_rng(1)
    logits, y = rng.standard_normal((32, 10)).astype(np.float32), rng.integers(0, 10, 32)
    top1, top5 = timm.utils.accuracy(torch.from_numpy(logits), torch.from_numpy(y), topk=(1, 5))
    ours = topk_correct(jnp.asarray(logits), jnp.asarray(y))
    assert int(ours["top1"]) == round(float(top1) * 32 / 100) and int(ours["top5"]) == round(float(top5) * 32 / 100)
    # soft targets count their argmax; fewer than 5 classes cap k
    assert int(topk_correct(jnp.asarray(logits), jax.nn.one_hot(jnp.asarray(y), 10))["top1"]) == int(ours["top1"])
    assert int(topk_correct(jnp.asarray(logits[:, :3]), jnp.asarray(y % 3))["top5"]) == 32


def test_schedule_warmup_cosine():
    sched = create_schedule(lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)
    assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5)), rel=1e-6)
    assert float(sched(110)) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        create_schedule(lr=1.0, warmup_steps=10, total_steps=10)


# ----------------------------------------------------------------------------------------------------------
# the steps
# ----------------------------------------------------------------------------------------------------------


def test_train_step_reduces_loss_and_eval_step():
    model = _tiny()
    optimizer = nnx.Optimizer(model, create_optimizer(model, lr=2e-3, total_steps=50), wrt=nnx.Param)
    batch = _tiny_batch()
    model.eval()
    first = eval_step(model, batch)
    logits = nnx.jit(lambda m, x: m(x))(model, batch[0])  # (jit: an eager forward compiles every op, ~5 s)
    assert float(first["loss"]) == pytest.approx(float(cross_entropy(logits, batch[1], num_classes=10)))
    model.train()
    losses = [float(train_step(model, optimizer, batch, label_smoothing=0.1, num_classes=10)["loss"]) for _ in range(6)]
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses
    model.eval()
    last = eval_step(model, batch)
    assert float(last["loss"]) < float(first["loss"])
    assert 0 <= int(last["top1"]) <= int(last["top5"]) <= 4


def test_bf16_compute_trains_with_fp32_master_weights():
    """dtype=bfloat16 computes in bf16 (softmax and LayerNorm statistics in fp32) while the parameters and
    the optimizer state stay fp32; the loss goes down as in fp32."""
    batch = _tiny_batch()
    losses = {}
    for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
        model = _tiny(dtype=dtype)
        optimizer = nnx.Optimizer(model, create_optimizer(model, lr=2e-3, total_steps=50), wrt=nnx.Param)
        model.train()
        # (label smoothing as in the test above: the fp32 step is then the program compiled there)
        step = [train_step(model, optimizer, batch, label_smoothing=0.1, num_classes=10) for _ in range(6)]
        losses[name] = [float(m["loss"]) for m in step]
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
        assert nnx.eval_shape(lambda m: m(batch[0]), model).dtype == (jnp.bfloat16 if name == "bf16" else jnp.float32)
    assert losses["bf16"][-1] < 0.9 * losses["bf16"][0], losses
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=5e-2)


def test_grad_accumulation_equals_one_big_step():
    """Two micro-batches of 4 with ``grad_accum_steps=2`` make the update of one step on the batch of 8.

    Exactly comparable: the mean of the micro-batch gradients and the large batch's gradient, at the parity
    tolerance (only the order of the fp32 sums differs). The parameters after the update are within
    :func:`parity.adamw_divergence_bound` for gradients that differ by that tolerance (twice it: clipping rescales
    both gradients by factors whose relative difference is that of their norms). ``eps=1e-3`` keeps Adam's update
    Lipschitz in the gradient, so the fp32 noise of gradients that are 0 in exact arithmetic (the key bias) is
    not blown up. An injected bug, the head's learning rate 5% high, fails the same check."""
    x, y = _tiny_batch(8)
    halves = (slice(0, 4), slice(4, 8))
    kw = dict(lr=1e-3, layer_decay=0.75, total_steps=20, clip_grad_norm=1.0, eps=1e-3)
    accum, single, buggy = _tiny(), _tiny(), _tiny()
    groups = param_groups(single, weight_decay=0.05, layer_decay=0.75)
    lr0 = float(create_schedule(lr=1e-3, total_steps=20)(0))
    start = to_timm_state_dict(accum)
    full = jax_grads(single, x, y)
    g_full, g_a, g_b = (
        grads_as_timm(single, full),
        *(grads_as_timm(single, jax_grads(single, x[s], y[s])) for s in halves),
    )
    for name in g_full:
        assert rel_err((g_a[name] + g_b[name]) / 2, g_full[name]) <= FP32_REL_TOL, name

    opt_a = nnx.Optimizer(accum, create_optimizer(accum, **kw, grad_accum_steps=2), wrt=nnx.Param)
    opt_s = nnx.Optimizer(single, create_optimizer(single, **kw), wrt=nnx.Param)
    opt_b = nnx.Optimizer(buggy, create_optimizer(buggy, **kw), wrt=nnx.Param)
    # the bug as optimizer state (the lr scales of scale_by_param_name, last in the chain, sorted): under layer decay
    # the head alone has scale 1, the largest. The buggy update is then opt_s's program (compiled once)
    assert sorted(n for n, g in groups.items() if g.lr_scale == 1.0) == ["head.fc.bias", "head.fc.weight"]
    head_scale = opt_b.opt_state[-1].scales[-1]
    assert float(head_scale.get_value()) == 1.0
    head_scale.set_value(jnp.asarray(1.05, jnp.float32))
    train_step(accum, opt_a, (x[:4], y[:4]), num_classes=10)
    assert all(np.array_equal(v, start[k]) for k, v in to_timm_state_dict(accum).items())  # no update yet
    train_step(accum, opt_a, (x[4:], y[4:]), num_classes=10)
    # the big batch's step (train_step's update of its gradient; compiled without the forward, which is checked above)
    _apply(single, opt_s, full)
    _apply(buggy, opt_b, full)

    def problems(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> list[str]:
        out = []
        for name in ref:
            bound = adamw_divergence_bound(
                [2 * FP32_REL_TOL * np.abs(g_full[name]).max()],
                [lr0 * groups[name].lr_scale],
                eps=1e-3,
                weight_decay=groups[name].weight_decay,
                param_max=max(np.abs(ref[name]).max(), np.abs(start[name]).max()),
            )
            if np.abs(got[name].astype(np.float64) - ref[name]).max() > bound:
                out.append(name)
        return out

    assert problems(to_timm_state_dict(accum), to_timm_state_dict(single)) == []
    assert sorted(problems(to_timm_state_dict(buggy), to_timm_state_dict(single))) == ["head.fc.bias", "head.fc.weight"]


def _largest_fusion_and_grads(model: nnx.Module, x: jax.Array, y: jax.Array) -> tuple[int, list[np.ndarray]]:
    graphdef, state = nnx.split(model)
    grad = jax.jit(jax.grad(lambda s: cross_entropy(nnx.merge(graphdef, s)(x), y, num_classes=10)))
    hlo = grad.lower(state).compile().as_text()
    sizes = [
        len(re.findall(r"\n  %\S+ = ", body))
        for body in re.findall(r"\n%fused_computation[^\n]*\{(.*?)\n\}", hlo, re.S)
    ]
    return max(sizes), [np.asarray(g) for g in jax.tree.leaves(grad(state))]


def test_backward_is_cut_per_block_and_gradients_unchanged(monkeypatch):
    """XLA:CPU fuses a chain of elementwise producers into each of its consumers. The residual stream's gradient
    is such a chain, so without ``model.materialize_grad`` every block's fusions recomputed it from the last
    block down: the largest fused computation of an 8-block stage's backward has 437 instructions (measured; 576
    before LayerNorm got its closed-form derivative) and grows with depth (Swin-B's training step took 1.9x as
    long). With the cut it stays one block's size (110 measured; 250 allowed, and under a third of the uncut). The
    gradients are the same up to fp32 summation order (measured 5e-7 relative,
    allowed the parity tolerance 1e-5)."""
    model = swin_jax.create_model(ARCH, **{**TINY, "depths": (1, 8), "num_heads": (1, 2)}, rngs=nnx.Rngs(0))
    x, y = _tiny_batch(2)
    monkeypatch.setenv("SWIN_JAX_BACKWARD_CUT", "cpu")
    cut, grads_cut = _largest_fusion_and_grads(model, x, y)
    monkeypatch.setenv("SWIN_JAX_BACKWARD_CUT", "never")
    uncut, grads = _largest_fusion_and_grads(model, x, y)
    assert cut <= 250 and 3 * cut <= uncut, (cut, uncut)
    for a, b in zip(grads_cut, grads):
        assert rel_err(a, b) <= FP32_REL_TOL
    monkeypatch.setenv("SWIN_JAX_BACKWARD_CUT", "sometimes")
    with pytest.raises(ValueError, match="SWIN_JAX_BACKWARD_CUT must be"):
        _largest_fusion_and_grads(model, x, y)


def test_closed_form_derivatives_are_autodiffs():
    """LayerNorm (``_layers.layer_norm``), the attention softmax (``attention.softmax``) and the position bias' add
    (``attention.add_bias``) carry their own derivative rules, for speed and memory on the CPU (BENCHMARKS.md).
    Their values are the plain formulas' bit for bit. Their gradients and forward-mode derivatives are the plain
    formulas' autodiff: in float64 to 1e-12, where no rounding could hide a wrong or missing term, and in float32
    within the parity tolerance. On the CPU the bias' gradient is a product with ones, not a reduction."""

    def plain_layer_norm(x, scale, bias, eps):  # nnx.LayerNorm's formula (two-pass variance)
        c = x - x.mean(-1, keepdims=True)
        return c * (jax.lax.rsqrt(jnp.square(c).mean(-1, keepdims=True) + eps) * scale) + bias

    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        for dtype, tol in ((np.float64, 1e-12), (np.float32, FP32_REL_TOL)):
            ln_args = (rng.normal(1, 3, (2, 5, 7, 12)), rng.normal(1, 0.5, 12), rng.normal(0, 1, 12))
            logits, bias = rng.normal(0, 4, (6, 3, 9, 9)), rng.normal(0, 1, (3, 9, 9))
            cases = [
                (lambda x, s, b: layer_norm(x, s, b, 1e-5), lambda x, s, b: plain_layer_norm(x, s, b, 1e-5), ln_args),
                (attention.softmax, lambda z: jax.nn.softmax(z, axis=-1), (logits,)),
                (attention.add_bias, lambda z, b: z + b[None], (logits, bias)),
            ]
            for ours, plain, args in cases:
                args = tuple(jnp.asarray(a, dtype) for a in args)
                weights = jnp.asarray(rng.normal(size=plain(*args).shape), dtype)
                assert np.array_equal(jax.jit(ours)(*args), jax.jit(plain)(*args))

                def loss(f, weights=weights):
                    return lambda *xs: jnp.sum(jnp.sin(f(*xs)) * weights)

                argnums = tuple(range(len(args)))
                for got, want in zip(
                    jax.jit(jax.grad(loss(ours), argnums))(*args), jax.jit(jax.grad(loss(plain), argnums))(*args)
                ):
                    assert rel_err(got, want) <= tol
                tangents = tuple(jnp.asarray(rng.normal(size=a.shape), dtype) for a in args)
                # (jit: one compile per derivative; op by op, jvp compiled each of its ops: ~3 s in all)
                ours_jvp, plain_jvp = (jax.jit(lambda a, t, f=f: jax.jvp(f, a, t)[1]) for f in (ours, plain))
                assert rel_err(ours_jvp(args, tangents), plain_jvp(args, tangents)) <= tol
    z, b = jnp.zeros((6, 3, 9, 9)), jnp.zeros((3, 9, 9))
    bias_grad = jax.jit(jax.grad(lambda b: jnp.sum(attention.add_bias(z, b) ** 2)))
    assert " dot(" in bias_grad.lower(b).compile().as_text()


def test_mlp_keeps_two_hidden_size_tensors_for_the_backward_and_one_in_reverse_mode(capsys):
    """The MLP's GELU is recomputed in the backward pass: of its hidden-size tensors only fc1's output and the GELU's
    (fc2's input) are kept. Differentiated directly, GELU's derivative kept three more (x / 2, exp(-x^2 / 2),
    1 + erf): the largest residuals of a block, 0.39 GB of Swin-B's training temporaries.

    Traced in ``reverse_mode()`` (as the training steps trace it), the GELU's output is recomputed too, from fc1's
    output: one hidden-size tensor is kept, and the compiled gradient's temporaries shrink by about one such tensor
    (XLA:CPU would merge a plain recomputation with the forward's; 0.38 GB of Swin-B's). Values are the same to the
    bit, gradients the same up to rounding. Outside it forward mode works; inside, it is refused."""
    mlp = Mlp(8, 32, dtype=None, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(mlp)

    def f(s, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, s)(x)) * jnp.arange(8.0))

    def hidden_kept(x: jax.Array) -> int:
        capsys.readouterr()
        print_saved_residuals(f, state, x)
        shapes = re.findall(r"^f32\[([\d,]+)\]", capsys.readouterr().out, re.M)
        # Linear folds leading axes, so a tensor may be kept as [2, 5, 32] or [10, 32]
        return len([s for s in shapes if s.endswith(",32") and math.prod(map(int, s.split(","))) == x.size * 4])

    x = jnp.ones((2, 5, 8))  # only the kept tensors' shapes are read
    assert hidden_kept(x) == 2
    with reverse_mode():
        assert hidden_kept(x) == 1

    big = jnp.asarray(np.random.default_rng(0).normal(size=(64, 64, 8)), jnp.float32)  # hidden tensor: 512 KiB

    def compiled_grad(x: jax.Array) -> jax.stages.Compiled:  # (the gradients are computed by these programs too)
        return jax.jit(jax.grad(f, argnums=(0, 1))).lower(state, x).compile()

    def temporaries(compiled: jax.stages.Compiled) -> int:
        return compiled.memory_analysis().temp_size_in_bytes

    plain = compiled_grad(big)
    plain_temps, plain_value, plain_grads = temporaries(plain), f(state, big), plain(state, big)
    with reverse_mode():
        reverse = compiled_grad(big)
        assert temporaries(reverse) <= plain_temps - 0.75 * big.size * 4 * 4
        assert f(state, big) == plain_value
        grads = reverse(state, big)
        with pytest.raises(TypeError, match="forward-mode"):
            jax.jvp(lambda x: f(state, x), (big,), (big,))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(plain_grads)):
        assert rel_err(got, want) < 1e-6
    jax.jvp(lambda x: f(state, x), (big,), (big,))


@functools.cache
def _reverse_mode_runs(scan: bool, ckpt: bool) -> tuple[list[jax.Array], list[nnx.State], list[nnx.State], int]:
    """Two successive gradient computations of a training loss traced in ``reverse_mode()`` (as the training steps
    trace it) on one model in train mode with drop path (rates differing per block; the RNG streams carried from the
    first call into the second), its blocks scanned or not, checkpointed or not: the losses, the gradients, the
    advanced non-parameter state (RNG streams) after each call, and the compiled program's temporaries in bytes.
    Cached: the scan test and the checkpointing tests compare these runs (one compiled program per setting)."""
    x, y = _tiny_batch()
    model = _tiny(depths=(2, 4), num_heads=(2, 2), drop_path_rate=0.3)
    model.train()
    model.set_scan_blocks(scan)
    model.set_grad_checkpointing(ckpt)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(m: nnx.Module) -> jax.Array:
        with reverse_mode():
            return cross_entropy(m(x), y, num_classes=10)

    def step(p, r):
        m = nnx.merge(graphdef, p, r)
        value, grads = nnx.value_and_grad(loss_fn)(m)
        return value, grads, nnx.state(m, nnx.Not(nnx.Param))

    compiled = jax.jit(step).lower(params, rest).compile()
    values, grads, rests = [], [], []
    for _ in range(2):
        value, g, rest = compiled(params, rest)
        values.append(value)
        grads.append(g)
        rests.append(rest)
    return values, grads, rests, compiled.memory_analysis().temp_size_in_bytes


def _assert_same_rng_state(a: nnx.State, b: nnx.State) -> None:
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        np.testing.assert_array_equal(v, u)


# the tests that compare _reverse_mode_runs run on one xdist worker, which computes each run once
REVERSE_MODE_RUNS = pytest.mark.xdist_group("reverse_mode_runs")


@REVERSE_MODE_RUNS
@pytest.mark.parametrize("scan", [False, True])
def test_gradient_checkpointing_in_reverse_mode_saves_memory_on_the_cpu_too(scan):
    """``set_grad_checkpointing`` in a ``reverse_mode()`` trace (the training steps) recomputes each block from its
    input in the backward pass through a custom rule XLA:CPU cannot merge back into the forward (with ``nnx.remat``
    it did, and kept every activation): the compiled gradient's temporaries shrink. With drop path on, the loss,
    the gradients and the advanced RNG streams equal those without checkpointing (same masks); blocks run by a scan
    as well."""
    (v0, g0, r0, t0), (v1, g1, r1, t1) = _reverse_mode_runs(scan, False), _reverse_mode_runs(scan, True)
    assert t1 < 0.8 * t0, (t1, t0)
    assert rel_err(v1[0], v0[0]) < 1e-6
    for a, b in zip(jax.tree.leaves(g0[0]), jax.tree.leaves(g1[0])):
        assert rel_err(b, a) <= 1e-5
    _assert_same_rng_state(r0[0], r1[0])
    assert jax.tree.leaves(r0[0])  # the drop path streams are there, and advanced alike


@pytest.mark.parametrize(
    "name, kw",
    [
        (ARCH, {}),
        (ARCH, {"attn_impl": "pallas"}),  # the kernel (interpreted here) with plain JAX's tangent
        (ARCH, {"attn_impl": "pallas_fused"}),
        ("swinv2_tiny_window8_256", {"window_size": 4}),
        ("swinv2_cr_tiny_224", {"window_size": 4}),
    ],
)
def test_models_support_forward_mode_differentiation(name, kw):
    """``jax.jvp`` (and so ``jax.linearize`` and ``jax.jacfwd``) works through every family, with respect to the
    input and to the parameters, and agrees with reverse mode: ``<g, J v> == <J^T g, v>`` for random ``v`` and ``g``.
    (Layers whose derivatives are reverse-mode only are used inside ``reverse_mode()`` alone.)"""
    model = swin_jax.create_model(name, **{**TINY, **kw}, rngs=nnx.Rngs(0))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    x = jnp.asarray(images((2, 32, 32, 3), seed=3))
    rng = np.random.default_rng(0)
    v_x = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    v_s = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), state)

    def f(s, x):
        return nnx.merge(graphdef, s, rest)(x)

    g = jnp.asarray(rng.normal(size=(x.shape[0], model.num_classes)), jnp.float32)

    @jax.jit
    def both_sides(state, x, v_s, v_x, g):
        t = jax.jvp(f, (state, x), (v_s, v_x))[1]
        g_s, g_x = jax.vjp(f, state, x)[1](g)
        flat = zip(jax.tree.leaves(g_s), jax.tree.leaves(v_s))
        return jnp.vdot(g, t), jnp.vdot(g_x, v_x) + sum(jnp.vdot(a, b) for a, b in flat)

    lhs, rhs = map(float, both_sides(state, x, v_s, v_x, g))
    assert abs(lhs - rhs) <= 1e-4 * (abs(lhs) + abs(rhs)), (lhs, rhs)


@pytest.mark.parametrize("cls", [Linear, nnx.Linear])
def test_linear_kernel_gradient_is_computed_without_a_transpose(cls):
    """``Linear`` folds the leading axes of its input, so its kernel's gradient is one rank-2 dot that XLA:CPU runs
    as it is. ``nnx.Linear`` on a ``[B, H, W, C]`` input leaves a transpose in the compiled gradient, which XLA fuses
    into the input's producer (here LayerNorm), reading with a stride: Swin-B's step was 6.6% slower."""
    graphdef, state = nnx.split(cls(8, 16, rngs=nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 8)), jnp.float32)

    def loss(state, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(layer_norm(x, jnp.ones(8), jnp.zeros(8), 1e-5))))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    transposes = grad.lower(state, x).compile().as_text().count(" transpose(")
    assert transposes == (0 if cls is Linear else 1)
    np.testing.assert_allclose(cls(8, 16, rngs=nnx.Rngs(0))(x), nnx.Linear(8, 16, rngs=nnx.Rngs(0))(x), rtol=1e-6)


def test_patch_embedding_kernel_gradient_is_a_matmul_in_a_loop_too():
    """PatchEmbed's conv computes nnx.Conv's values to the bit, its input and bias gradients to the bit, and its kernel
    gradient as one matmul of the image patches (the same sums in another order). Inside a lax.scan (TrainStep.run),
    XLA:CPU left autodiff's kernel-gradient convolution in a layout it runs ~30x slower; with the matmul the compiled
    loop has the forward's convolution only. A conv that is not a patchify conv takes lax's own path."""
    embed = PatchEmbed(4, 3, 16, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    plain = nnx.Conv(3, 16, kernel_size=(4, 4), strides=(4, 4), padding="VALID", rngs=nnx.Rngs(1))
    nnx.update(plain, nnx.state(embed.proj))
    x = jnp.asarray(images((2, 30, 34, 3), seed=4))  # 30 x 34: VALID drops the last rows and columns

    def loss(conv, x):
        return jnp.sum(jnp.sin(conv(x)) * jnp.arange(16.0))

    assert jnp.array_equal(embed.proj(x), plain(x))
    (g_conv, g_x), (g_ref, g_x_ref) = (nnx.grad(loss, argnums=(0, 1))(c, x) for c in (embed.proj, plain))
    assert jnp.array_equal(g_x, g_x_ref) and jnp.array_equal(g_conv["bias"][...], g_ref["bias"][...])
    kernel, kernel_ref = g_conv["kernel"][...], g_ref["kernel"][...]
    assert rel_err(kernel, kernel_ref) < 1e-6

    def convolutions(conv) -> int:
        graphdef, state = nnx.split(conv)

        def looped(state, xs):
            grad = jax.grad(lambda s, x: loss(nnx.merge(graphdef, s), x))
            return jax.lax.scan(lambda acc, x: (jax.tree.map(jnp.add, acc, grad(state, x)), None), state, xs)[0]

        return jax.jit(looped).lower(state, jnp.stack([x, x])).compile().as_text().count(" convolution(")

    assert convolutions(embed.proj) == 1 and convolutions(plain) == 2
    strided = nnx.Conv(3, 16, kernel_size=(4, 4), strides=(2, 2), padding="VALID", rngs=nnx.Rngs(1))
    nnx.update(strided, nnx.state(embed.proj))
    embed.proj.strides = (2, 2)  # no longer a patchify conv
    assert jnp.array_equal(nnx.grad(loss)(embed.proj, x)["kernel"][...], nnx.grad(loss)(strided, x)["kernel"][...])


def _scans(model: nnx.Module, x: jax.Array) -> int:
    """How many ``lax.scan``s the model's forward traces to (no compile; in eval mode: a closed-over model's drop path
    streams cannot advance inside a trace)."""
    return str(jax.make_jaxpr(lambda x: model(x))(x)).count(" scan[")


@REVERSE_MODE_RUNS
def test_scanned_blocks_are_the_same_function():
    """``set_scan_blocks``: a stage's repeated pairs of blocks as one scan over their stacked parameters (BENCHMARKS.md:
    it did not cut the CPU compile; the GPU check measures it there). In training with drop path (rates differing
    per block, passed as data) the loss is bit-identical: the same masks from the same RNG streams, which advance
    the same way. Gradients equal to fp32 summation order (the parity tolerance). Pairs that differ are not scanned:
    V2-CR's extra norm every third block leaves one pair of three equal. (The two runs compared are the checkpointing
    test's without checkpointing: two gradient calls each, traced as a training step traces them.)"""
    x, _ = _tiny_batch()
    model = _tiny(depths=(2, 4), num_heads=(2, 2), drop_path_rate=0.3)
    for scan in (False, True):
        model.set_scan_blocks(scan)
        assert _scans(model, x) == int(scan)  # stage 1's two pairs (stage 0's one pair runs as it is)
    (l_ref, g_ref, c_ref, _), (l_scan, g_scan, c_scan, _) = (_reverse_mode_runs(s, False) for s in (False, True))
    l_ref, l_scan = [float(v) for v in l_ref], [float(v) for v in l_scan]
    assert l_scan == l_ref and l_ref[0] != l_ref[1]  # the same masks, and they did change between calls
    for a, b in zip(g_ref, g_scan):
        assert_grads_close(grads_as_timm(model, b), grads_as_timm(model, a), tol=FP32_REL_TOL)
    for a, b in zip(c_ref, c_scan):
        _assert_same_rng_state(a, b)
    cr = swin_jax.create_model(
        "swinv2_cr_tiny_224", **{**TINY, "depths": (1, 6), "num_heads": (2, 2)}, extra_norm_period=3, rngs=nnx.Rngs(0)
    )
    cr.set_scan_blocks(True)
    assert _scans(cr, x) == 0  # pairs (0, 1), (2, 3), (4, 5): norm3 on blocks 2 and 5
    cr = swin_jax.create_model(
        "swinv2_cr_tiny_224", **{**TINY, "depths": (1, 7), "num_heads": (2, 2)}, rngs=nnx.Rngs(0)
    )
    cr.set_scan_blocks(True)
    assert _scans(cr, x) == 1  # three equal pairs, the odd last block after them


def test_fast_train_step_equals_train_step_with_ema_and_accumulation():
    """TrainStep (flat state, donated buffers, EMA inside the program) computes what train_step followed by
    EMA.update on every update computes: drop path on (the RNG streams advance the same way), gradient
    accumulation over 2 calls (the EMA folds only when the parameters move). The two are different programs,
    so XLA may fuse differently: equal to 1e-6 (relative), exact on the integer state."""
    batch = _tiny_batch()
    kw = dict(lr=2e-3, layer_decay=0.75, total_steps=20, clip_grad_norm=1.0, grad_accum_steps=2)
    runs = {}
    for fast in (False, True):
        model = _tiny(drop_path_rate=0.3)
        optimizer = nnx.Optimizer(model, create_optimizer(model, **kw), wrt=nnx.Param)
        ema = EMA(model, decay=0.8)
        model.train()
        step = TrainStep(model, optimizer, num_classes=10, label_smoothing=0.1, ema=ema, ema_every=2) if fast else None
        losses = []
        for i in range(4):
            if fast:
                losses.append(float(step(batch)["loss"]))
            else:
                losses.append(float(train_step(model, optimizer, batch, label_smoothing=0.1, num_classes=10)["loss"]))
                if i % 2 == 1:
                    ema.update(model)
        if fast:
            held = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
            assert all(a.is_deleted() for a in held)  # donated: the model is stale until sync()
            step.sync()
        runs[fast] = losses, nnx.state((model, optimizer)), ema.params
    (l_ref, s_ref, e_ref), (l_fast, s_fast, e_fast) = runs[False], runs[True]
    np.testing.assert_allclose(l_fast, l_ref, rtol=1e-6)
    assert len(set(l_ref)) == 4  # the steps and the drop path masks did change the loss
    for (path, a), (_, b) in zip(nnx.to_flat_state(s_ref), nnx.to_flat_state(s_fast)):
        a, b = a.get_value(), b.get_value()
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=str(path))
        elif not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            np.testing.assert_array_equal(b, a, err_msg=str(path))
    moved = 0
    start = jax.tree.leaves(nnx.state(_tiny(), nnx.Param))
    for a, b, p in zip(jax.tree.leaves(e_ref), jax.tree.leaves(e_fast), start):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
        moved += not np.array_equal(a, p)
    assert moved > 0  # the EMA did fold the trained parameters in


def test_several_steps_per_call_equal_single_calls_to_the_bit():
    """TrainStep.run(batches stacked [K, ...]) is K calls of the same step in order: with drop path, EMA,
    gradient accumulation and soft targets, the losses, the parameters, the optimizer state and the EMA equal
    those of K single calls to the bit (the scan runs the single step's computation). A second call carries on
    from the first."""
    kw = dict(lr=2e-3, layer_decay=0.75, total_steps=20, clip_grad_norm=1.0, grad_accum_steps=2)
    batches = [_tiny_batch(seed=s) for s in range(6)]
    batches[3] = (batches[3][0], jax.nn.one_hot(batches[3][1], 10) * 0.9 + 0.01)  # soft targets
    batches = [(x, jax.nn.one_hot(y, 10) if y.ndim == 1 else y) for x, y in batches]  # one target format
    runs = {}
    for k in (1, 3):
        model = _tiny(drop_path_rate=0.3)
        optimizer = nnx.Optimizer(model, create_optimizer(model, **kw), wrt=nnx.Param)
        ema = EMA(model, decay=0.8)
        model.train()
        step = TrainStep(model, optimizer, num_classes=10, label_smoothing=0.1, ema=ema, ema_every=2)
        metrics = []
        for i in range(0, 6, k):
            if k == 1:
                metrics.append({n: v[None] for n, v in step(batches[i]).items()})
            else:
                group = batches[i : i + k]
                metrics.append(step.run((jnp.stack([b[0] for b in group]), jnp.stack([b[1] for b in group]))))
        step.sync()
        metrics = {n: np.concatenate([np.asarray(m[n]) for m in metrics]) for n in metrics[0]}
        runs[k] = metrics, nnx.state((model, optimizer)), ema.params
    (m1, s1, e1), (m3, s3, e3) = runs[1], runs[3]
    assert m3["loss"].shape == (6,) and len(set(m1["loss"].tolist())) == 6
    for n in m1:
        np.testing.assert_array_equal(m3[n], m1[n], err_msg=n)
    for (path, a), (_, b) in zip(nnx.to_flat_state(s1), nnx.to_flat_state(s3)):
        a, b = a.get_value(), b.get_value()
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(b, a, err_msg=str(path))
    for a, b in zip(jax.tree.leaves(e1), jax.tree.leaves(e3)):
        np.testing.assert_array_equal(b, a)
    with pytest.raises(ValueError, match="leading steps axis"):
        step.run(batches[0])


def test_fast_train_step_is_one_program_for_fresh_and_restored_state():
    """A fresh model's arrays are uncommitted, a restored checkpoint's committed; jit lowers the two differently.
    TrainStep commits its state, so a resumed run runs (and finds in the compilation cache) the fresh run's
    program."""
    batch = _tiny_batch()

    def lowered(commit: bool) -> str:
        model = _tiny()
        if commit:  # as orbax restores them
            nnx.update(model, jax.tree.map(lambda a: jax.device_put(a, a.sharding), nnx.state(model)))
        optimizer = nnx.Optimizer(model, create_optimizer(model, lr=1e-3, total_steps=10), wrt=nnx.Param)
        step = TrainStep(model, optimizer, num_classes=10)
        return step._fn.lower(step._leaves, step._ema_leaves, batch).as_text()

    assert lowered(commit=False) == lowered(commit=True)


def test_fast_train_step_rejects_bad_settings():
    model = _tiny()
    optimizer = nnx.Optimizer(model, create_optimizer(model, lr=1e-3, total_steps=10), wrt=nnx.Param)
    with pytest.raises(ValueError, match="ema_every must be >= 1"):
        TrainStep(model, optimizer, num_classes=10, ema_every=0)


def test_drop_path_masks_advance_and_eval_is_deterministic():
    model = _tiny(drop_path_rate=0.5)
    optimizer = nnx.Optimizer(model, create_optimizer(model, lr=0.0, total_steps=10), wrt=nnx.Param)
    batch = _tiny_batch()

    @nnx.jit
    def forward(model, x):
        return model(x)

    def rng_counts():
        return [np.asarray(v[...]) for _, v in nnx.to_flat_state(nnx.state(model, nnx.RngCount))]

    model.train()
    a, b = forward(model, batch[0]), forward(model, batch[0])
    assert not np.allclose(a, b)  # different drop path masks
    before = rng_counts()
    losses = [float(train_step(model, optimizer, batch, num_classes=10)["loss"]) for _ in range(2)]
    assert any(not np.array_equal(p, q) for p, q in zip(before, rng_counts()))  # the step advanced the streams
    assert losses[0] != losses[1]  # (lr ~ 0: the loss changes only through the masks)
    model.eval()
    e1, e2 = eval_step(model, batch), eval_step(model, batch)
    assert float(e1["loss"]) == float(e2["loss"])
    np.testing.assert_array_equal(forward(model, batch[0]), forward(model, batch[0]))


def test_ema():
    model = _tiny()
    p0 = to_timm_state_dict(model)
    ema = EMA(model, decay=0.9)
    nnx.update(model, jax.tree_util.tree_map(lambda v: v + 1.0, nnx.state(model, nnx.Param)))
    ema.update(model)
    nnx.update(model, jax.tree_util.tree_map(lambda v: v + 1.0, nnx.state(model, nnx.Param)))
    ema.update(model)
    target = nnx.clone(model)
    ema.copy_to(target)
    got = to_timm_state_dict(target)
    for name, v in p0.items():  # ema = 0.9 * (0.9 * p + 0.1 * (p + 1)) + 0.1 * (p + 2) = p + 0.29
        np.testing.assert_allclose(got[name], v + 0.29, rtol=1e-6, atol=1e-6)
    assert not np.allclose(to_timm_state_dict(model)["head.fc.weight"], got["head.fc.weight"])  # model untouched


# ----------------------------------------------------------------------------------------------------------
# Mixup / CutMix
# ----------------------------------------------------------------------------------------------------------


def test_mixup_target_matches_timm():
    y = np.array([1, 4, 4, 7, 2])
    ours = mixup_target(jnp.asarray(y), 10, 0.3, label_smoothing=0.1)
    ref = timm.data.mixup.mixup_target(torch.from_numpy(y), 10, lam=0.3, smoothing=0.1)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6, atol=1e-7)


def _lam_of(targets: np.ndarray, y: np.ndarray) -> float:
    """lam from smoothing-free soft targets: the weight on row 0's own label (rows 0 and -1 differ in label)."""
    return float(targets[0, y[0]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mixup_images(seed):
    x, y = jnp.asarray(images((4, 8, 8, 3), seed=seed)), jnp.asarray(np.array([0, 1, 2, 3]))
    xm, t, lam = mixup_cutmix(x, y, jax.random.key(seed), alpha_mixup=0.8, alpha_cutmix=0.0, num_classes=5,
                              label_smoothing=0.0)  # fmt: skip
    lam = float(lam)
    assert 0.0 < lam < 1.0 and _lam_of(np.asarray(t), np.asarray(y)) == pytest.approx(lam)
    np.testing.assert_allclose(np.asarray(xm), np.asarray(x * lam + x[::-1] * (1 - lam)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(t).sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_cutmix_images(seed):
    x, y = jnp.asarray(images((4, 16, 12, 3), seed=seed)), jnp.asarray(np.array([0, 1, 2, 3]))
    xm, t, lam = jax.jit(mixup_cutmix, static_argnames=("alpha_mixup", "alpha_cutmix", "num_classes"))(
        x, y, jax.random.key(seed), alpha_mixup=0.0, alpha_cutmix=1.0, num_classes=5, label_smoothing=0.0
    )
    xm, x = np.asarray(xm), np.asarray(x)
    from_flip = np.all(xm == x[::-1], axis=(0, 3)) & ~np.all(xm == x, axis=(0, 3))
    assert np.array_equal(from_flip | np.all(xm == x, axis=(0, 3)), np.ones((16, 12), bool))
    rows, cols = np.nonzero(from_flip)
    assert rows.size  # (these seeds paste a non-empty box) in one rectangle
    assert from_flip[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    assert float(lam) == pytest.approx(1 - rows.size / (16 * 12))  # lam corrected to the pasted area
    assert _lam_of(np.asarray(t), np.asarray(y)) == pytest.approx(float(lam))


def test_mixup_cutmix_switches_and_trains():
    x, y = _tiny_batch()
    kinds = set()
    for i in range(12):
        xm, t, lam = map(np.asarray, mixup_cutmix(x, y, jax.random.key(i), num_classes=10))
        assert 0.0 <= lam <= 1.0
        np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
        kinds.add("cutmix" if np.all((xm == x) | (xm == x[::-1])) else "mixup")
    assert kinds == {"cutmix", "mixup"}  # both alphas > 0: switches between the two
    model = _tiny()
    optimizer = nnx.Optimizer(model, create_optimizer(model, lr=1e-3, total_steps=10), wrt=nnx.Param)
    xm, t, _ = mixup_cutmix(x, y, jax.random.key(0), num_classes=10)
    model.train()
    out = train_step(model, optimizer, (xm, t), num_classes=10)  # soft targets: SoftTargetCrossEntropy
    assert np.isfinite(float(out["loss"])) and 0 <= int(out["top1"]) <= 4
