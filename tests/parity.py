"""The one parity helper: a timm model with every parameter randomized so it matters, the same
weights mapped into swin_jax, and a comparison of outputs at fp32. Tolerances live here."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch
from flax import nnx

import swin_jax
from swin_jax.convert.verify import FP32_MAX_REL_TOL, FP32_VS_TIMM_FACTOR, rms_rel_err, timm_float64, timm_outputs
from swin_jax.train import cross_entropy

# max|ours - timm| / max|timm| at fp32 on CPU
FP32_REL_TOL = 1e-5
# swin_jax in float64 against timm in float64: the same function up to float64 rounding (measured 2e-14 on SwinV2
# with logit scales up to 100; a wrong constant, a float32 intermediate or a different formula shows at >= 1e-8)
F64_REL_TOL = 1e-10
# where fp32 is not exact (SwinV2's cosine logits scaled by up to 100), the criterion convert --verify applies too:
# FP32_VS_TIMM_FACTOR (swin_jax fp32's error against float64 may be this many times timm fp32's; FP32_REL_TOL always
# suffices) and FP32_MAX_REL_TOL (no element further from float64), defined once in swin_jax.convert.verify
# gradients (max|ours - timm| / max|timm| per parameter tensor) at fp32 on CPU
GRAD_REL_TOL = 1e-4


def randomize_timm_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every timm parameter a value that matters, in place.

    Linear / conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), LayerNorm scales ~ U(0.5, 1.5) and
    shifts ~ N(0, 0.1^2) (SwinV2 starts its post-norms at zero, which would make every block the identity),
    relative position bias tables ~ N(0, 1) (so the index and the shift mask are exercised: a wrong table
    lookup changes the output by O(1)), SwinV2 logit scales ~ U(1, 6), on both sides of timm's ln(100) =
    4.6 clamp (cosine logits scaled by 2.7 to 100).
    """
    gen = torch.Generator().manual_seed(seed)
    norm_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.rsplit(".", 1)[0]
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("logit_scale"):
                p.copy_(1.0 + 5.0 * torch.rand(p.shape, generator=gen))
            elif module in norm_names and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model.eval()


def small_logit_scales_(model: torch.nn.Module) -> torch.nn.Module:
    """Clamp SwinV2 logit scales to at most 1 (cosine logits within +-e), in place: fp32 is then exact enough to
    compare with timm's fp32 directly at FP32_REL_TOL, for tests about something else than the large scales."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                p.clamp_(max=1.0)
    return model


def timm_model(name: str, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    """A randomized timm model in eval mode (no pretrained weights)."""
    return randomize_timm_(timm.create_model(name, pretrained=False, **kwargs), seed)


def abstract_model(name: str, **kwargs: Any) -> nnx.Module:
    """The swin_jax model with abstract parameters (``nnx.eval_shape``): its configuration and geometry, or a model to
    load weights into, without an eager init (which compiles a sampler per parameter shape)."""
    return nnx.eval_shape(lambda: swin_jax.create_model(name, **kwargs))


def jax_from_timm(tmodel: torch.nn.Module, name: str, **kwargs: Any) -> nnx.Module:
    """The swin_jax model with the same configuration and the timm model's weights.

    Built abstractly (nothing is initialized only to be overwritten: eager init of even a tiny Swin takes ~2 s of
    per-shape compiles) unless it holds RNG streams (dropout / drop path rates), then filled strictly.
    """
    model = abstract_model(name, **kwargs)
    if jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.Param))):
        model = swin_jax.create_model(name, **kwargs)
    swin_jax.load_timm_state_dict(model, tmodel.state_dict())
    return model


def jax_attention_weights(
    model: nnx.Module, inputs: dict[tuple[int, int], np.ndarray]
) -> dict[tuple[int, int], jax.Array]:
    """Per block ``(stage, block)``, its ``attention_weights`` of that block's input (:func:`timm_attention_probs`'s
    ``inputs``), every block's from one compiled program (op by op, each block's shapes would compile every op)."""
    keys = list(inputs)

    @nnx.jit
    def run(model, xs):
        stages = getattr(model, "layers", None) or model.stages
        return [stages[i].blocks[j].attention_weights(x) for (i, j), x in zip(keys, xs, strict=True)]

    return dict(zip(keys, run(model, [jnp.asarray(inputs[k]) for k in keys]), strict=True))


def images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random NHWC float32 images ~ N(0, 1) (what normalized images look like)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def rel_err(ours: Any, ref: Any) -> float:
    """max|ours - ref| / max|ref|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise AssertionError(f"shape mismatch: ours {ours.shape} vs timm {ref.shape}")
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


