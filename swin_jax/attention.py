"""Window attention implementations, chosen per model with ``create_model(..., attn_impl=NAME)``.

Every implementation computes the same function, timm's window attention core::

    softmax(q @ k.T + relative_position_bias + shift_mask) @ v      (q already scaled)

per window and head, in float32 softmax. They differ in how that is lowered:

- ``'einsum'``: two einsums around a softmax on token-major windows ``[B * nW, N, heads, d]``
  (:func:`softmax_attention`; SwinV2's per-head logit scale multiplies the logits, as timm does). The
  reference, and the only one that applies attention dropout (a model training with ``attn_drop_rate > 0``
  runs it with the attention probabilities materialized, ``[B * nW, heads, N, N]``).
- ``'xla'``: ``jax.nn.dot_product_attention(implementation='xla')``. In shifted blocks the window index is
  folded into the head axis (``[B, N, nW * heads, d]``) so the bias plus shift mask is one
  ``[1, nW * heads, N, N]`` tensor broadcast over the batch, never one per window. A float64 model runs the
  same layout through einsums with a float64 softmax (jax.nn's softmax is float32).
- ``'cudnn'``: the same layout through cuDNN's fused attention (CUDA only). cuDNN wants even sequence lengths
  with a bias, so windows are padded (49 -> 56 tokens) with keys masked out exactly (their weight is 0).
  Elsewhere the same padded layout runs through XLA. Lowering it for CUDA needs cuDNN present, so it is
  exported for CUDA only on a GPU machine.
- ``'pallas'``: one Pallas kernel per window and head that keeps the ``N x N`` logits on chip: q·kᵀ, bias
  and mask, softmax, ·v. Triton on CUDA (tokens padded to a power of two: 49 -> 64, 144 -> 256; a head_dim
  that is not one padded with zero channels, to at least 16), Mosaic on TPU (tokens padded to a multiple of 8,
  eight windows per grid step), ``interpret=True`` on the CPU (slow: for tests). On CUDA each program computes one
  window and :data:`TRITON_TUNING`'s heads with its warps (:func:`triton_tuning` changes them). Padded keys are masked
  exactly. Its derivatives are plain JAX's: in a training step (:func:`swin_jax.models.reverse_mode`) the
  backward pass recomputes the attention from q, k, v and the bias; elsewhere a differentiated call runs the plain-JAX
  function in the kernel's place. Mosaic GPU is not used: its attention
  needs head_dim % 64 == 0, and every Swin has head_dim 32. Where no kernel backend applies (ROCm) it runs the
  ``'xla'`` path. jax 0.11 deprecates Pallas's Triton backend (the CUDA kernel lowers with a
  ``DeprecationWarning``; a later jax removes it).
- ``'pallas_fused'``: one Pallas kernel per window and head that also does the block's cyclic shift, padding to
  whole windows, partition and merge (:func:`map_attention`). It reads q, k and v from the map's tokens as the
  qkv projection writes them (``[B, H * W, 3, heads, d]``: no roll, pad, partition, q/k/v split or heads-major
  transpose in XLA; V1's q is scaled in the kernel), gathers each window's rows by index arithmetic, computes
  timm's shift mask from the token coordinates, and scatters the outputs back to the map, ready for the output
  projection. timm's padded tokens (zeros before the projection) are keys with a zero token's k and v. Triton on
  CUDA (gathered loads, masked stores), interpreted on the CPU. Mosaic TPU loads cannot gather rows, so on TPU it
  runs the windowed ``'pallas'`` kernel; ROCm runs ``'xla'``. Derivatives as ``'pallas'``'s.
- ``'auto'`` (the default): per platform, the implementation measured fastest there (:data:`AUTO_PICKS`).

A Pallas kernel or cuDNN call is lowered for one platform; :func:`target_platform` names it. It is the
default backend unless code is being lowered for another one inside :func:`lowering_for` (as
:func:`swin_jax.export_model` does for a single-platform export).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "IMPLS",
    "AUTO_PICKS",
    "attention_impls",
    "check_attn_impl",
    "resolve",
    "target_platform",
    "lowering_for",
    "softmax",
    "add_bias",
    "attention_probs",
    "softmax_attention",
    "window_attention",
    "MapGeometry",
    "map_attention",
    "TritonTuning",
    "TRITON_TUNING",
    "triton_tuning",
]

IMPLS = ("einsum", "xla", "cudnn", "pallas", "pallas_fused")

# What 'auto' runs on each platform, from measurements (BENCHMARKS.md). On the CPU (Swin-B fp32 batch 8, three
# runs) 'xla' was within the machine's run-to-run spread of 'einsum' and the padded cuDNN layout slower, so the
# einsum path stays; on GPU and TPU only the einsum path has been measured so far, so it stays the pick until a
# side-by-side run says otherwise.
AUTO_PICKS = {"cpu": "einsum", "cuda": "einsum", "rocm": "einsum", "tpu": "einsum"}

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("swin_jax_attention_target", default=None)


class TritonTuning(NamedTuple):
    """How a Pallas kernel is launched on CUDA (Triton): ``num_warps`` per program, and ``heads_per_step``, the heads
    one program computes, one after the other, sharing the window's index arithmetic and (``'pallas_fused'``) the
    shift mask; adjacent heads' channels are adjacent in memory. A model whose head count it does not divide uses the
    largest divisor below it. The interpreter (CPU) runs the same programs and ignores ``num_warps``."""

    num_warps: int = 4
    heads_per_step: int = 1


# The launch each Triton kernel gets (:func:`triton_tuning` overrides it while tracing). These are the first choices,
# not measured ones: ``python benchmarks/kernel_tune.py`` measures the alternatives on a GPU (BENCHMARKS.md).
TRITON_TUNING = {"pallas": TritonTuning(), "pallas_fused": TritonTuning()}

_TUNING: contextvars.ContextVar[dict[str, TritonTuning] | None] = contextvars.ContextVar(
    "swin_jax_triton_tuning", default=None
)


def attention_impls() -> tuple[str, ...]:
    """The names ``create_model(..., attn_impl=...)`` accepts: ``'auto'`` and each implementation."""
    return ("auto", *IMPLS)


def check_attn_impl(name: str) -> str:
    """``name`` if it names an implementation, else a ValueError listing them."""
    if name not in attention_impls():
        raise ValueError(f"unknown attn_impl {name!r}; expected one of {', '.join(attention_impls())}")
    return name


def target_platform() -> str:
    """The platform attention is being lowered for: ``'cpu'``, ``'cuda'``, ``'rocm'`` or ``'tpu'``."""
    platform = _TARGET.get()
    if platform is None:
        device = jax.devices()[0]
        platform = device.platform
        if platform == "gpu":
            platform = "rocm" if "rocm" in getattr(device.client, "platform_version", "").lower() else "cuda"
    return platform


@contextlib.contextmanager
def lowering_for(platform: str) -> Iterator[None]:
    """Trace attention for ``platform`` (``'cpu'``, ``'cuda'``, ``'rocm'``, ``'tpu'``) inside this block."""
    if platform not in AUTO_PICKS:
        raise ValueError(f"unknown platform {platform!r}; expected one of {', '.join(AUTO_PICKS)}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


@contextlib.contextmanager
def triton_tuning(**tuning: TritonTuning) -> Iterator[None]:
    """Launch the named Pallas kernels (``pallas=...``, ``pallas_fused=...``) with these :class:`TritonTuning` s in
    programs traced inside this block; the others as :data:`TRITON_TUNING` says. jit caches a traced program: trace
    (or jit) a fresh function inside the block."""
    unknown = sorted(set(tuning) - set(TRITON_TUNING))
    if unknown:
        raise ValueError(f"no Triton kernel named {', '.join(unknown)}; expected {', '.join(TRITON_TUNING)}")
    for name, value in tuning.items():
        if not isinstance(value, TritonTuning) or value.num_warps < 1 or value.heads_per_step < 1:
            raise ValueError(f"{name}: expected a TritonTuning of positive numbers, got {value!r}")
    token = _TUNING.set({**(_TUNING.get() or {}), **tuning})
    try:
        yield
    finally:
        _TUNING.reset(token)


def _tuning(kernel: str, heads: int) -> TritonTuning:
    """``kernel``'s launch while tracing, its ``heads_per_step`` lowered to a divisor of ``heads``."""
    tuning = (_TUNING.get() or {}).get(kernel, TRITON_TUNING[kernel])
    step = next(n for n in range(min(tuning.heads_per_step, heads), 0, -1) if heads % n == 0)
    return tuning._replace(heads_per_step=step)


