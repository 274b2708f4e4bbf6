"""The attention implementations (swin_jax.attention): each computes timm's function, forward and backward, and
lowers for every platform it claims. The einsum path is the one test_model and test_train check throughout."""

from __future__ import annotations

import contextlib
import functools

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
    rel_err,
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
KERNEL_IMPLS = ("xla", "cudnn", "pallas", "pallas_fused")
PALLAS_IMPLS = ("pallas", "pallas_fused")
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


@pytest.fixture(scope="module")
def fp32_runs(reference):
    """``run(impl, reverse)``: the fp32 model with the reference's weights and ``attn_impl=impl``, its stage maps,
    logits and gradients from one compiled program (traced in ``reverse_mode()`` if ``reverse``), and which Pallas
    derivative rules the trace called. Memoized: the parity test and the fused-vs-windowed comparison share them."""
    tm, x, y, _, _ = reference
    done = {}

    def run(impl: str, reverse: bool):
        if (impl, reverse) not in done:
            model = jax_from_timm(tm, ARCH, attn_impl=impl, **CFG)
            used = []

            def spy(rule, f):
                return lambda *args: used.append(rule) or f(*args)

            with pytest.MonkeyPatch.context() as patch:
                for rule in ("_pallas_attention", "_pallas_attention_any_mode"):
                    patch.setattr(attention, rule, spy(rule, getattr(attention, rule)))
                with reverse_mode() if reverse else contextlib.nullcontext():  # a fresh jit: its trace sees the context
                    maps, logits, grads = nnx.jit(_maps_logits_grads)(model, jnp.asarray(x), jnp.asarray(y))
            done[impl, reverse] = model, set(used), maps, logits, grads
        return done[impl, reverse]

    return run


# the tests that read the reverse-mode runs of fp32_runs run on one xdist worker, which computes each run once
REVERSE_MODE_RUNS = pytest.mark.xdist_group("attention_reverse_mode_runs")


@pytest.mark.parametrize(
    "impl, reverse",
    [pytest.param(impl, False, id=impl) for impl in KERNEL_IMPLS]
    + [pytest.param(impl, True, id=f"{impl}-reverse_mode", marks=REVERSE_MODE_RUNS) for impl in PALLAS_IMPLS],
)
def test_impl_matches_timm_outputs_and_gradients(reference, fp32_runs, impl, reverse):
    """Outputs and gradients. The Pallas kernels have two derivative rules: plain JAX's jvp (both modes; the default)
    and, traced in ``reverse_mode()`` as a training step is, a backward that recomputes the attention. The fused
    kernel runs on the maps of CFG's padded stages (16x12 -> 20x15 with a shift of 2: the cyclic shift carries the
    map's first rows into the second-to-last window row, timm's roll-then-pad order)."""
    _, _, _, ref, ref_grads = reference
    model, used, maps, logits, grads = fp32_runs(impl, reverse)
    if impl in PALLAS_IMPLS:
        assert used == {"_pallas_attention" if reverse else "_pallas_attention_any_mode"}
    assert_close(logits, ref["logits"], what=f"{impl} logits")
    for i, (a, b) in enumerate(zip(maps, ref["maps"], strict=True)):
        assert_close(a, b, what=f"{impl} stage {i} map")
    assert_grads_close(grads_as_timm(model, grads), ref_grads)


@pytest.mark.parametrize("impl", PALLAS_IMPLS)
def test_differentiated_calls_run_the_kernel_only_where_it_saves_work(impl):
    """Undifferentiated, and differentiated in ``reverse_mode()`` (the backward recomputes the attention), each block
    runs the Pallas kernel. Differentiated outside it, the derivative needs the plain-JAX function's probabilities
    anyway, so that function runs in the kernel's place: no kernel call to compute the attention a second time."""
    model = swin_jax.create_model(ARCH, attn_impl=impl, **CFG)
    graph, state = nnx.split(model)
    x = jnp.asarray(images((1, 64, 48, 3), seed=2))

    def loss(state, x):
        return jnp.sum(nnx.merge(graph, state)(x) ** 2)

    def kernel_calls(f) -> int:
        return str(jax.make_jaxpr(f)(state, x)).count("pallas_call")

    def grad_in_reverse_mode(state, x):
        with reverse_mode():
            return jax.grad(loss)(state, x)

    blocks = sum(CFG["depths"])
    assert kernel_calls(loss) == kernel_calls(grad_in_reverse_mode) == blocks
    assert kernel_calls(jax.grad(loss)) == kernel_calls(lambda s, x: jax.jvp(loss, (s, x), (s, x))) == 0