def assert_close(ours: Any, ref: Any, tol: float = FP32_REL_TOL, what: str = "output") -> float:
    err = rel_err(ours, ref)
    assert err <= tol, f"{what}: rel err {err:.3e} > {tol:.0e}"
    return err


def timm_attention_probs(
    tmodel: torch.nn.Module, x: np.ndarray
) -> tuple[dict[tuple[int, int], np.ndarray], dict[tuple[int, int], np.ndarray]]:
    """Run timm on NHWC ``x`` and capture, per block ``(stage, block)``, the block's input (NHWC) and its attention
    probabilities: the output of ``attn.softmax`` (V1, V2; V1 on its explicit, unfused path) or, where the softmax
    is not a module (V2-CR), the input of ``attn.attn_drop``."""
    inputs, probs, hooks = {}, {}, []
    for i, stage in enumerate(getattr(tmodel, "layers", None) or tmodel.stages):
        for j, block in enumerate(stage.blocks):
            key = (i, j)
            if hasattr(block.attn, "fused_attn"):
                block.attn.fused_attn = False  # timm's explicit softmax path (same math as the fused one)
            hooks.append(block.register_forward_pre_hook(lambda m, a, key=key: inputs.__setitem__(key, a[0])))
            if hasattr(block.attn, "softmax"):
                hook = block.attn.softmax.register_forward_hook(lambda m, a, o, key=key: probs.__setitem__(key, o))
            else:
                hook = block.attn.attn_drop.register_forward_hook(lambda m, a, o, key=key: probs.__setitem__(key, a[0]))
            hooks.append(hook)
    try:
        with torch.no_grad():
            tmodel(to_nchw(x))
    finally:
        for h in hooks:
            h.remove()
    return {k: v.numpy() for k, v in inputs.items()}, {k: v.numpy() for k, v in probs.items()}


def outputs(model: nnx.Module, x: jax.Array) -> dict[str, Any]:
    """The outputs the parity checks compare, from one forward pass (traceable): ``forward_intermediates`` gives
    the stage maps and the final features (after the final norm, what ``forward_features`` returns; test_model
    checks that the two agree), the head gives logits and pre-logits."""
    feats, maps = model.forward_intermediates(x)
    return dict(
        logits=model.forward_head(feats),
        features=feats,
        pre_logits=model.forward_head(feats, pre_logits=True),
        maps=maps,
    )


def jax_outputs(model: nnx.Module, x: np.ndarray) -> dict[str, Any]:
    """:func:`outputs` from swin_jax, jit-compiled, as numpy arrays."""
    return jax.tree_util.tree_map(np.asarray, jax.jit(outputs)(model, x))


def assert_parity(model: swin_jax.SwinTransformer, tmodel: torch.nn.Module, x: np.ndarray) -> dict[str, float]:
    """Compare logits, forward_features, every stage map and pre-logits; return the errors."""
    ours, ref = jax_outputs(model, x), timm_outputs(tmodel, x)
    errs = {k: assert_close(ours[k], ref[k], what=k) for k in ("logits", "features", "pre_logits")}
    assert len(ours["maps"]) == len(ref["maps"])
    for i, (a, b) in enumerate(zip(ours["maps"], ref["maps"])):
        errs[f"stage{i}"] = assert_close(a, b, what=f"stage {i} map")
    return errs