def resolve(name: str, platform: str | None = None) -> str:
    """The implementation that runs for ``name`` on ``platform`` (default: :func:`target_platform`)."""
    platform = platform or target_platform()
    name = check_attn_impl(name)
    if name == "auto":
        return AUTO_PICKS.get(platform, "einsum")
    if name == "pallas_fused" and platform == "tpu":  # Mosaic TPU loads no gathered rows: the windowed kernel
        return "pallas"
    if name in ("pallas", "pallas_fused") and platform not in ("cpu", "cuda", "tpu"):
        return "xla"
    return name


@jax.custom_jvp
def softmax(x: jax.Array) -> jax.Array:
    """``jax.nn.softmax`` over the last axis (the same forward computation), differentiated as ``y * (ẋ - Σ y ẋ)``.

    Its backward pass keeps only the output ``y``. ``jax.nn.softmax``'s derivative differentiates the exponential and
    the normalizing sum instead (unless ``jax_softmax_custom_jvp`` is set globally): on the CPU that kept more
    ``[windows, heads, N, N]`` tensors and made Swin-B's fp32 training step ~6% slower (BENCHMARKS.md).
    """
    return jax.nn.softmax(x, axis=-1)


@softmax.defjvp
def _softmax_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]) -> tuple[jax.Array, jax.Array]:
    (x,), (t,) = primals, tangents
    y = softmax(x)
    return y, y * (t - jnp.sum(y * t, axis=-1, keepdims=True))