def _logits_and_maps(model, x) -> list[np.ndarray]:
    final, maps = nnx.jit(lambda m, x: m.forward_intermediates(x))(model, jnp.asarray(x))
    return [np.asarray(model.forward_head(final), np.float32), *(np.asarray(m, np.float32) for m in maps)]


@REVERSE_MODE_RUNS
def test_bf16_models_and_the_fused_kernel_against_the_windowed_one(reference, fp32_runs):
    """bf16 compute, as a GPU runs them: each implementation's logits and stage maps within BF16_REL_TOL of timm's
    fp32 (the kernels' are closer than the einsum path's here: 5e-3 against 8e-3 on the logits). And the fused
    kernel computes what the windowed one does on XLA's windows, in fp32 far inside the timm tolerance: the same
    kernel arithmetic, so only the projections' summation order could differ (on an AMD Genoa, under its default,
    AVX2 and SSE4.2 kernels alike, the two are equal to the bit, bf16 included). The fp32 outputs compared are the
    forward passes of the reverse-mode gradient programs above, where each block runs its kernel (outside
    ``reverse_mode()`` a differentiated kernel runs its plain-JAX function instead)."""
    tm, x, _, ref, _ = reference
    for impl in KERNEL_IMPLS:  # the einsum path's bf16: test_inference
        outs = _logits_and_maps(jax_from_timm(tm, ARCH, attn_impl=impl, dtype=jnp.bfloat16, **CFG), x)
        for what, a, b in zip(("logits", "stage 0", "stage 1"), outs, [ref["logits"], *ref["maps"]], strict=True):
            assert_close(a, b, tol=BF16_REL_TOL, what=f"{impl} bf16 {what}")
    windowed, fused = ([run[3], *run[2]] for run in (fp32_runs(i, True) for i in PALLAS_IMPLS))
    for a, b in zip(fused, windowed, strict=True):
        assert_close(a, b, tol=FP32_REL_TOL / 4, what="fused vs windowed kernel")


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
    # one compiled program each per dtype (op by op, the reference and the bias term compiled every op alone)
    bias_and_mask = jax.jit(lambda bias: attention._bias_and_mask(bias, mask, n_pad, bias.dtype))
    kernel = jax.jit(lambda q, k, v, full: attention._pallas_forward(q, k, v, full, layout, interpret=True))
    full = bias_and_mask(bias)
    out = kernel(q, k, v, full)
    ref = jax.jit(attention._reference)(q, k, v, full)
    assert_close(out[:, :, :n], ref[:, :, :n], what=f"{layout} kernel")
    # the padded keys carry no weight: changing their values changes nothing
    k2, v2 = k.at[:, :, n:].set(7.0), v.at[:, :, n:].set(-7.0)
    out2 = kernel(q, k2, v2, full)
    np.testing.assert_array_equal(np.asarray(out2[:, :, :n]), np.asarray(out[:, :, :n]))
    # bf16 compute: as the einsum path rounds (logits and bias in bf16, softmax in f32), close to fp32
    q16, k16, v16 = (t.astype(jnp.bfloat16) for t in (q, k, v))
    full16 = bias_and_mask(bias.astype(jnp.bfloat16))
    out16 = kernel(q16, k16, v16, full16)
    assert out16.dtype == jnp.bfloat16
    assert_close(out16[:, :, :n].astype(jnp.float32), ref[:, :, :n], tol=BF16_REL_TOL, what=f"{layout} bf16")