def jax_float64(t64: torch.nn.Module, name: str, x: np.ndarray, **kwargs: Any) -> dict[str, Any]:
    """swin_jax's outputs (as :func:`jax_outputs`) in float64 with a float64 timm model's weights, under
    ``jax.enable_x64``."""
    with jax.enable_x64(True):
        model = jax_from_timm(t64, name, dtype=jnp.float64, param_dtype=jnp.float64, **kwargs)
        return jax_outputs(model, x.astype(np.float64))


def _flat_outputs(out: dict[str, Any]) -> dict[str, Any]:
    flat = {k: out[k] for k in ("logits", "features", "pre_logits")}
    flat.update({f"stage{i}": m for i, m in enumerate(out["maps"])})
    return flat


def assert_parity_float64(
    model: nnx.Module, tm: torch.nn.Module, name: str, x: np.ndarray, structural: bool = True, **kwargs: Any
) -> dict[str, dict[str, float]]:
    """Parity judged against float64, for functions where fp32 is not exact.

    * swin_jax float64 equals timm float64 to :data:`F64_REL_TOL` on every output (the structural proof);
    * swin_jax fp32 is as close to timm float64 as timm's own fp32 is: its largest root-mean-square error over the
      outputs (:func:`rms_rel_err`) is within :data:`FP32_VS_TIMM_FACTOR` times timm's largest, or
      :data:`FP32_REL_TOL`, whichever is larger;
    * and no element of any output is off by more than :data:`FP32_MAX_REL_TOL` (:func:`rel_err`).

    Why the root mean square: where logits are scaled by up to 100, fp32's error is a few large deviations (rows
    whose largest logits nearly tie), so each framework's *largest* deviation is a heavy-tailed draw. Measured on
    SwinV2 (tests' weights, 8 inputs, one image each): the ratio of swin_jax's largest deviation to timm's scattered
    0.3x-4.1x for every attention implementation alike (the einsum path 3.3x on one input), and the root mean square
    ratio 0.5x-1.7x. So a judgement by the largest deviation passes or fails by the CPU's rounding (it failed the
    'xla' kernel on an AVX-512 machine and passed it on an AVX2 one), while any wrong term (a mask, a scale, a
    bf16 intermediate) moves the root mean square by orders of magnitude.

    ``model`` is swin_jax's fp32 twin of ``tm`` (built with ``name`` and ``kwargs``). ``structural=False`` skips the
    float64 run (attention kernels compute in float32 by design). Returns the errors, per output: ``ours32`` /
    ``timm32`` (root mean square), ``ours32_max`` / ``timm32_max`` (largest element) and ``f64``.
    """
    t64 = timm_float64(tm)
    ref64 = _flat_outputs(timm_outputs(t64, x.astype(np.float64)))
    ours32, timm32 = _flat_outputs(jax_outputs(model, x)), _flat_outputs(timm_outputs(tm, x))
    errs = {
        key: dict(
            ours32=rms_rel_err(ours32[key], ref),
            timm32=rms_rel_err(timm32[key], ref),
            ours32_max=rel_err(ours32[key], ref),
            timm32_max=rel_err(timm32[key], ref),
        )
        for key, ref in ref64.items()
    }
    if structural:
        ours64 = _flat_outputs(jax_float64(t64, name, x, **kwargs))
        for key, e in errs.items():
            e["f64"] = rel_err(ours64[key], ref64[key])
            assert e["f64"] <= F64_REL_TOL, f"{key}: float64 rel err {e['f64']:.3e} > {F64_REL_TOL:.0e}"
    # over all outputs together: single outputs (a max-pooled feature) scatter around the ratio
    ours, timm = max(e["ours32"] for e in errs.values()), max(e["timm32"] for e in errs.values())
    bound = max(FP32_VS_TIMM_FACTOR * timm, FP32_REL_TOL)
    assert ours <= bound, f"fp32 rms rel err to float64 {ours:.3e} > {bound:.3e} (timm fp32: {timm:.3e}): {errs}"
    worst = max(e["ours32_max"] for e in errs.values())
    assert worst <= FP32_MAX_REL_TOL, f"fp32 max rel err to float64 {worst:.3e} > {FP32_MAX_REL_TOL:.0e}: {errs}"
    return errs