@jax.custom_jvp
def add_bias(s: jax.Array, bias: jax.Array) -> jax.Array:
    """``s + bias[None]``: the position bias ``[heads, N, N]`` added to every window's logits ``[B * nW, heads, N, N]``.

    The bias' gradient is the sum of the logits' gradient over the windows. XLA:CPU's reduction over a short leading
    axis of a large tensor is pathologically slow (Swin-B stage 3's ``[32, 16, 49, 49]``: 7 ms, against 0.1 ms as a
    product with a vector of ones; with the product Swin-B's fp32 training step is 2.4% faster, BENCHMARKS.md). So
    when lowering for the CPU the broadcast's tangent is a product with ones (exact: "highest" precision, each term
    times 1), and its transpose, the gradient, a product too. Values are those of ``s + bias[None]``; the gradient
    differs from a ``jnp.sum`` by summation order only.
    """
    return s + bias[None]


@add_bias.defjvp
def _add_bias_jvp(primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]):
    (s, bias), (ds, dbias) = primals, tangents
    n = s.shape[0]

    def by_dot(t: jax.Array) -> jax.Array:
        return jnp.einsum("w,...->w...", jnp.ones(n, t.dtype), t, precision=jax.lax.Precision.HIGHEST)

    def by_broadcast(t: jax.Array) -> jax.Array:
        return jnp.broadcast_to(t[None], (n, *t.shape))

    return add_bias(s, bias), ds + jax.lax.platform_dependent(dbias, cpu=by_dot, default=by_broadcast)


def attention_probs(q, k, bias, mask: np.ndarray | None, logit_scale=None) -> jax.Array:
    """Attention probabilities ``softmax(q·kᵀ [* logit_scale] + bias [+ mask])`` as timm computes them: q·kᵀ in the
    compute dtype, the scale, then the bias, then the mask added to the logits, softmax in float32 or wider.

    Args:
        q, k: token-major windows ``[B * nW, N, heads, d]``.
        bias: ``[heads, N, N]``.
        mask: ``[nW, N, N]`` or None.
        logit_scale: per-head factor on the logits ``[heads]`` (SwinV2's cosine attention), or None.

    Returns:
        ``[B * nW, heads, N, N]``.
    """
    n, heads = q.shape[1], q.shape[2]
    s = jnp.einsum("btnh,bsnh->bnts", q, k)
    if logit_scale is not None:
        s = s * logit_scale.astype(s.dtype)[None, :, None, None]
    s = add_bias(s, bias.astype(s.dtype))
    if mask is not None:
        s = (s.reshape(-1, mask.shape[0], heads, n, n) + jnp.asarray(mask, s.dtype)[None, :, None]).reshape(s.shape)
    return softmax(s.astype(jnp.promote_types(s.dtype, jnp.float32)))


def softmax_attention(q, k, v, bias, mask: np.ndarray | None, logit_scale=None) -> jax.Array:
    """The einsum path's core on token-major windows: ``softmax(q·kᵀ [* logit_scale] + bias [+ mask]) · v``.

    Args:
        q, k, v: ``[B * nW, N, heads, d]``.
        bias: ``[heads, N, N]``.
        mask: ``[nW, N, N]`` or None.
        logit_scale: per-head factor on the logits ``[heads]`` (SwinV2's cosine attention), or None.

    Returns:
        ``[B * nW, N, heads, d]``; the softmax in float32 or wider.
    """

    def core(q, k, v):
        p = attention_probs(q, k, bias, mask, logit_scale).astype(v.dtype)
        return jnp.einsum("bnts,bsnh->btnh", p, v)

    # as jax.nn.dot_product_attention lays it out (q mapped over a unit axis): XLA:CPU then runs q·kᵀ and the softmax
    # apart from ·v, which its library fusion of all three ran ~2x slower (BENCHMARKS.md)
    return jax.vmap(core, in_axes=(3, None, None), out_axes=3)(q[:, :, :, None], k, v)[:, :, :, 0]