# (map size, window, shift): whole windows (shifted or not); timm's padding with the shift wrapping the map's first
# rows into a window that is not the last (9 -> 14, shift 3); a shift along one axis; non-square windows and maps
FUSED_GEOMETRIES = [
    ((14, 14), (7, 7), (3, 3)),
    ((14, 14), (7, 7), (0, 0)),
    ((9, 9), (7, 7), (3, 3)),
    ((10, 7), (5, 7), (2, 0)),
    ((12, 15), (4, 5), (2, 2)),
    ((6, 11), (3, 4), (0, 0)),
]


@pytest.mark.parametrize("size, window, shift", FUSED_GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
def test_fused_kernel_interpreted_equals_reference_and_lowers_for_triton(size, window, shift):
    """The fused kernel (shift, padding, partition and merge as index arithmetic) against its plain-JAX function
    (timm's roll, pad, partition, the einsum path's attention, merge): fp32, float64 (interpreted, it stays float64)
    and bf16, with q scaled in the kernel or before it. Every map token is written once (the interpreter starts the
    output at NaN); the k and v of timm's padded tokens are used exactly where timm pads. And the kernel lowers for
    CUDA (Triton) here, no GPU needed."""
    rng = np.random.default_rng(0)
    (h, w), n = size, window[0] * window[1]
    batch, heads, d = 2, 2, 16
    geometry = attention.MapGeometry(size, window, shift)
    padded = bool(h % window[0] or w % window[1])
    qkv, bias = rng.standard_normal((batch, h * w, 3, heads, d)), rng.standard_normal((heads, n, n))
    pad_kv = rng.standard_normal((2, heads, d)) if padded else None

    def cast(dtype):
        return [None if a is None else jnp.asarray(a, dtype) for a in (qkv, bias, pad_kv)]

    # one compiled program each per dtype (op by op, the reference and the kernel's bias term compiled every op alone)
    @functools.partial(jax.jit, static_argnums=3)
    def kernel(qkv, bias, pad_kv, q_scale=0.25):
        return attention._map_forward(qkv, bias, pad_kv, geometry, q_scale, interpret=True)

    @jax.jit
    def reference(qkv, bias, pad_kv):
        return attention._map_reference(qkv, bias, pad_kv, geometry, 0.25)

    with jax.enable_x64(True):
        out64 = kernel(*cast(jnp.float64))
        ref64 = reference(*cast(jnp.float64))
        assert out64.dtype == jnp.float64 and out64.shape == (batch, h * w, heads, d)
        np.testing.assert_allclose(np.asarray(out64), np.asarray(ref64), rtol=1e-12, atol=1e-12)
        ref64 = np.asarray(ref64)
    a32 = cast(jnp.float32)
    out = kernel(*a32)
    assert not np.isnan(np.asarray(out)).any()
    assert_close(out, ref64, what="fused kernel fp32")
    assert_close(reference(*a32), ref64, what="reference fp32")
    prescaled = [a32[0].at[:, :, 0].multiply(0.25), *a32[1:]]
    assert_close(kernel(*prescaled, None), ref64, what="q scaled before")
    if padded:  # the padded tokens' k and v matter, so they are used
        moved = [*a32[:2], a32[2] + 1.0]
        assert rel_err(kernel(*moved), ref64) > 1e-3
    a16 = cast(jnp.bfloat16)
    out16 = kernel(*a16)
    assert out16.dtype == jnp.bfloat16
    assert_close(out16.astype(jnp.float32), ref64, tol=BF16_REL_TOL, what="fused kernel bf16")
    fn = jax.jit(lambda *a: attention._map_forward(*a, geometry, 0.25, interpret=False))
    triton = swin_jax.export._triton_call()
    unsafe = [jax.export.DisabledSafetyCheck.custom_call(triton)]
    text = jax.export.export(fn, platforms=["cuda"], disabled_checks=unsafe)(*a16).mlir_module()
    assert triton in text and "swin_fused_window_attention" in text


def test_kernels_take_any_head_dim():
    """Triton's tensors must have power-of-two sizes and its dots a side of at least 16: on CUDA the kernels pad a
    head's channels with zeros (24 -> 32 here, and 8 -> 16 in EXPORT_CFG). The padded layout, interpreted, computes
    the einsum path's function, and lowers for CUDA."""
    kw = dict(embed_dim=48, depths=(2,), num_heads=(2,), img_size=(36, 28), window_size=4, num_classes=3)
    x = jnp.asarray(images((2, 36, 28, 3), seed=5))
    base = swin_jax.create_model(ARCH, **kw, rngs=nnx.Rngs(0))
    expected = np.asarray(nnx.jit(lambda m, x: m(x))(base, x))
    for impl in PALLAS_IMPLS:
        model = nnx.clone(base)
        model.set_attn_impl(impl)
        assert_close(nnx.jit(lambda m, x: m(x))(model, x), expected, what=f"{impl}, head_dim 24")
        assert KERNEL_MARK[(impl, "cuda")][1] in export_model(model, platforms=["cuda"], batch_size=1).mlir_module()


def _cuda_launches(fn, *args) -> list[dict[str, int]]:
    """Each Triton call's launch (grid and warps) in ``fn`` exported for CUDA."""
    import re

    triton = swin_jax.export._triton_call()
    unsafe = [jax.export.DisabledSafetyCheck.custom_call(triton)]
    text = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=unsafe)(*args).mlir_module()
    calls = [line for line in text.splitlines() if triton in line and "num_warps" in line]
    keys = ("grid_x", "grid_y", "grid_z", "num_warps")
    return [{k: int(re.search(rf"{k} = (\d+)", line)[1]) for k in keys} for line in calls]