def timm_grads(tm: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """timm's parameter gradients of the cross-entropy loss on NHWC ``x`` and integer labels ``y``."""
    tm.zero_grad()
    loss = torch.nn.functional.cross_entropy(tm(to_nchw(x)), torch.from_numpy(y))
    loss.backward()
    return {n: p.grad.numpy().copy() for n, p in tm.named_parameters()}


@nnx.jit
def _grads(model, x, y):
    return nnx.grad(lambda m: cross_entropy(m(x), y, num_classes=m.num_classes))(model)


def jax_grads(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> nnx.State:
    """swin_jax's gradients of the same loss (jit-compiled), as the model's state."""
    return _grads(model, jnp.asarray(x), jnp.asarray(y))


def grads_as_timm(model: nnx.Module, grads: nnx.State) -> dict[str, np.ndarray]:
    """Gradients in timm names and layouts: load them into a copy of the model and export it."""
    holder = nnx.clone(model)
    nnx.update(holder, grads)
    return swin_jax.to_timm_state_dict(holder)


def assert_grads_close(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], tol: float = GRAD_REL_TOL) -> None:
    """Every parameter's gradient within ``tol`` (relative, per tensor) of timm's, and every one exercised."""
    assert set(ours) == set(ref)
    errs = {name: rel_err(ours[name], ref[name]) for name in ref}
    worst = max(errs, key=errs.get)
    assert errs[worst] <= tol, f"{worst}: gradient rel err {errs[worst]:.3e} > {tol:.0e}"
    assert all(np.abs(g).max() > 0 for g in ref.values())  # every parameter's gradient is exercised


def assert_grads_float64(
    model: nnx.Module, tm: torch.nn.Module, x: np.ndarray, y: np.ndarray, exact_zero: tuple[str, ...] = ()
) -> dict[str, tuple[float, float]]:
    """Gradients judged against timm in float64, where cosine logits scaled by up to 100 make fp32 gradients
    inexact (a position-bias MLP's weight gradient sums softmax gradients that cancel): over all tensors, swin_jax
    fp32's largest distance from the float64 gradients is within :data:`FP32_VS_TIMM_FACTOR` times timm fp32's
    largest, or :data:`GRAD_REL_TOL`; each tensor's within twice that factor of timm fp32's own for it. Parameters
    named by a suffix in ``exact_zero`` have a zero gradient in exact arithmetic (a bias added to every logit of a
    softmax row): ours must stay below :data:`GRAD_REL_TOL` times the largest gradient. Returns (ours, timm's) errors
    per tensor.
    """
    ours, ref32 = grads_as_timm(model, jax_grads(model, x, y)), timm_grads(tm, x, y)
    ref64 = timm_grads(timm_float64(tm), x.astype(np.float64), y)
    assert set(ours) == set(ref64)
    scale = max(float(np.abs(g).max()) for g in ref64.values())
    errs = {}
    for name, ref in ref64.items():
        if exact_zero and name.endswith(exact_zero):
            noise = float(np.abs(ours[name]).max())
            assert noise <= GRAD_REL_TOL * scale, f"{name}: gradient {noise:.3e}, expected ~0 (largest {scale:.3e})"
            continue
        assert np.abs(ref).max() > 0, f"{name}: gradient not exercised"
        errs[name] = (rel_err(ours[name], ref), rel_err(ref32[name], ref))
    # over all tensors together, as the forward criterion (one tensor's ratio scatters: measured up to 2.3x under
    # XLA_FLAGS=--xla_cpu_max_isa=SSE4_2), and each tensor within twice that factor of timm's own error for it
    ours, timm = max(e for e, _ in errs.values()), max(e for _, e in errs.values())
    bound = max(FP32_VS_TIMM_FACTOR * timm, GRAD_REL_TOL)
    assert ours <= bound, f"gradient rel err to float64 {ours:.3e} > {bound:.3e} (timm fp32: {timm:.3e})"
    for name, (e_ours, e_timm) in errs.items():
        bound = max(2 * FP32_VS_TIMM_FACTOR * e_timm, GRAD_REL_TOL)
        assert e_ours <= bound, (
            f"{name}: gradient rel err to float64 {e_ours:.3e} > {bound:.3e} (timm fp32 {e_timm:.3e})"
        )
    return errs


# ----------------------------------------------------------------------------------------------------------
# Equivalence of training runs (n devices vs 1, accumulation vs one batch, n processes vs 1)
# ----------------------------------------------------------------------------------------------------------


def adamw_divergence_bound(
    grad_diffs: Any, lrs: Any, *, eps: float, weight_decay: float, param_max: float, b1: float = 0.9, b2: float = 0.999
) -> float:
    """How far apart one parameter tensor of two AdamW runs (optax chain of :func:`swin_jax.train.create_optimizer`,
    no clipping) may be after ``len(lrs)`` steps from the same start, when the gradients fed to step ``t`` differed
    by at most ``grad_diffs[t]`` (max abs over the tensor). ``lrs[t]`` is the step's learning rate times the
    tensor's lr scale.

    Derivation. Adam is element-wise: after ``t`` steps the update direction is ``f = m / (sqrt(v) + eps)`` with
    bias-corrected ``m = sum_k a_k g_k`` and ``v = sum_k b_k g_k^2`` (``a_k = (1-b1) b1^(t-k) / (1-b1^t)``, which sum
    to 1; ``b_k`` likewise with ``b2``). Then ``df/dg_k = a_k / (sqrt(v) + eps) - m b_k g_k / (sqrt(v) (sqrt(v) +
    eps)^2)``. The first term is at most ``a_k / eps``. For the second, Cauchy-Schwarz gives ``|m| <= C sqrt(v)``
    with ``C = sqrt(sum_k a_k^2 / b_k)``, and ``|b_k g_k| <= sqrt(b_k) sqrt(v)``, so it is at most ``C sqrt(b_k)
    sqrt(v) / (sqrt(v) + eps)^2 <= C sqrt(b_k) / (4 eps)``. By the mean value theorem ``|delta f| <= G_t
    max_k |delta g_k|`` with ``G_t = (1 + C sum_k sqrt(b_k) / 4) / eps``. The step ``p -= lr (f + wd p)`` adds
    ``lr wd |delta p|`` (decoupled weight decay), fp32 evaluation of ``f`` (|f| <= C) adds ``lr C 8 u`` and storing
    each run's new ``p`` adds 2 ulps of the largest parameter (``u = 2^-24``):

        D_t = D_{t-1} (1 + lr_t wd) + lr_t G_t max_{k<=t} grad_diffs[k] + lr_t C 8 u + 2 ulp(param_max).

    ``eps`` makes the bound tight or loose: with ``eps = 1e-3`` and ``lr = 1e-3`` the gain ``lr G`` is about 1
    (the parameter difference is the gradient noise itself); with Adam's default 1e-8 it is 1e5, because a
    gradient that is zero in exact arithmetic (Swin's key bias) is pure rounding noise that Adam scales up to
    an O(lr) step. Equivalence tests therefore use ``eps = 1e-3``.
    """
    u = 2.0**-24
    spacing = float(np.spacing(np.float32(param_max)))
    d = 0.0
    for t, lr in enumerate(lrs, start=1):
        age = np.arange(t)[::-1]  # t - k for k = 1..t
        a = (1 - b1) * b1**age / (1 - b1**t)
        b = (1 - b2) * b2**age / (1 - b2**t)
        c = float(np.sqrt(np.sum(a * a / b)))
        gain = (1.0 + c * float(np.sum(np.sqrt(b))) / 4.0) / eps
        d = d * (1 + lr * weight_decay) + lr * gain * float(np.max(grad_diffs[:t])) + lr * c * 8 * u + 2 * spacing
    return d