def _bias_and_mask(bias: jax.Array, mask: np.ndarray | None, n_pad: int, dtype) -> jax.Array:
    """The additive term ``[nWb, heads, Np, Np]`` (``nWb`` = windows per image with a mask, else 1): bias plus
    shift mask, zero-padded to ``Np`` tokens, with the padded keys at the dtype's most negative value so their
    softmax weight is exactly 0."""
    n = bias.shape[-1]
    full = bias[None].astype(dtype)
    if mask is not None:
        full = full + jnp.asarray(mask, dtype)[:, None]
    if n_pad > n:
        full = jnp.pad(full, ((0, 0), (0, 0), (0, n_pad - n), (0, n_pad - n)))
        full = jnp.where(np.arange(n_pad) >= n, jnp.finfo(dtype).min, full)
    return full


def _round_up(n: int, multiple: int) -> int:
    return n + (-n % multiple)


def _pad_tokens(t: jax.Array, n_pad: int) -> jax.Array:
    n = t.shape[1]
    return t if n_pad == n else jnp.pad(t, ((0, 0), (0, n_pad - n), (0, 0), (0, 0)))


def _dot_product(q, k, v, bias, mask, implementation: str, pad: bool) -> jax.Array:
    """``jax.nn.dot_product_attention`` with the windows folded into the heads; ``pad``: tokens padded to a
    multiple of 8 with masked keys (cuDNN's layout)."""
    bw, n, heads, d = q.shape
    n_pad = _round_up(n, 8) if pad else n
    full = _bias_and_mask(bias, mask, n_pad, q.dtype)
    nwb = full.shape[0]
    q, k, v = (_pad_tokens(t, n_pad) for t in (q, k, v))
    if nwb > 1:  # [B * nW, Np, heads, d] -> [B, Np, nW * heads, d]: the bias broadcasts over B

        def fold(t):
            return t.reshape(-1, nwb, n_pad, heads, d).transpose(0, 2, 1, 3, 4).reshape(-1, n_pad, nwb * heads, d)

        q, k, v = fold(q), fold(k), fold(v)
    full = full.reshape(1, nwb * heads, n_pad, n_pad)
    if jnp.dtype(q.dtype).itemsize > 4:  # jax.nn's softmax runs in float32: a float64 model keeps float64
        out = softmax_attention(q, k, v, full[0], None)  # the folded windows as heads of one bias
    else:
        out = jax.nn.dot_product_attention(q, k, v, bias=full, scale=1.0, implementation=implementation)
    if nwb > 1:
        out = out.reshape(-1, n_pad, nwb, heads, d).transpose(0, 2, 1, 3, 4).reshape(bw, n_pad, heads, d)
    return out[:, :n]


# ------------------------------------------------------------------------------------------------------------
# Pallas kernel
# ------------------------------------------------------------------------------------------------------------


def _triton_size(n: int) -> int:
    """A Triton tile side: a power of two (its tensors' sizes must be), at least 16 (its dots' smallest)."""
    return max(16, 1 << (n - 1).bit_length())


def _padded_tokens(n: int, layout: str) -> int:
    """Tokens per window in the kernel: a power of two (at least 16) for Triton's blocks and dots
    (``layout='cuda'``), a multiple of 8 (sublanes) on TPU."""
    if layout == "tpu":
        return _round_up(n, 8)
    return _triton_size(n)


def _matmul_precision():
    # the kernel's dots follow jax's default matmul precision, as the einsum path does
    value = jax.config.jax_default_matmul_precision
    return jax.lax.Precision.HIGHEST if value in ("highest", "float32", "HIGHEST") else None


