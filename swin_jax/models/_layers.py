"""Layers every Swin family shares, with timm's names and initializers: the patch embedding, LayerNorm as
torch runs it, Linear (folding leading axes around its matmul, for a backward XLA:CPU runs without strided
transposes), the MLP, the classifier head, and the base of a windowed-attention block.

Also the backward-pass cut at each block input (:func:`materialize_grad`), which keeps XLA:CPU's backward
linear in the number of blocks, LayerNorm's closed-form derivative (:func:`layer_norm`) and the MLP's GELU
recomputed in the backward pass: both keep fewer tensors for the backward than autodiff of the plain formulas.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .. import attention
from ._windows import Pair, calc_window_shift, merge_windows, partition_windows, to_2tuple

__all__ = [
    "LN_EPS",
    "POOL_TYPES",
    "LayerNorm",
    "Linear",
    "PatchEmbed",
    "Mlp",
    "ClassifierHead",
    "WindowBlock",
    "SwinStage",
    "materialize_grad",
    "merge_2x2",
]

LN_EPS = 1e-5  # torch.nn.LayerNorm default, used by every timm Swin norm
POOL_TYPES = ("avg", "max", "avgmax", "catavgmax", "")


# Initializers with the values of flax's (``truncated_normal(stddev=0.02)``, ``variance_scaling(1/3, 'fan_in',
# 'uniform')``), compiled once per power-of-two size instead of once per shape. jax.random draws element i of an
# array from counter i (threefry, partitionable: jax's default), so the first n values of a draw of size N >= n are
# the draw of size n. One compile of the truncated-normal sampler takes ~0.7 s on a CPU, and eager init compiled
# one per parameter shape: creating a Swin took 15-20 s, most of it there.


_MIN_DRAW = 1 << 14  # smaller parameters share one sampler (a 16k draw costs ~0.1 ms)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _draw(key: jax.Array, distribution: str, size: int, dtype: Any) -> jax.Array:
    if distribution == "truncated_normal":
        return jax.random.truncated_normal(key, -2.0, 2.0, (size,), dtype)
    return jax.random.uniform(key, (size,), dtype, -1.0)


@functools.partial(jax.jit, static_argnums=(1,))
def _first(flat: jax.Array, shape: tuple[int, ...], scale: jax.Array) -> jax.Array:
    return flat[: math.prod(shape)].reshape(shape) * scale


def _sample(key: jax.Array, distribution: str, shape: Sequence[int], dtype: Any, scale: jax.Array) -> jax.Array:
    shape = tuple(int(d) for d in shape)
    size = max(1 << max(math.prod(shape) - 1, 0).bit_length(), _MIN_DRAW)
    return _first(_draw(key, distribution, size, jnp.dtype(dtype)), shape, scale)


def _trunc_normal_02(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """timm's ``trunc_normal_(std=.02)`` as flax draws it: ``truncated_normal(stddev=0.02)``'s values."""
    return _sample(key, "truncated_normal", shape, dtype, jnp.array(0.02, dtype))


def _torch_conv_default(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """torch Conv2d's and Linear's default init (kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))), as timm leaves the
    patch embedding: ``variance_scaling(1/3, 'fan_in', 'uniform')``'s values (HWIO or ``[in, out]`` kernel, fan_in =
    the product of all but the last axis)."""
    variance = jnp.array((1.0 / 3.0) / math.prod(shape[:-1]), dtype)
    return _sample(key, "uniform", shape, dtype, jnp.sqrt(3 * variance))


# The residual stream's gradient, materialized once per block. XLA:CPU fuses a chain of elementwise producers into
# every consumer, duplicating it. In the backward pass the residual stream's gradient is such a chain (each later
# block adds its LayerNorm and branch terms), and it has several consumers per block (the weight-gradient
# transposes, the LayerNorm reductions): each consumer's fusion recomputed the whole chain from the last block
# down, so a block's backward cost grew with the number of blocks after it (a fusion of ~900 instructions per
# element in Swin-B's stage 2). jax.lax.optimization_barrier does not stop this (XLA:CPU removes barriers before
# fusing); a dot does, and a product with the identity matrix at "highest" precision is exact (1 * g + 0 * ...).
# Swin-B fp32 batch 8 training step on a 2-core EPYC: 15.6 s -> 8.1 s, compile 54 s -> 27 s, peak RSS 8.0 -> 5.6 GB
# (BENCHMARKS.md). It contracts the rows axis (7-56 long: cheap, and never the batch axis, which a mesh shards).
# SWIN_JAX_BACKWARD_CUT: "cpu" (default: only when lowering for the CPU), "always", "never" (read when tracing).


def _identity_rows(t: jax.Array) -> jax.Array:
    b, h = t.shape[:2]
    # batched over B (a dot batch dimension stays local where a mesh shards B), output already in t's layout
    eye = jnp.broadcast_to(jnp.eye(h, dtype=t.dtype), (b, h, h))
    rows = t.reshape(b, h, -1)
    out = jnp.einsum("bkh,bhx->bkx", eye, rows, precision=jax.lax.Precision.HIGHEST, preferred_element_type=t.dtype)
    return out.reshape(t.shape)


@jax.custom_jvp
def materialize_grad(x: jax.Array) -> jax.Array:
    """Identity on ``x`` ``[B, H, W, C]``; its tangent (and so, transposed, its cotangent) passes through a dot with
    the identity matrix, which XLA cannot fuse through. See the comment above; forward values are untouched."""
    return x


@materialize_grad.defjvp
def _materialize_grad_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    mode = os.environ.get("SWIN_JAX_BACKWARD_CUT", "cpu")
    if mode not in ("cpu", "always", "never"):
        raise ValueError(f"SWIN_JAX_BACKWARD_CUT must be 'cpu', 'always' or 'never', got {mode!r}")
    if mode == "never" or t.ndim != 4 or t.shape[1] < 2:  # a 1x1 dot would be simplified to a multiply
        return x, t
    if mode == "always":
        return x, _identity_rows(t)
    return x, jax.lax.platform_dependent(t, cpu=_identity_rows, default=lambda t: t)


def _normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> tuple[jax.Array, ...]:
    """LayerNorm's output with the two statistics it needs: ``(y, x - mean, rsqrt(var + eps))`` over the last axis,
    two-pass variance, as ``nnx.LayerNorm`` computes them (the one formula of :func:`layer_norm` and its rule)."""
    centered = x - x.mean(-1, keepdims=True)
    r = jax.lax.rsqrt(jax.lax.square(centered).mean(-1, keepdims=True) + eps)
    return centered * (r * scale) + bias, centered, r


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis, the values of ``nnx.LayerNorm`` (``(x - mean) * (rsqrt(var + eps) * scale) +
    bias``, two-pass variance), differentiated by its closed form:
    ``d x̂ = r * (dx - mean(dx) - x̂ * mean(x̂ * dx))`` with ``x̂ = (x - mean) * r``.

    The backward pass keeps ``x̂`` and ``r``. Differentiating flax's formula instead keeps ``x - mean`` and the
    full-size product ``rsqrt(var + eps) * scale``: Swin-B's fp32 training step on the CPU was 2.7% slower and its
    temporaries 0.24 GB larger (BENCHMARKS.md). Gradients differ from flax's by rounding only.
    """
    return _normalize(x, scale, bias, eps)[0]


