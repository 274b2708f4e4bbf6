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
from swin_jax.train import cross_entropy

# max|ours - timm| / max|timm| at fp32 on CPU
FP32_REL_TOL = 1e-5
# gradients (max|ours - timm| / max|timm| per parameter tensor) at fp32 on CPU
GRAD_REL_TOL = 1e-4


def randomize_timm_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every timm parameter a value that matters, in place.

    Linear / conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), LayerNorm scales ~ U(0.5, 1.5) and
    shifts ~ N(0, 0.1^2), relative position bias tables ~ N(0, 1) (so the index and the shift mask
    are exercised: a wrong table lookup changes the output by O(1)).
    """
    gen = torch.Generator().manual_seed(seed)
    norm_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.rsplit(".", 1)[0]
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif module in norm_names and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    return model.eval()


def timm_model(name: str, seed: int = 0, **kwargs: Any) -> torch.nn.Module:
    """A randomized timm model in eval mode (no pretrained weights)."""
    return randomize_timm_(timm.create_model(name, pretrained=False, **kwargs), seed)


def jax_from_timm(tmodel: torch.nn.Module, name: str, **kwargs: Any) -> swin_jax.SwinTransformer:
    """The swin_jax model with the same configuration and the timm model's weights."""
    model = swin_jax.create_model(name, **kwargs)
    swin_jax.load_timm_state_dict(model, tmodel.state_dict())
    return model


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


def timm_outputs(tmodel: torch.nn.Module, x: np.ndarray) -> dict[str, Any]:
    """timm's logits, forward_features, stage maps (NHWC) and pre-logits for NHWC input ``x``."""
    with torch.no_grad():
        xt = to_nchw(x)
        feats = tmodel.forward_features(xt)
        maps = tmodel.forward_intermediates(xt, intermediates_only=True)
        return dict(
            logits=tmodel.forward_head(feats).numpy(),
            features=feats.numpy(),
            pre_logits=tmodel.forward_head(feats, pre_logits=True).numpy(),
            maps=[m.permute(0, 2, 3, 1).numpy() for m in maps],
        )


def jax_outputs(model: swin_jax.SwinTransformer, x: np.ndarray) -> dict[str, Any]:
    """The same outputs from swin_jax (jit-compiled)."""

    @jax.jit
    def run(model, x):
        feats = model.forward_features(x)
        maps = model.forward_intermediates(x, intermediates_only=True)
        return dict(
            logits=model.forward_head(feats),
            features=feats,
            pre_logits=model.forward_head(feats, pre_logits=True),
            maps=maps,
        )

    return jax.tree_util.tree_map(np.asarray, run(model, x))


def assert_parity(model: swin_jax.SwinTransformer, tmodel: torch.nn.Module, x: np.ndarray) -> dict[str, float]:
    """Compare logits, forward_features, every stage map and pre-logits; return the errors."""
    ours, ref = jax_outputs(model, x), timm_outputs(tmodel, x)
    errs = {k: assert_close(ours[k], ref[k], what=k) for k in ("logits", "features", "pre_logits")}
    assert len(ours["maps"]) == len(ref["maps"])
    for i, (a, b) in enumerate(zip(ours["maps"], ref["maps"])):
        errs[f"stage{i}"] = assert_close(a, b, what=f"stage {i} map")
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