def test_triton_tuning_changes_the_launch_not_the_function():
    """attention.triton_tuning: several heads per program (a divisor of the head count: 3 of 4 heads runs 2) and
    another warp count launch fewer, larger programs that compute the same values, bit for bit, interpreted; the
    CUDA lowering carries the launch, and outside the block the defaults (TRITON_TUNING) are back."""
    rng = np.random.default_rng(1)
    heads, d = 4, 16
    geometry = attention.MapGeometry((9, 9), (7, 7), (3, 3))  # padded and shifted
    qkv, pad_kv = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 81, 3, heads, d), (2, heads, d)))
    bias = jnp.asarray(rng.standard_normal((heads, 49, 49)), jnp.float32)
    full = attention._bias_and_mask(bias, np.zeros((4, 49, 49), np.float32), 64, jnp.float32)
    q, k, v = (jnp.asarray(rng.standard_normal((8, heads, 64, d)), jnp.float32) for _ in range(3))

    def fused(interpret):
        return lambda *a: attention._map_forward(*a, pad_kv, geometry, 0.25, interpret=interpret)

    def windowed(interpret):
        return lambda *a: attention._pallas_forward(*a, "cuda", interpret=interpret)

    expected = fused(True)(qkv, bias), windowed(True)(q, k, v, full)
    for step in (3, 4):
        tuning = attention.TritonTuning(num_warps=2, heads_per_step=step)
        with attention.triton_tuning(pallas=tuning, pallas_fused=tuning):
            assert attention._tuning("pallas_fused", heads).heads_per_step == (2 if step == 3 else step)
            np.testing.assert_array_equal(np.asarray(fused(True)(qkv, bias)), np.asarray(expected[0]))
            np.testing.assert_array_equal(np.asarray(windowed(True)(q, k, v, full)), np.asarray(expected[1]))
            launches = _cuda_launches(fused(False), qkv, bias) + _cuda_launches(windowed(False), q, k, v, full)
        runs = 2 if step == 3 else step
        assert launches == [
            {"grid_x": 2, "grid_y": 4, "grid_z": heads // runs, "num_warps": 2},
            {"grid_x": 8, "grid_y": heads // runs, "grid_z": 1, "num_warps": 2},
        ]
    assert attention.TRITON_TUNING["pallas_fused"] == attention.TritonTuning(num_warps=4, heads_per_step=1)
    assert _cuda_launches(fused(False), qkv, bias) == [{"grid_x": 2, "grid_y": 4, "grid_z": heads, "num_warps": 4}]
    with pytest.raises(ValueError, match="no Triton kernel named flash; expected pallas, pallas_fused"):
        with attention.triton_tuning(flash=attention.TritonTuning()):
            pass
    with pytest.raises(ValueError, match="pallas: expected a TritonTuning of positive numbers"):
        with attention.triton_tuning(pallas=attention.TritonTuning(num_warps=0)):
            pass


def test_impl_names_listed_and_unknown_refused():
    assert swin_jax.attention_impls() == ("auto", "einsum", "xla", "cudnn", "pallas", "pallas_fused")
    with pytest.raises(ValueError, match="unknown attn_impl 'flash'; expected one of auto, einsum, xla, cudnn"):
        swin_jax.create_model(ARCH, attn_impl="flash", **CFG)
    model = swin_jax.create_model(ARCH, **CFG)
    with pytest.raises(ValueError, match="unknown attn_impl"):
        model.set_attn_impl("Pallas")
    assert {b.attn.attn_impl for s in model.layers for b in s.blocks} == {"auto"}
    assert attention.resolve("auto", "cpu") == attention.AUTO_PICKS["cpu"]
    assert attention.resolve("pallas", "rocm") == "xla"  # no kernel backend there: plain JAX
    assert attention.resolve("pallas_fused", "rocm") == "xla"
    assert attention.resolve("pallas_fused", "tpu") == "pallas"  # Mosaic gathers no rows: the windowed kernel
    assert [attention.resolve("pallas_fused", p) for p in ("cpu", "cuda")] == ["pallas_fused"] * 2
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
    for impl in ("einsum", *PALLAS_IMPLS):
        model = swin_jax.create_model(ARCH, attn_impl=impl, rngs=nnx.Rngs(0), **kw)
        model.train()
        outs.append(np.asarray(nnx.jit(lambda m, x: m(x))(model, x)))
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])