def _attend(q, k, v, full, precision) -> jax.Array:
    """One window's attention in a kernel: ``q``, ``k``, ``v`` ``[Np, d]``, ``full`` (bias and mask) ``[Np, Np]``.
    Rounding follows the einsum path: logits in the compute dtype, bias added there, softmax in float32 (or
    wider: a float64 model, interpreted, stays float64)."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=acc)
    s = (s.astype(q.dtype) + full).astype(acc)
    p = jnp.exp(s - jnp.max(s, axis=1, keepdims=True))
    p = p / jnp.sum(p, axis=1, keepdims=True)
    return jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=acc
    )


def _window_kernel(q_ref, k_ref, v_ref, b_ref, o_ref, *, per_window_bias: bool, precision):
    """One grid step: ``G`` windows of ``Hs`` heads. Refs: q, k, v, o ``[G, Hs, Np, d]``, bias ``[G or 1, Hs, Np,
    Np]``."""
    groups, heads = q_ref.shape[:2]
    for g in range(groups):
        for h in range(heads):
            o = _attend(q_ref[g, h], k_ref[g, h], v_ref[g, h], b_ref[g if per_window_bias else 0, h], precision)
            o_ref[g, h] = o.astype(o_ref.dtype)


def _windows_per_step(bw: int, nwb: int, layout: str) -> int:
    """Windows per grid step: 1 on Triton (its blocks are 2-D tiles), up to 8 on TPU (fewer, larger steps)."""
    if layout != "tpu":
        return 1
    return next(g for g in (8, 4, 2, 1) if bw % g == 0 and (nwb == 1 or nwb % g == 0))


def _pallas_forward(q, k, v, full, layout: str, interpret: bool) -> jax.Array:
    """q, k, v ``[BW, heads, Np, d]``, ``full`` ``[nWb, heads, Np, Np]`` -> ``[BW, heads, Np, d]``.

    ``layout``: ``'cuda'`` (Triton, launched as :func:`triton_tuning` says) or ``'tpu'`` (Mosaic) blocking and
    compiler parameters; ``interpret``: run the kernel with Pallas' interpreter instead (any platform; how the CPU
    runs both layouts)."""
    from jax.experimental import pallas as pl

    bw, heads, n_pad, d = q.shape
    nwb = full.shape[0]
    groups = _windows_per_step(bw, nwb, layout)
    tuning = _tuning("pallas", heads) if layout == "cuda" else TritonTuning()
    step = tuning.heads_per_step
    tile = pl.BlockSpec((groups, step, n_pad, d), lambda w, h: (w, h, 0, 0))
    if nwb > 1:
        bias_spec = pl.BlockSpec((groups, step, n_pad, n_pad), lambda w, h: (w % (nwb // groups), h, 0, 0))
    else:
        bias_spec = pl.BlockSpec((1, step, n_pad, n_pad), lambda w, h: (0, h, 0, 0))
    compiler_params = None  # the interpreter takes none
    if not interpret and layout == "cuda":
        from jax.experimental.pallas import triton as pl_triton

        compiler_params = pl_triton.CompilerParams(num_warps=tuning.num_warps, num_stages=1)
    elif not interpret and layout == "tpu":
        from jax.experimental.pallas import tpu as pl_tpu

        compiler_params = pl_tpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    kernel = functools.partial(_window_kernel, per_window_bias=nwb > 1, precision=_matmul_precision())
    return pl.pallas_call(
        kernel,
        grid=(bw // groups, heads // step),
        in_specs=[tile, tile, tile, bias_spec],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        compiler_params=compiler_params,
        name="swin_window_attention",
    )(q, k, v, full)


def _reference(q, k, v, full) -> jax.Array:
    """The kernel's function in plain JAX (same layout and rounding): its backward pass."""
    bw, heads, n_pad, _ = q.shape
    nwb = full.shape[0]
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k)
    s = (s.reshape(-1, nwb, heads, n_pad, n_pad) + full.astype(s.dtype)).reshape(bw, heads, n_pad, n_pad)
    p = softmax(s.astype(jnp.promote_types(s.dtype, jnp.float32))).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", p, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pallas_attention(kernel, reference, args: tuple) -> jax.Array:
    """``kernel(*args)``, differentiable in reverse mode only: the backward keeps ``args`` (q, k, v, the bias, ...)
    and recomputes the attention from them with ``reference(*args)`` (the same function in plain JAX), so no
    ``N x N`` tensor is kept for it."""
    return kernel(*args)


def _pallas_fwd(kernel, reference, args):
    return kernel(*args), args


def _pallas_bwd(kernel, reference, args, g):
    del kernel
    _, vjp = jax.vjp(reference, *args)
    return (vjp(g),)


