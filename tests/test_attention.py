"""The attention implementations (swin_jax.attention): each computes timm's function, forward and backward, and
lowers for every platform it claims. The einsum path is the one test_model and test_train check throughout."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parity import (
    FP32_REL_TOL,
    assert_close,
    assert_grads_close,
    grads_as_timm,
    images,
    jax_from_timm,
    timm_grads,
    timm_model,
    timm_outputs,
)

import swin_jax
from swin_jax import attention
from swin_jax.export import ExportError, export_model
from swin_jax.models import reverse_mode
from swin_jax.train import cross_entropy

ARCH = "swin_tiny_patch4_window7_224"
# non-square 64x48 -> 16x12 patches; window 5: both stages are padded (16x12 -> 20x15, 8x6 -> 10x10), their
# second block is shifted by 2 (the mask: several windows' biases) and their first is not (one bias for all).
# Padded tokens are real keys in timm (qkv of zeros), so the kernels' own padding (25 -> 32) must be masked exactly,
# and timm's must not. (Clipped windows change only the geometry, which the einsum path's tests cover.)
CFG = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), img_size=(64, 48), window_size=5, num_classes=10)
KERNEL_IMPLS = ("xla", "cudnn", "pallas")
BF16_REL_TOL = 2e-2  # bf16 compute vs fp32, as test_inference


@pytest.fixture(scope="module")
def reference():
    tm = timm_model(ARCH, **CFG)
    x, y = images((2, 64, 48, 3), seed=1), np.array([3, 7])
    return tm, x, y, timm_outputs(tm, x), timm_grads(tm, x, y)


def _maps_logits_grads(model, x, y):
    """Stage maps, logits and parameter gradients of the cross-entropy loss (jit it: one compiled program)."""

    def loss(m):
        final, maps = m.forward_intermediates(x)
        logits = m.forward_head(final)
        return cross_entropy(logits, y, num_classes=m.num_classes), (maps, logits)

    (_, (maps, logits)), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return maps, logits, grads


@pytest.mark.parametrize(
    "impl, reverse",
    [(impl, False) for impl in KERNEL_IMPLS] + [("pallas", True)],
    ids=[*KERNEL_IMPLS, "pallas-reverse_mode"],
)
def test_impl_matches_timm_outputs_and_gradients(reference, impl, reverse, monkeypatch):
    """Outputs and gradients. The Pallas kernel has two derivative rules: plain JAX's jvp (both modes; the default)
    and, traced in ``reverse_mode()`` as a training step is, a backward that recomputes the attention."""
    tm, x, y, ref, ref_grads = reference
    model = jax_from_timm(tm, ARCH, attn_impl=impl, **CFG)
    used = []

    def spy(rule, f):
        return lambda *args: used.append(rule) or f(*args)

    for rule in ("_pallas_attention", "_pallas_attention_any_mode"):
        monkeypatch.setattr(attention, rule, spy(rule, getattr(attention, rule)))
    with reverse_mode() if reverse else contextlib.nullcontext():  # a fresh jit: its trace sees the context
        maps, logits, grads = nnx.jit(_maps_logits_grads)(model, jnp.asarray(x), jnp.asarray(y))
    if impl == "pallas":
        assert set(used) == {"_pallas_attention" if reverse else "_pallas_attention_any_mode"}
    assert_close(logits, ref["logits"], what=f"{impl} logits")
    for i, (a, b) in enumerate(zip(maps, ref["maps"], strict=True)):
        assert_close(a, b, what=f"{impl} stage {i} map")
    assert_grads_close(grads_as_timm(model, grads), ref_grads)


@pytest.mark.parametrize("layout", ["cuda", "tpu"])
@pytest.mark.parametrize("masked", [False, True], ids=["bias", "bias+mask"])
def test_kernel_layouts_interpreted_equal_reference(layout, masked):
    """Both kernel layouts (Triton's one window per step, TPU's eight), interpreted, against the plain-JAX
    function they implement, with 25-token windows padded to 32 and padded keys masked."""
    rng = np.random.default_rng(0)
    bw, heads, n, d, nw = 16, 2, 25, 8, 8
    n_pad = attention._padded_tokens(n, layout)
    assert n_pad == 32
    assert attention._windows_per_step(bw, nw if masked else 1, layout) == (8 if layout == "tpu" else 1)
    q, k, v = (jnp.asarray(rng.standard_normal((bw, heads, n_pad, d)), jnp.float32) for _ in range(3))
    bias = jnp.asarray(rng.standard_normal((heads, n, n)), jnp.float32)
    mask = np.where(rng.random((nw, n, n)) < 0.3, np.float32(-100.0), np.float32(0.0)) if masked else None
    full = attention._bias_and_mask(bias, mask, n_pad, jnp.float32)
    out = attention._pallas_forward(q, k, v, full, layout, interpret=True)
    ref = attention._reference(q, k, v, full)
    assert_close(out[:, :, :n], ref[:, :, :n], what=f"{layout} kernel")
    # the padded keys carry no weight: changing their values changes nothing
    k2, v2 = k.at[:, :, n:].set(7.0), v.at[:, :, n:].set(-7.0)
    out2 = attention._pallas_forward(q, k2, v2, full, layout, interpret=True)
    np.testing.assert_array_equal(np.asarray(out2[:, :, :n]), np.asarray(out[:, :, :n]))
    # bf16 compute: as the einsum path rounds (logits and bias in bf16, softmax in f32), close to fp32
    q16, k16, v16 = (t.astype(jnp.bfloat16) for t in (q, k, v))
    full16 = attention._bias_and_mask(bias.astype(jnp.bfloat16), mask, n_pad, jnp.bfloat16)
    out16 = attention._pallas_forward(q16, k16, v16, full16, layout, interpret=True)
    assert out16.dtype == jnp.bfloat16
    assert_close(out16[:, :, :n].astype(jnp.float32), ref[:, :, :n], tol=BF16_REL_TOL, what=f"{layout} bf16")


def test_impl_names_listed_and_unknown_refused():
    assert swin_jax.attention_impls() == ("auto", "einsum", "xla", "cudnn", "pallas")
    with pytest.raises(ValueError, match="unknown attn_impl 'flash'; expected one of auto, einsum, xla, cudnn"):
        swin_jax.create_model(ARCH, attn_impl="flash", **CFG)
    model = swin_jax.create_model(ARCH, **CFG)
    with pytest.raises(ValueError, match="unknown attn_impl"):
        model.set_attn_impl("Pallas")
    assert {b.attn.attn_impl for s in model.layers for b in s.blocks} == {"auto"}
    assert attention.resolve("auto", "cpu") == attention.AUTO_PICKS["cpu"]
    assert attention.resolve("pallas", "rocm") == "xla"  # no kernel backend there: plain JAX
    here = attention.target_platform()
    with attention.lowering_for("tpu"):
        assert attention.target_platform() == "tpu"
    assert attention.target_platform() == here


def test_attention_dropout_runs_the_einsum_path():
    """Only the einsum path applies dropout to the attention weights: a model training with attn_drop_rate > 0
    uses it whatever attn_impl says, and gives the same result as the einsum model from the same RNG state."""
    kw = dict(CFG, img_size=32, depths=(2,), num_heads=(2,), attn_drop_rate=0.5)
    x = jnp.asarray(images((2, 32, 32, 3)))
    outs = []
    for impl in ("einsum", "pallas"):
        model = swin_jax.create_model(ARCH, attn_impl=impl, rngs=nnx.Rngs(0), **kw)
        model.train()
        outs.append(np.asarray(nnx.jit(lambda m, x: m(x))(model, x)))
    np.testing.assert_array_equal(outs[1], outs[0])


# ----------------------------------------------------------------------------------------------------------
# lowering for every platform (jax.export needs no such device)
# ----------------------------------------------------------------------------------------------------------

EXPORT_CFG = dict(embed_dim=16, depths=(2, 1), num_heads=(2, 2), img_size=(32, 24), window_size=5, num_classes=4)
KERNEL_MARK = {("pallas", "cuda"): swin_jax.export._triton_call(), ("pallas", "tpu"): "tpu_custom_call"}


@pytest.fixture(scope="module")
def export_models():
    base = swin_jax.create_model(ARCH, **EXPORT_CFG, rngs=nnx.Rngs(0))
    x = images((2, 32, 24, 3), seed=3)
    return base, x, np.asarray(jax.jit(lambda m, x: m(x))(base, x))


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
@pytest.mark.parametrize("impl", ["einsum", *KERNEL_IMPLS])
def test_every_impl_lowers_for_every_platform(export_models, impl, platform):
    base, x, expected = export_models
    model = nnx.clone(base)
    model.set_attn_impl(impl)
    if (impl, platform) == ("cudnn", "cuda"):  # jax lowers cuDNN attention only where cuDNN is present
        with pytest.raises(ExportError, match="lowers cuDNN attention, and jax lowers that only where cuDNN"):
            export_model(model, platforms=[platform], batch_size=2)
        return
    exported = export_model(model, platforms=[platform], batch_size=2)
    assert exported.platforms == (platform,)
    text = exported.mlir_module()
    for (kernel_impl, kernel_platform), mark in KERNEL_MARK.items():
        assert (mark in text) == ((impl, platform) == (kernel_impl, kernel_platform)), mark
    exported = jax.export.deserialize(exported.serialize())
    if platform == "cpu":
        assert_close(exported.call(x), expected, tol=FP32_REL_TOL, what=f"{impl} artifact")


@pytest.mark.parametrize("impl", ["pallas", "cudnn"])
def test_kernel_impls_refuse_multi_platform_artifacts(export_models, impl):
    model = nnx.clone(export_models[0])
    model.set_attn_impl(impl)
    with pytest.raises(ExportError, match="cannot share a multi-platform artifact; export one platform at a time"):
        export_model(model, platforms=["cpu", "cuda", "tpu"])
    model.set_attn_impl("xla")
    assert export_model(model, platforms=["cpu", "cuda", "tpu"]).platforms == ("cpu", "cuda", "tpu")