# ----------------------------------------------------------------------------------------------------------
# lowering for every platform (jax.export needs no such device)
# ----------------------------------------------------------------------------------------------------------

EXPORT_CFG = dict(embed_dim=16, depths=(2, 1), num_heads=(2, 2), img_size=(32, 24), window_size=5, num_classes=4)
# what each kernel leaves in the lowered module: the custom call and the kernel's name (TPU: the windowed kernel)
KERNEL_MARK = {
    ("pallas", "cuda"): (swin_jax.export._triton_call(), "swin_window_attention"),
    ("pallas", "tpu"): ("tpu_custom_call", "swin_window_attention"),
    ("pallas_fused", "cuda"): (swin_jax.export._triton_call(), "swin_fused_window_attention"),
    ("pallas_fused", "tpu"): ("tpu_custom_call", "swin_window_attention"),
}


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
    call, name = KERNEL_MARK.get((impl, platform), (None, None))
    for mark in {c for c, _ in KERNEL_MARK.values()}:
        assert (mark in text) == (mark == call), mark
    if name is not None:  # the interpreter (CPU) leaves the kernels' names in locations only
        assert {n for _, n in KERNEL_MARK.values() if n in text} == {name}
    exported = jax.export.deserialize(exported.serialize())
    if platform == "cpu":
        assert_close(exported.call(x), expected, tol=FP32_REL_TOL, what=f"{impl} artifact")


@pytest.mark.parametrize("impl", [*PALLAS_IMPLS, "cudnn"])
def test_kernel_impls_refuse_multi_platform_artifacts(export_models, impl):
    model = nnx.clone(export_models[0])
    model.set_attn_impl(impl)
    with pytest.raises(ExportError, match="cannot share a multi-platform artifact; export one platform at a time"):
        export_model(model, platforms=["cpu", "cuda", "tpu"])
    model.set_attn_impl("xla")
    assert export_model(model, platforms=["cpu", "cuda", "tpu"]).platforms == ("cpu", "cuda", "tpu")