_pallas_attention.defvjp(_pallas_fwd, _pallas_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _pallas_attention_any_mode(kernel, reference, args: tuple) -> jax.Array:
    """``kernel(*args)``, differentiable in both modes as ``reference`` (the same function in plain JAX) is: a
    differentiated call runs ``reference`` alone, values and tangent, which reverse mode transposes, and a backward
    pass keeps its probabilities, as the einsum path does. Its tangent needs those probabilities anyway, so the
    kernel would only compute them a second time."""
    return kernel(*args)


@_pallas_attention_any_mode.defjvp
def _pallas_jvp(kernel, reference, primals, tangents):
    del kernel
    (args,), (dargs,) = primals, tangents
    return jax.jvp(reference, args, dargs)


def _differentiable(kernel, reference, args: tuple, reverse_only: bool) -> jax.Array:
    """``kernel(*args)`` with ``reference``'s derivatives: recomputed in the backward pass (``reverse_only``), else
    plain JAX's in both modes."""
    rule = _pallas_attention if reverse_only else _pallas_attention_any_mode
    return rule(kernel, reference, args)


def _pallas(q, k, v, bias, mask, platform: str, reverse_only: bool) -> jax.Array:
    n = q.shape[1]
    layout = "tpu" if platform == "tpu" else "cuda"  # the CPU interprets Triton's layout: CPU tests cover it
    n_pad = _padded_tokens(n, layout)
    full = _bias_and_mask(bias, mask, n_pad, q.dtype)

    d = q.shape[-1]
    d_pad = d if layout == "tpu" else _triton_size(d)  # zero channels change no logit and give zero outputs

    def heads_major(t):  # [BW, N, heads, d] -> [BW, heads, Np, d or Dp]
        t = _pad_tokens(t, n_pad).transpose(0, 2, 1, 3)
        return t if d_pad == d else jnp.pad(t, ((0, 0), (0, 0), (0, 0), (0, d_pad - d)))

    kernel = functools.partial(_pallas_forward, layout=layout, interpret=platform == "cpu")
    out = _differentiable(kernel, _reference, (heads_major(q), heads_major(k), heads_major(v), full), reverse_only)
    return out.transpose(0, 2, 1, 3)[:, :n, :, :d]


# ------------------------------------------------------------------------------------------------------------
# Fused Pallas kernel: shift, pad, partition, attention and merge on the block's map
# ------------------------------------------------------------------------------------------------------------


class MapGeometry(NamedTuple):
    """A block's attention geometry on its map: the feature ``size`` (H, W), the (clipped) ``window`` and the
    cyclic ``shift`` (0 for a regular block), as timm's block uses them."""

    size: tuple[int, int]
    window: tuple[int, int]
    shift: tuple[int, int]


def _region(coord: jax.Array, padded: int, window: int, shift: int) -> jax.Array:
    """timm's shift-mask region along one axis of the shifted, padded map: 0 before the last window, 1 in it, 2 in
    its last ``shift`` rows (the ones the cyclic shift wrapped around)."""
    region = (coord >= padded - window).astype(jnp.int32)
    if shift:
        region = region + (coord >= padded - shift).astype(jnp.int32)
    return region


def _map_kernel(
    qkv_ref, b_ref, *refs, geometry: MapGeometry, q_scale: float | None, n_pad: int, heads_per_step: int, precision
):
    """One grid step: one window of one image and ``heads_per_step`` heads, gathered from the unshifted map.

    Refs: qkv ``[B, H * W, 3, heads, d]`` (the map's tokens row-major, as the qkv projection writes them), bias
    ``[heads, Np, Np]`` (padded keys at the dtype's minimum), where timm pads the map the k and v of a padded token
    ``[2, heads, d]`` (a zero token's projection), and the output ``[B, H * W, heads, d]``. q is multiplied by
    ``q_scale`` here (in the compute dtype, as the einsum path does) unless it is None.

    Token ``t`` of window ``(a, b)`` sits at ``(i, j) = (a * wh + t // ww, b * ww + t % ww)`` of the shifted,
    padded map: timm's ``roll(-shift)`` puts the unshifted map's ``((i + sh) % H, (j + sw) % W)`` there when
    ``i < H`` and ``j < W``, and its bottom/right padding elsewhere. Loads gather those rows and the store scatters
    the outputs back to them, so the roll, the padding, the partition and the merge are index arithmetic. The
    shift mask is timm's (-100 between tokens of different regions), computed from ``(i, j)``; the kernel's own
    padded tokens (``t >= wh * ww``) are masked exactly and not stored."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pl_triton

    from .models._windows import MASK_VALUE

    *pad_ref, o_ref = refs
    (h, w), (wh, ww), (sh, sw) = geometry
    hp, wp = _round_up(h, wh), _round_up(w, ww)
    d, d_pad = qkv_ref.shape[-1], _triton_size(qkv_ref.shape[-1])
    # the first head of this program; with one head per program no index arithmetic is emitted for it, so the
    # default launch's Triton IR is the one compiled and checked before launches were a setting
    image, window, first = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if heads_per_step > 1:
        first = first * heads_per_step
    t = jax.lax.broadcasted_iota(jnp.int32, (n_pad,), 0)
    i = (window // (wp // ww)) * wh + t // ww
    j = (window % (wp // ww)) * ww + t % ww
    real = (t < wh * ww) & (i < h) & (j < w)
    source = jnp.where(real, ((i + sh) % h) * w + (j + sw) % w, 0)
    # a head's channels, padded to a Triton size with zeros (they change no logit and give zero outputs)
    channel = jax.lax.broadcasted_iota(jnp.int32, (n_pad, d_pad), 1)
    in_head = channel < d
    read = channel if d_pad == d else jnp.minimum(channel, d - 1)  # the plain iota keeps Triton's loads vectorized
    rows, real_rows = (jnp.broadcast_to(a[:, None], (n_pad, d_pad)) for a in (source, real))

    def load(ref, *index):
        x = ref[index]
        return x if d_pad == d else jnp.where(in_head, x, jnp.zeros_like(x))

    mask = out_rows = None  # computed for the first head, shared by the others
    for step in range(heads_per_step):
        head = first + step if step else first
        q, k, v = (load(qkv_ref, image, rows, part, head, read) for part in range(3))
        if q_scale is not None:
            q = q * jnp.asarray(q_scale, q.dtype)
        if pad_ref:  # timm's padded tokens are keys too: a zero token's k and v
            zero = jnp.zeros((n_pad, d_pad), jnp.int32)
            k = jnp.where(real_rows, k, load(pad_ref[0], zero, head, read))
            v = jnp.where(real_rows, v, load(pad_ref[0], zero + 1, head, read))
        full = b_ref[head]
        if sh or sw:
            if mask is None:
                region = _region(i, hp, wh, sh) * 3 + _region(j, wp, ww, sw)
                mask = jnp.where(region[:, None] == region[None, :], 0.0, MASK_VALUE).astype(full.dtype)
            full = full + mask
        o = _attend(q, k, v, full, precision)
        if out_rows is None:
            # tokens that are no map token, and padded channels, go past the end, where the masked store drops them
            out_rows = jnp.broadcast_to(jnp.where(real, source, h * w)[:, None], (n_pad, d_pad))
            stored = real_rows if d_pad == d else real_rows & in_head
        pl_triton.store(o_ref.at[image, out_rows, head, channel], o.astype(o_ref.dtype), mask=stored)


def _map_forward(qkv, bias, pad_kv, geometry: MapGeometry, q_scale: float | None, interpret: bool) -> jax.Array:
    """The fused kernel (Triton's layout, launched as :func:`triton_tuning` says; ``interpret``: Pallas'
    interpreter). ``qkv`` ``[B, H * W, 3, heads, d]``, ``bias`` ``[heads, N, N]``, ``pad_kv`` ``[2, heads, d]`` or
    None -> ``[B, H * W, heads, d]``."""
    from jax.experimental import pallas as pl

    batch, tokens, _, heads, d = qkv.shape
    (h, w), (wh, ww), _ = geometry
    n_pad = _padded_tokens(wh * ww, "cuda")
    full = _bias_and_mask(bias, None, n_pad, qkv.dtype)[0]
    tuning = _tuning("pallas_fused", heads)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as pl_triton

        compiler_params = pl_triton.CompilerParams(num_warps=tuning.num_warps, num_stages=1)
    kernel = functools.partial(
        _map_kernel,
        geometry=geometry,
        q_scale=q_scale,
        n_pad=n_pad,
        heads_per_step=tuning.heads_per_step,
        precision=_matmul_precision(),
    )
    return pl.pallas_call(
        kernel,
        grid=(batch, _round_up(h, wh) // wh * (_round_up(w, ww) // ww), heads // tuning.heads_per_step),
        out_shape=jax.ShapeDtypeStruct((batch, tokens, heads, d), qkv.dtype),
        interpret=interpret,
        compiler_params=compiler_params,
        name="swin_fused_window_attention",
    )(qkv, full, *(() if pad_kv is None else (pad_kv,)))


def _map_reference(qkv, bias, pad_kv, geometry: MapGeometry, q_scale: float | None) -> jax.Array:
    """The fused kernel's function in plain JAX, as the block computes it unfused: timm's shift, padding (padded
    tokens' k and v from ``pad_kv``), partition, the einsum path's attention, merge. Its derivatives."""
    from .models._windows import merge_windows, partition_windows, window_partition

    batch, _, _, heads, d = qkv.shape
    (h, w), window, shift = geometry
    k_pad, v_pad = (None, None) if pad_kv is None else pad_kv
    if pad_kv is not None:
        # the roll moves no padding: in window layout, the map's tokens are where whole windows of ones are
        ones = np.ones((1, _round_up(h, window[0]), _round_up(w, window[1]), 1), bool)
        ones[:, h:] = ones[:, :, w:] = False
        real = window_partition(ones, window).reshape(1, -1, window[0] * window[1], 1)

    def windows(t, pad_value):  # [B, H * W, heads, d] -> [B * nW, N, heads, d]
        x, mask, padded = partition_windows(t.reshape(batch, h, w, heads * d), window, shift)
        if pad_value is not None:
            x = jnp.where(real, x.reshape(batch, -1, *x.shape[1:]), pad_value.reshape(-1)).reshape(x.shape)
        return x.reshape(*x.shape[:2], heads, d), mask, padded

    q = qkv[:, :, 0] if q_scale is None else qkv[:, :, 0] * jnp.asarray(q_scale, qkv.dtype)
    (qw, mask, padded), (kw, _, _), (vw, _, _) = (
        windows(q, None),
        windows(qkv[:, :, 1], k_pad),
        windows(qkv[:, :, 2], v_pad),
    )
    out = softmax_attention(qw, kw, vw, bias, mask)
    return merge_windows(out.reshape(*out.shape[:2], heads * d), window, shift, (h, w), padded).reshape(
        batch, h * w, heads, d
    )


def map_attention(
    qkv, bias, pad_kv, geometry: MapGeometry, *, q_scale: float | None = None, reverse_only: bool = False
) -> jax.Array:
    """Window attention on a block's whole map with the fused kernel (``attn_impl='pallas_fused'``): timm's cyclic
    shift, padding to whole windows, partition, attention with the bias and shift mask, merge and reverse shift,
    in one Pallas kernel that gathers each window's tokens from the map (:func:`_map_kernel`).

    Args:
        qkv: the map's tokens' q, k, v ``[B, H * W, 3, heads, d]``, row-major (the qkv projection's output, reshaped:
            no copy).
        bias: relative position bias ``[heads, N, N]``.
        pad_kv: ``[2, heads, d]``: k and v of a padded token (the projection of a zero token: timm pads the map with
            zeros before the projection), or None when the map is whole windows.
        geometry: the block's size, window and shift.
        q_scale: the factor on q (applied in the kernel, in the compute dtype), or None for a q already scaled.
        reverse_only: as :func:`window_attention`: the backward recomputes the attention in plain JAX
            (:func:`_map_reference`), else the derivatives are plain JAX's in both modes.

    Returns:
        ``[B, H * W, heads, d]``, the attention output at each map token (its merge and reverse shift done).
        Triton on CUDA, interpreted elsewhere (models run it on CPU and CUDA only: :func:`resolve` sends TPU to the
        windowed ``'pallas'`` kernel).
    """
    static = dict(geometry=geometry, q_scale=q_scale)
    kernel = functools.partial(_map_forward, **static, interpret=target_platform() != "cuda")
    return _differentiable(kernel, functools.partial(_map_reference, **static), (qkv, bias, pad_kv), reverse_only)


def window_attention(impl: str, q, k, v, bias, mask: np.ndarray | None, *, reverse_only: bool = False) -> jax.Array:
    """Attention in each window with ``impl`` (a resolved name: see :func:`resolve`).

    Args:
        impl: ``'einsum'``, ``'xla'``, ``'cudnn'`` or ``'pallas'`` (``'pallas_fused'`` runs on the block's map:
            :func:`map_attention`).
        q, k, v: ``[B * nW, N, heads, d]``, q already scaled.
        bias: relative position bias ``[heads, N, N]``.
        mask: shift mask ``[nW, N, N]`` or None.
        reverse_only: the caller is differentiated in reverse mode only (the model is traced in
            :func:`swin_jax.models.reverse_mode`). Then the Pallas kernel's backward recomputes the attention from
            q, k, v and the bias, keeping no ``N x N`` tensor; otherwise a differentiated call runs the plain-JAX
            function instead of the kernel, values and derivatives, in either mode (``jax.jvp`` works; reverse mode
            transposes it), and a backward pass keeps its probabilities, as the einsum path does. Undifferentiated
            calls run the kernel. The other implementations ignore it.

    Returns:
        ``[B * nW, N, heads, d]``.
    """
    if impl == "einsum":
        return softmax_attention(q, k, v, bias, mask)
    if impl == "xla":
        return _dot_product(q, k, v, bias, mask, "xla", pad=False)
    if impl == "cudnn":  # elsewhere, cuDNN's padded layout through XLA (how the CPU tests cover it)
        return _dot_product(q, k, v, bias, mask, "cudnn" if target_platform() == "cuda" else "xla", pad=True)
    if impl == "pallas":
        return _pallas(q, k, v, bias, mask, target_platform(), reverse_only)
    raise ValueError(f"window_attention does not run {impl!r}")