@layer_norm.defjvp
def _layer_norm_jvp(eps: float, primals: tuple[jax.Array, ...], tangents: tuple[jax.Array, ...]):
    (x, scale, bias), (dx, dscale, dbias) = primals, tangents
    y, centered, r = _normalize(x, scale, bias, eps)
    xhat = centered * r
    dxhat = r * (dx - dx.mean(-1, keepdims=True) - xhat * (xhat * dx).mean(-1, keepdims=True))
    return y, dxhat * scale + xhat * dscale + dbias


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` as torch autocast runs LayerNorm: statistics, normalization and the scale and shift
    in float32 (parameters not rounded to a low-precision compute dtype first), output in the compute dtype.
    Two-pass variance and eps 1e-5, as ``torch.nn.LayerNorm``. Parameters: ``scale``, ``bias``; ``init_scale``
    is the scale's initial value (0 for SwinV2's residual post-norms, as timm initializes them)."""

    def __init__(self, dim: int, *, init_scale: float = 1.0, dtype, param_dtype, rngs: nnx.Rngs):
        internal = jnp.float32 if dtype is None else jnp.promote_types(dtype, jnp.float32)
        super().__init__(
            dim,
            epsilon=LN_EPS,
            use_fast_variance=False,
            dtype=internal,
            param_dtype=param_dtype,
            scale_init=nnx.initializers.constant(init_scale),
            rngs=rngs,
        )
        self.out_dtype = dtype

    def __call__(self, x: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        if mask is None:
            x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
            y = layer_norm(x, scale, bias, self.epsilon)
        else:
            y = super().__call__(x, mask=mask)
        return y if self.out_dtype is None else y.astype(self.out_dtype)


class Linear(nnx.Linear):
    """``nnx.Linear`` with the leading axes folded into one around its matmul: ``[..., din]`` is multiplied as
    ``[n, din]``. Same values, same parameters.

    Why: the kernel's gradient is then one rank-2 dot contracting axis 0 of both operands, which XLA:CPU runs as
    it is. With ``[B, H, W, din]`` or ``[B * nW, N, din]`` inputs it contracts several axes, and XLA moves them
    last: a transpose, fused into whatever produced the tensor (LayerNorm's backward, the residual sum), which then
    reads its inputs with a stride. Swin-B's fp32 training step on the CPU was 6.6% slower that way
    (BENCHMARKS.md). Folding leading axes is a bitcast on the CPU and the GPU; on a TPU, whose layouts tile the
    last two axes, it may need a relayout where the folded axis is not a multiple of 8 (not measured).
    """

    def __call__(
        self, inputs: jax.Array, out_sharding=None, *, act: Callable[[jax.Array], jax.Array] | None = None
    ) -> jax.Array:
        """``act(inputs) @ kernel + bias`` with ``act`` (default: none), whose output is not kept for the backward
        pass but recomputed there from ``inputs`` (:func:`_act_dot`). ``act`` is for :func:`reverse_mode` traces:
        its derivative is defined for reverse mode only."""
        if act is not None:
            if out_sharding is not None:
                raise ValueError("Linear(act=...) takes no out_sharding")
            return self._act_call(inputs, act)
        if inputs.ndim <= 2 or out_sharding is not None:
            return super().__call__(inputs, out_sharding=out_sharding)
        y = super().__call__(inputs.reshape(-1, inputs.shape[-1]))
        return y.reshape(*inputs.shape[:-1], y.shape[-1])

    def _act_call(self, inputs: jax.Array, act: Callable[[jax.Array], jax.Array]) -> jax.Array:
        # nnx.Linear.__call__ with the matmul replaced: the same dtype promotion, precision and bias
        flat = inputs.reshape(-1, inputs.shape[-1])
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        flat, kernel, bias = self.promote_dtype((flat, kernel, bias), dtype=self.dtype)
        y = _act_dot(act, flat, kernel, self.precision, self.preferred_element_type)
        if bias is not None:
            y += jnp.reshape(bias, (1, -1))
        return y.reshape(*inputs.shape[:-1], y.shape[-1])


_REVERSE_MODE: contextvars.ContextVar[bool] = contextvars.ContextVar("swin_jax_reverse_mode", default=False)


@contextlib.contextmanager
def reverse_mode() -> Iterator[None]:
    """Trace the model for reverse-mode differentiation only (a training step's ``jax.grad``).

    Inside it, layers may define their derivatives with ``jax.custom_vjp`` where that keeps fewer tensors for
    the backward pass: the MLP recomputes its activation there instead of keeping it (:func:`_act_dot`), and
    gradient checkpointing recomputes blocks in a form XLA:CPU does not undo (:func:`_remat_block`), and the Pallas
    attention kernel's backward recomputes the attention instead of keeping its probabilities. Values
    and gradients are those of the plain model, up to rounding; forward-mode differentiation (``jax.jvp``,
    ``jax.linearize``, ``jax.jacfwd``) of a model traced inside it fails, so outside it (the default) every
    layer supports both modes. :class:`swin_jax.train.TrainStep` and :func:`swin_jax.train.train_step` trace
    their step inside it.
    """
    token = _REVERSE_MODE.set(True)
    try:
        yield
    finally:
        _REVERSE_MODE.reset(token)


def in_reverse_mode() -> bool:
    """Whether the model is being traced inside :func:`reverse_mode`."""
    return _REVERSE_MODE.get()


def _recompute_from_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
    """``x`` where the gradient ``g`` is finite along its last axis' first entry, else 0: the values of ``x`` (a
    position whose gradient is not finite has non-finite gradients already), for a recomputation in the backward
    pass that XLA cannot merge with the forward's identical computation (common-subexpression elimination, which on
    XLA:CPU undoes ``jax.checkpoint``'s recomputation despite its optimization barrier: the forward's tensors stay
    alive). Elementwise over the leading axes, so no communication where a mesh shards them."""
    return jnp.where(jnp.isfinite(g[..., :1]), x, jnp.zeros_like(x))


def _dot(a: jax.Array, kernel: jax.Array, precision: Any, preferred_element_type: Any) -> jax.Array:
    kw = {} if preferred_element_type is None else {"preferred_element_type": preferred_element_type}
    return jax.lax.dot_general(a, kernel, (((1,), (0,)), ((), ())), precision=precision, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _act_dot(act: Callable[[jax.Array], jax.Array], x: jax.Array, kernel: jax.Array, precision, preferred_element_type):
    """``act(x) @ kernel`` (``x`` ``[n, din]``) whose backward pass keeps ``x``, not ``act(x)``, and recomputes
    ``act(x)`` for the kernel's gradient.

    Why: the MLP's hidden activations are the largest tensors a Swin block keeps for its backward pass, and autodiff
    keeps two of them per block, the activation's input (for its derivative) and its output (for fc2's kernel
    gradient). Recomputing the output: Swin-B's fp32 training step on the CPU keeps 0.38 GB fewer temporaries at
    batch 8, at the same speed (BENCHMARKS.md). ``jax.checkpoint`` cannot do this on the CPU: XLA:CPU merges its
    recomputation with the forward's identical computation (CSE), keeping the forward's tensor after all. Here the
    recomputation reads ``x`` through :func:`_recompute_from_gradient`, which XLA cannot merge with the forward:
    the same values, computed only when the backward pass reaches it.
    """
    return _dot(act(x), kernel, precision, preferred_element_type)


def _act_dot_fwd(act, x, kernel, precision, preferred_element_type):
    return _dot(act(x), kernel, precision, preferred_element_type), (x, kernel)


def _act_dot_bwd(act, precision, preferred_element_type, res, g):
    x, kernel = res
    a, act_vjp = jax.vjp(act, _recompute_from_gradient(x, g))
    _, dot_vjp = jax.vjp(lambda a, k: _dot(a, k, precision, preferred_element_type), a, kernel)
    da, dk = dot_vjp(g)
    return act_vjp(da)[0], dk


_act_dot.defvjp(_act_dot_fwd, _act_dot_bwd)


def _linear(din: int, dout: int, *, use_bias: bool = True, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    # timm's init for Swin Linear layers: trunc_normal(std=.02) weights, zero bias
    return Linear(
        din, dout, use_bias=use_bias, kernel_init=_trunc_normal_02, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def _torch_linear_bias(fan_in: int) -> Callable[..., jax.Array]:
    """torch Linear's default bias init, ``U(+-1/sqrt(fan_in))``."""

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return _sample(key, "uniform", shape, dtype, jnp.array(1.0 / math.sqrt(fan_in), dtype))

    return init


def _torch_linear(din: int, dout: int, *, use_bias: bool = True, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
    """A Linear with torch's default init (weight and bias ``U(+-1/sqrt(fan_in))``), as SwinV2-CR keeps them."""
    return Linear(
        din,
        dout,
        use_bias=use_bias,
        kernel_init=_torch_conv_default,
        bias_init=_torch_linear_bias(din),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def _dropout(rate: float, rngs: nnx.Rngs, broadcast_dims: Sequence[int] = ()) -> nnx.Dropout:
    """Dropout (or, with ``broadcast_dims`` over all but the batch axis, drop path), eval mode at start.

    An RNG stream is only held where the rate is non-zero, so inference models carry no RNG state.
    """
    return nnx.Dropout(rate, broadcast_dims=tuple(broadcast_dims), deterministic=True, rngs=rngs if rate > 0 else None)


def dropout_active(module: nnx.Dropout) -> bool:
    """Whether ``module`` changes its input: a non-zero rate, in train mode."""
    return module.rate > 0 and not module.deterministic


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _patchify_conv(x: jax.Array, kernel: jax.Array, strides: Any, dimension_numbers: Any, precision: Any) -> jax.Array:
    """``lax.conv_general_dilated`` of a patchify conv (NHWC input, HWIO kernel, stride = kernel size, VALID)."""
    return jax.lax.conv_general_dilated(
        x, kernel, strides, "VALID", dimension_numbers=dimension_numbers, precision=precision
    )


def _patchify_conv_jvp(strides, dimension_numbers, precision, primals, tangents):
    """The input's tangent as autodiff has it (a conv); the kernel's as one matmul of the image patches, which
    reverse mode transposes into the kernel gradient ``patches^T @ g``."""
    (x, kernel), (dx, dk) = primals, tangents
    y = _patchify_conv(x, kernel, strides, dimension_numbers, precision)
    terms = []
    if type(dx) is not jax.custom_derivatives.SymbolicZero:
        terms.append(_patchify_conv(dx, kernel, strides, dimension_numbers, precision))
    if type(dk) is not jax.custom_derivatives.SymbolicZero:
        (ph, pw, cin, cout), (b, ho, wo, _) = kernel.shape, y.shape
        patches = x[:, : ho * ph, : wo * pw].reshape(b, ho, ph, wo, pw, cin).transpose(0, 1, 3, 2, 4, 5)
        dk_y = jnp.dot(patches.reshape(-1, ph * pw * cin), dk.reshape(-1, cout), precision=precision)
        terms.append(dk_y.reshape(y.shape).astype(y.dtype))
    return y, sum(terms[1:], terms[0])


_patchify_conv.defjvp(_patchify_conv_jvp, symbolic_zeros=True)


def _conv_general_dilated(
    inputs: jax.Array,
    kernel: jax.Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs: Any,
) -> jax.Array:
    """``lax.conv_general_dilated`` for :class:`PatchEmbed`'s ``nnx.Conv``; the same values, and a patchify conv's
    kernel gradient computed as one matmul of the image patches with the output's gradient.

    Why: inside a loop (``TrainStep.run``'s ``lax.scan``) XLA:CPU left the kernel-gradient convolution in a
    layout it runs on its slow generic path, 150 ms per Swin-B step against ~5 ms (BENCHMARKS.md). The matmul
    sums in another order than the convolution did: the kernel gradient moves by rounding. It is a derivative
    rule for forward mode (the kernel's tangent as a matmul of the patches), which reverse mode transposes, so
    ``jax.jvp`` works through it too.
    """
    dn = jax.lax.conv_dimension_numbers(inputs.shape, kernel.shape, dimension_numbers)
    patchify = (
        padding == "VALID"
        and tuple(window_strides) == tuple(kernel.shape[:-2])
        and set(lhs_dilation or (1,)) == {1}
        and set(rhs_dilation or (1,)) == {1}
        and feature_group_count == 1
        and dn == jax.lax.conv_dimension_numbers(inputs.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
        and all(v is None for v in kwargs.values())
    )
    if not patchify:
        return jax.lax.conv_general_dilated(
            inputs, kernel, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision, **kwargs,
        )  # fmt: skip
    return _patchify_conv(inputs, kernel, tuple(window_strides), dn, precision)


class PatchEmbed(nnx.Module):
    """Image to patch embedding: ``patch x patch`` stride-``patch`` conv, then LayerNorm, NHWC out.

    The conv's kernel gradient is one matmul of the image patches (:func:`_conv_general_dilated`).
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.patch_size = to_2tuple(patch_size)
        self.proj = nnx.Conv(
            in_chans,
            embed_dim,
            kernel_size=self.patch_size,
            strides=self.patch_size,
            padding="VALID",
            kernel_init=_torch_conv_default,
            dtype=dtype,
            param_dtype=param_dtype,
            conv_general_dilated=_conv_general_dilated,
            rngs=rngs,
        )
        self.norm = LayerNorm(embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.proj(x))


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU as torch computes it, ``0.5 * x * (1 + erf(x / sqrt(2)))``, in ``x``'s dtype.

    ``jax.nn.gelu(approximate=False)`` is the same function written with ``erfc``. XLA:CPU lowers erfc piecewise with
    an exponential and its derivative keeps more of the forward: with erf, Swin-B's fp32 training step was ~6% faster
    and its temporaries 0.4 GB smaller on a 2-core EPYC (BENCHMARKS.md). Values differ from the erfc form by rounding.
    """
    return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(np.sqrt(0.5), x.dtype)))


# GELU recomputed in the backward pass from its input (jax.checkpoint; no effect on a forward alone). Its derivative
# otherwise keeps three more hidden-size tensors per block (x / 2, exp(-x^2 / 2), 1 + erf), the largest residuals of a
# Swin block: Swin-B's fp32 training step on the CPU kept 0.39 GB fewer temporaries, at the same speed (BENCHMARKS.md).
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": jax.checkpoint(gelu),
    "relu": jax.nn.relu,
}


class Mlp(nnx.Module):
    """fc1 -> activation (exact erf GELU by default) -> dropout -> fc2 -> dropout, as timm's ``Mlp``.

    Traced in :func:`reverse_mode` with the first dropout off, the activation's output is recomputed in the backward
    pass rather than kept (``Linear(act=...)``).

    ``drop`` is one rate for both dropouts or a pair ``(after the activation, after fc2)``; ``out_dim`` defaults to
    ``dim``; ``act`` is ``'gelu'`` (exact) or ``'relu'``; ``linear`` builds the two layers (default :func:`_linear`:
    timm's Swin init).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        drop: float | tuple[float, float] = 0.0,
        out_dim: int | None = None,
        act: str = "gelu",
        linear: Callable[..., nnx.Linear] | None = None,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        linear = linear or _linear
        drop1, drop2 = drop if isinstance(drop, (tuple, list)) else (drop, drop)
        if act not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; expected one of {tuple(_ACTIVATIONS)}")
        self.act = act
        self.fc1 = linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.drop1 = _dropout(drop1, rngs)
        self.fc2 = linear(hidden, out_dim or dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.drop2 = _dropout(drop2, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.fc1(x)
        if in_reverse_mode() and not dropout_active(self.drop1):
            return self.drop2(self.fc2(h, act=_ACTIVATIONS[self.act]))  # the activation recomputed, not kept
        return self.drop2(self.fc2(self.drop1(_ACTIVATIONS[self.act](h))))


def merge_2x2(x: jax.Array) -> jax.Array:
    """PatchMerging's gather: ``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), 4C]``, odd sizes zero-padded bottom/right,
    each 2x2 neighbourhood's channels in timm's order (``reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5)``:
    blocks h0w0, h1w0, h0w1, h1w1)."""
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
        h, w = h + h % 2, w + w % 2
    return x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)


def drop_path(module: nnx.Dropout, x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """``module(x)``, a drop path (``nnx.Dropout`` over all but the batch axis); with ``keep``, the same computation
    at keep probability ``keep`` (a traced scalar, for blocks run by :func:`run_blocks`' scan, whose rates differ)
    instead of ``1 - module.rate``: the same key from the module's stream, the same mask and the same scaling."""
    if keep is None or not dropout_active(module):
        return module(x)
    shape = list(x.shape)
    for dim in module.broadcast_dims:
        shape[dim] = 1
    mask = jax.random.bernoulli(module.rngs(), p=keep, shape=shape, out_sharding=jax.typeof(x).sharding)
    return jax.lax.select(jnp.broadcast_to(mask, x.shape), x / keep.astype(x.dtype), jnp.zeros_like(x))


def _call_block(block: nnx.Module, x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    return block(x, drop_path_keep=keep)


def _scan_signature(group: tuple[nnx.Module, ...]) -> Any:
    """The group's graph with each drop path's rate replaced by whether it is zero: groups with equal signatures
    differ only in their drop path rates (which :func:`run_blocks` passes as data) and in their arrays. Read from
    a copy (sharing the arrays): the model itself may belong to an outer trace, where it must not be mutated."""
    copy = nnx.merge(*nnx.split(group))
    for block in copy:
        for module in (block.drop_path1, block.drop_path2):
            module.rate = float(module.rate > 0)
    return nnx.graphdef(copy)


def _keeps(group: tuple[nnx.Module, ...]) -> list[float] | None:
    """Each block's keep probability ``1 - rate`` (its two drop paths share the rate), or None where a traced keep
    would not reproduce the module's own arithmetic: a rate of 1 (the module returns zeros) or a keep whose float32
    value rounds to a 16-bit compute dtype differently than the Python float does."""
    keeps = []
    for block in group:
        if block.drop_path1.rate != block.drop_path2.rate or block.drop_path1.rate >= 1.0:
            return None
        keep = 1.0 - block.drop_path1.rate
        if any(np.asarray(np.float32(keep), t) != np.asarray(keep, t) for t in (jnp.bfloat16, jnp.float16)):
            return None
        keeps.append(keep)
    return keeps


def _scan_groups(groups: list[tuple[nnx.Module, ...]], keeps: list[list[float]], x: jax.Array, call) -> jax.Array:
    """``groups`` (equal signatures) in order as one ``lax.scan``: their parameters stacked along a new leading axis
    inside the traced program (the modules, and so the parameter tree, stay as they are), the drop path keep
    probabilities as data, and the other state (drop path RNG streams) carried out and written back."""
    graphdefs, params, rest = zip(*(nnx.split(g, nnx.Param, ...) for g in groups))
    graphdef = graphdefs[0]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *params), jax.tree.map(lambda *a: jnp.stack(a), *rest)
    active = any(dropout_active(b.drop_path1) for b in groups[0])

    def body(x, xs):
        p, r, keep = xs
        group = nnx.merge(graphdef, p, r)
        for i, block in enumerate(group):
            x = call(block, x, keep[i] if active else None)
        return x, nnx.state(group, nnx.Not(nnx.Param))

    x, new_rest = jax.lax.scan(body, x, (*stacked, jnp.asarray(keeps)))
    if active:  # the drop path streams advanced
        for i, group in enumerate(groups):
            nnx.update(group, jax.tree.map(lambda a, i=i: a[i], new_rest))
    return x


def _remat_block(block: nnx.Module, x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """``_call_block`` with the block recomputed in the backward pass from its input, for :func:`reverse_mode`
    traces: a ``custom_vjp`` whose recomputation reads the input through :func:`_recompute_from_gradient`, so that
    unlike ``nnx.remat`` it saves memory on XLA:CPU too. The drop path streams advance as in ``_call_block``; the
    backward pass recomputes with the streams as they were, so with the same masks."""
    graphdef, params, rest = nnx.split(block, nnx.Param, ...)
    p_leaves, p_tree = jax.tree.flatten(params)
    r_leaves, r_tree = jax.tree.flatten(rest)

    def run(p_leaves, r_leaves, x, keep):
        b = nnx.merge(graphdef, jax.tree.unflatten(p_tree, p_leaves), jax.tree.unflatten(r_tree, r_leaves))
        y = _call_block(b, x, keep)
        return y, jax.tree.leaves(nnx.state(b, nnx.Not(nnx.Param)))

    def zeros(leaves):  # the cotangents of the RNG keys and counts
        return [jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.inexact) else np.zeros(a.shape, jax.dtypes.float0)
                for a in leaves]  # fmt: skip

    @jax.custom_vjp
    def f(p_leaves, r_leaves, x, keep):
        return run(p_leaves, r_leaves, x, keep)

    def fwd(p_leaves, r_leaves, x, keep):
        return run(p_leaves, r_leaves, x, keep), (p_leaves, r_leaves, x, keep)

    def bwd(res, cotangents):
        p_leaves, r_leaves, x, keep = res
        g = cotangents[0]
        with reverse_mode():
            _, vjp = jax.vjp(lambda p, x: run(p, r_leaves, x, keep)[0], p_leaves, _recompute_from_gradient(x, g))
            d_p, d_x = vjp(g)
        return d_p, zeros(r_leaves), d_x, None if keep is None else jnp.zeros_like(keep)

    f.defvjp(fwd, bwd)
    y, new_rest = f(p_leaves, r_leaves, x, keep)
    nnx.update(block, jax.tree.unflatten(r_tree, new_rest))
    return y


def run_blocks(blocks: Sequence[nnx.Module], x: jax.Array, *, remat: bool = False, scan: bool = False) -> jax.Array:
    """Run ``blocks`` in order; ``remat``: each block recomputed in the backward pass (``nnx.remat``; in a
    :func:`reverse_mode` trace :func:`_remat_block`, which saves memory on XLA:CPU as well).

    ``scan``: consecutive pairs of blocks (regular + shifted) that are the same computation on different arrays run
    as one ``lax.scan`` over their stacked parameters, so the compiled program holds one pair per run instead of
    every block: Swin-B's 18-block stage compiles 2 blocks instead of 18. The function is the same (parameters,
    drop path masks and RNG streams alike); XLA may order fp32 sums differently. Pairs that differ (a V2-CR block
    with its extra norm) and an odd last block run as they are.
    """
    call = (_remat_block if in_reverse_mode() else nnx.remat(_call_block)) if remat else _call_block
    blocks = list(blocks)
    groups = [tuple(blocks[i : i + 2]) for i in range(0, len(blocks) - 1, 2)] if scan else []
    if len(groups) < 2:
        for block in blocks:
            x = call(block, x)
        return x
    signatures = [_scan_signature(g) for g in groups]
    i = 0
    while i < len(groups):
        j = i + 1
        while j < len(groups) and signatures[j] == signatures[i]:
            j += 1
        keeps = [_keeps(g) for g in groups[i:j]]
        if j - i >= 2 and all(k is not None for k in keeps):
            x = _scan_groups(groups[i:j], keeps, x, call)
        else:
            for block in (b for g in groups[i:j] for b in g):
                x = call(block, x)
        i = j
    for block in blocks[2 * len(groups) :]:
        x = call(block, x)
    return x


def _global_pool(x: jax.Array, pool_type: str) -> jax.Array:
    if pool_type == "":
        return x
    if pool_type == "avg":
        return x.mean(axis=(1, 2))
    if pool_type == "max":
        return x.max(axis=(1, 2))
    if pool_type == "avgmax":
        return 0.5 * (x.mean(axis=(1, 2)) + x.max(axis=(1, 2)))
    if pool_type == "catavgmax":
        return jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
    raise ValueError(f"unknown global_pool {pool_type!r}; expected one of {POOL_TYPES}")


def _check_pool_type(pool_type: str) -> str:
    if pool_type not in POOL_TYPES:
        raise ValueError(f"unknown global_pool {pool_type!r}; expected one of {POOL_TYPES}")
    return pool_type


class ClassifierHead(nnx.Module):
    """Global pool (NHWC) -> dropout -> fc, as timm's ``ClassifierHead``; no fc when ``num_classes == 0``. ``linear``
    builds the fc (default :func:`_linear`)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pool_type: str = "avg",
        drop_rate: float = 0.0,
        linear: Callable[..., nnx.Linear] | None = None,
        *,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        linear = linear or _linear
        self.in_features = in_features
        self.global_pool = _check_pool_type(pool_type)
        self.num_features = in_features * (2 if pool_type == "catavgmax" else 1)
        self.drop = _dropout(drop_rate, rngs)
        self.fc = (
            linear(self.num_features, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if num_classes > 0
            else None
        )

    def __call__(self, x: jax.Array, pre_logits: bool = False) -> jax.Array:
        x = self.drop(_global_pool(x, self.global_pool))
        if pre_logits or self.fc is None:
            return x
        return self.fc(x)


class MapAttention(nnx.Module):
    """What every window attention module shares: the fused kernel's path (``attn_impl='pallas_fused'``), attention on
    a block's whole map, the same function as the windows' path.

    A subclass has ``attn_impl``, ``attn_drop``, ``proj``, ``proj_drop`` and :meth:`relative_position_bias`
    (``[heads, N, N]``), and defines :meth:`_map_qkv`.
    """

    attn_impl: str

    def relative_position_bias(self) -> jax.Array:
        raise NotImplementedError

    def _map_qkv(self, x: jax.Array) -> tuple[jax.Array, float | None]:
        """Tokens ``[B, T, C]`` -> their q, k, v ``[B, T, 3, heads, d]`` and the factor the kernel applies to q (None:
        q is scaled already)."""
        raise NotImplementedError

    def runs_on_map(self) -> bool:
        """Whether the block hands this module its whole map (:meth:`attend_map`) instead of windows: the fused
        kernel runs here, and attention dropout (only the einsum path applies it) is off."""
        return attention.resolve(self.attn_impl) == "pallas_fused" and not dropout_active(self.attn_drop)

    def attend_map(self, x: jax.Array, window_size: Pair, shift_size: Pair) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``: the projections on the map's tokens, and the shift, padding,
        partition, attention and merge in one kernel (:func:`swin_jax.attention.map_attention`). timm pads the map
        with zeros before the projection, so a padded token's k and v are a zero token's."""
        b, h, w, c = x.shape
        qkv, q_scale = self._map_qkv(x.reshape(b, h * w, c))
        pad_kv = None
        if h % window_size[0] or w % window_size[1]:
            pad_kv = self._map_qkv(jnp.zeros((1, 1, c), x.dtype))[0][0, 0, 1:]
        geometry = attention.MapGeometry((h, w), tuple(window_size), tuple(shift_size))
        out = attention.map_attention(
            qkv, self.relative_position_bias(), pad_kv, geometry, q_scale=q_scale, reverse_only=in_reverse_mode()
        )
        return self.proj_drop(self.proj(out.reshape(b, h, w, -1)))


class WindowBlock(nnx.Module):
    """What every Swin block shares: (shifted) window attention around ``self.attn``.

    A subclass sets ``window_size``, ``shift_size`` (clipped to the feature size by :meth:`_set_geometry`) and
    ``attn`` (called on windows ``[B * nW, N, C]`` with the shift mask, with a ``set_window_size`` method), and says in
    :meth:`_attn_input` what attention sees.
    """

    window_size: Pair
    shift_size: Pair

    def _set_geometry(self, input_resolution: Pair, window_size: Pair, shift_size: Pair, always_partition: bool):
        """Record the block's targets and set its (clipped) window and shift, as timm's ``_calc_window_shift``."""
        self.target_shift_size = to_2tuple(shift_size)
        self.always_partition = always_partition
        self._place(input_resolution, window_size, self.target_shift_size)

    def _place(self, feat_size: Pair, window_size: Pair, shift_size: Pair) -> None:
        """The feature size, and the window and shift clipped to it (unless ``always_partition``)."""
        self.input_resolution = to_2tuple(feat_size)
        self.window_size, self.shift_size = calc_window_shift(
            self.input_resolution, to_2tuple(window_size), to_2tuple(shift_size), self.always_partition
        )

    def set_input_size(self, feat_size: Pair, window_size: Pair, always_partition: bool | None = None) -> None:
        """A new feature size and target window, as timm's block method: a shifted block shifts by half the new
        window; the window and shift are clipped again; the attention follows the new window."""
        if always_partition is not None:
            self.always_partition = always_partition
        window_size = to_2tuple(window_size)
        shift = (window_size[0] // 2, window_size[1] // 2) if any(self.target_shift_size) else self.target_shift_size
        self._place(feat_size, window_size, shift)
        self.attn.set_window_size(self.window_size)

    def _attn_input(self, x: jax.Array) -> jax.Array:
        """The map attention is computed on: the block input, or its norm for a pre-norm block."""
        return x

    def _attn(self, x: jax.Array) -> jax.Array:
        """Shift, pad, partition, attend, merge: ``[B, H, W, C]`` -> ``[B, H, W, C]`` (in one kernel where the
        attention module runs on the map)."""
        if self.attn.runs_on_map():
            return self.attn.attend_map(x, self.window_size, self.shift_size)
        windows, mask, padded = partition_windows(x, self.window_size, self.shift_size)
        windows = self.attn(windows, mask=mask)
        return merge_windows(windows, self.window_size, self.shift_size, x.shape[1:3], padded)

    def attention_weights(self, x: jax.Array) -> jax.Array:
        """The attention probabilities of this block for its input ``x``, for study.

        Windows are taken as the block takes them: after the cyclic shift by ``-shift_size`` and
        bottom/right padding to whole windows, in row-major order over the window grid, tokens
        row-major inside a window. The shift mask is already applied, so masked pairs have (near) zero
        weight.

        Args:
            x: the block's input ``[B, H, W, C]``.

        Returns:
            ``[B, nW_h, nW_w, num_heads, N, N]`` float32 with ``N = window_h * window_w``.
        """
        wh, ww = self.window_size
        windows, mask, (hp, wp) = partition_windows(self._attn_input(x), self.window_size, self.shift_size)
        attn = self.attn.attention_weights(windows, mask=mask)
        return attn.reshape(x.shape[0], hp // wh, wp // ww, *attn.shape[1:])


class SwinStage(nnx.Module):
    """What every Swin stage shares: an optional ``downsample`` first, then ``blocks`` in order, each optionally
    recomputed in the backward pass (``grad_checkpointing``: only the block's input is kept), repeated pairs of
    blocks optionally as one scan (``scan_blocks``: :func:`run_blocks`)."""

    downsample: nnx.Module | None
    blocks: nnx.List
    grad_checkpointing: bool
    scan_blocks: bool
    input_resolution: Pair
    output_resolution: Pair

    def _build(
        self,
        dim: int,
        out_dim: int,
        input_resolution: Pair,
        depth: int,
        downsample: bool,
        window_size: Pair,
        drop_path: Sequence[float] | float,
        make_downsample: Callable[[], nnx.Module],
        make_block: Callable[[int, Pair, Pair, float], nnx.Module],
    ) -> None:
        """Resolutions, the downsample (``make_downsample()``, halving the map) and ``depth`` blocks,
        ``make_block(index, output_resolution, shift_size, drop_path)``, alternating regular and half-window-shifted."""
        self.input_resolution = to_2tuple(input_resolution)
        self.output_resolution = (
            tuple((i + 1) // 2 for i in self.input_resolution) if downsample else self.input_resolution
        )
        window_size = to_2tuple(window_size)
        shift_size = (window_size[0] // 2, window_size[1] // 2)
        if downsample:
            self.downsample = make_downsample()
        else:
            if dim != out_dim:
                raise ValueError(f"a stage without downsampling keeps its width: dim {dim} != out_dim {out_dim}")
            self.downsample = None
        self.grad_checkpointing = False
        self.scan_blocks = False
        rates = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nnx.List(
            [
                make_block(i, self.output_resolution, (0, 0) if i % 2 == 0 else shift_size, rates[i])
                for i in range(depth)
            ]
        )

    def set_input_size(self, feat_size: Pair, window_size: Pair, always_partition: bool | None = None) -> None:
        """A new input feature size (before the downsample) and target window for every block, as timm's."""
        self.input_resolution = to_2tuple(feat_size)
        if self.downsample is None:
            self.output_resolution = self.input_resolution
        else:
            self.output_resolution = tuple((i + 1) // 2 for i in self.input_resolution)
        for block in self.blocks:
            block.set_input_size(self.output_resolution, window_size, always_partition)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        return run_blocks(self.blocks, x, remat=self.grad_checkpointing, scan=self.scan_blocks)
