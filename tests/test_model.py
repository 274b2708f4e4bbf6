"""Parity of swin_jax with timm's Swin Transformer at fp32 (every comparison goes through tests/parity.py)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from parity import (
    F64_REL_TOL,
    abstract_model,
    assert_close,
    assert_parity,
    assert_parity_float64,
    images,
    jax_attention_weights,
    jax_from_timm,
    rel_err,
    timm_attention_probs,
    timm_model,
    to_nchw,
)

import swin_jax
from swin_jax.registry import ARCHITECTURES

TINY = "swin_tiny_patch4_window7_224"
# a small Swin: 4 stages with 2 blocks each (so every stage has a shifted block), 4 downsamplings
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))
# train-mode tests: two stages of two blocks (regular and shifted), 64 px; every kind of dropout site, few RNG
# draws to compile (XLA:CPU compiles threefry slowly: 11 s for the 4-stage SMALL model in train mode)
TRAIN_SMALL = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 2), img_size=64)
# bf16 compute against the fp32 reference (only for the dtype test; fp32 comparisons use FP32_REL_TOL)
BF16_REL_TOL = 2e-2
# The tests that run the small model eagerly (op by op: each op compiles once per shape, ~12 s on a 2-core CPU for the
# first call) run on one xdist worker, so that warm-up is paid once (on a second worker, even loaded from the
# persistent compilation cache, it took another ~3-4 s).
EAGER = pytest.mark.xdist_group("eager")


def _timm_call(tmodel: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tmodel(to_nchw(x)).numpy()


def _timm_pooled(tmodel: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return tmodel.forward_head(tmodel.forward_features(to_nchw(x)), pre_logits=True).numpy()


def _block_geometry(model) -> list[list[tuple]]:
    """(window, shift) of every block, per stage, for swin_jax or timm."""
    return [
        [(tuple(map(int, b.window_size)), tuple(map(int, b.shift_size))) for b in stage.blocks]
        for stage in model.layers
    ]


@pytest.fixture(scope="module")
def small_pair():
    """The small randomized timm model, its swin_jax twin and an input batch of 2."""
    tm = timm_model(TINY, **SMALL)
    return tm, jax_from_timm(tm, TINY, **SMALL), images((2, 224, 224, 3))


# ----------------------------------------------------------------------------------------------------------
# the one full-size model
# ----------------------------------------------------------------------------------------------------------


def test_full_swin_base_patch4_window7_224():
    name = "swin_base_patch4_window7_224"
    tm = timm_model(name)
    model = jax_from_timm(tm, name)
    assert model.num_classes == 1000 and model.num_features == 1024
    errs = assert_parity(model, tm, images((2, 224, 224, 3)))
    assert set(errs) == {"logits", "features", "pre_logits", "stage0", "stage1", "stage2", "stage3"}


# ----------------------------------------------------------------------------------------------------------
# every registered architecture, with its real patch / window / image size and head counts, shallow
# ----------------------------------------------------------------------------------------------------------


def _shallow(arch: str) -> dict:
    """Real heads, windows, patch and img_size; 2 blocks per stage; embed_dim scaled to 8 channels per head."""
    heads = ARCHITECTURES[arch]["num_heads"]
    return dict(depths=(2, 2, 2, 2), num_heads=heads, embed_dim=8 * heads[0])


# V1 architectures with distinct geometry under _shallow (small = tiny, s3_base = s3_tiny, large_384 = base_384 there);
# every architecture's parameters: tests/test_api.py; SwinV2's geometry: tests/test_swinv2.py
GEOMETRY_ARCHS = [
    "swin_tiny_patch4_window7_224",
    "swin_large_patch4_window7_224",
    "swin_base_patch4_window12_384",
    "swin_s3_tiny_224",
    "swin_s3_small_224",
]


@pytest.mark.parametrize("arch", GEOMETRY_ARCHS)
def test_every_architecture(arch):
    kw = _shallow(arch)
    tm = timm_model(arch, **kw)
    model = jax_from_timm(tm, arch, **kw)
    assert model.img_size == tuple(tm.patch_embed.img_size)
    # the per-block (clipped) window and shift are timm's
    assert _block_geometry(model) == _block_geometry(tm)
    size = model.img_size[0]
    assert_parity(model, tm, images((1, size, size, 3), seed=1))


def test_geometry_archs_cover_every_v1_architecture():
    """Every V1 architecture left out above has the image size and per-block windows and shifts of one that is
    tested (it differs in width and heads only)."""

    def geometry(arch):
        model = abstract_model(arch, **_shallow(arch))
        return model.img_size, _block_geometry(model)

    tested = [geometry(a) for a in GEOMETRY_ARCHS]
    for arch in swin_jax.list_models("swin_*"):
        assert geometry(arch) in tested, arch


def test_architecture_geometry_is_exercised():
    """The clipped-window cases the per-architecture test covers (checked here against timm)."""
    cases = {
        # s3 tiny at 224: stage maps 56, 28, 14, 7; window 14 on the 14x14 stage covers it: no shift
        "swin_s3_tiny_224": [((7, 7), (3, 3)), ((7, 7), (3, 3)), ((14, 14), (0, 0)), ((7, 7), (0, 0))],
        "swin_s3_small_224": [((14, 14), (7, 7)), ((14, 14), (7, 7)), ((14, 14), (0, 0)), ((7, 7), (0, 0))],
        # window 12 at 384: maps 96, 48, 24, 12 -> the last stage is one window, unshifted
        "swin_base_patch4_window12_384": [((12, 12), (6, 6))] * 3 + [((12, 12), (0, 0))],
    }
    for arch, want in cases.items():
        kw = _shallow(arch)
        geo = _block_geometry(abstract_model(arch, **kw))
        assert [stage[1] for stage in geo] == want, arch
        assert geo == _block_geometry(timm.create_model(arch, pretrained=False, **kw)), arch


# ----------------------------------------------------------------------------------------------------------
# input geometry and configuration variants (small model)
# ----------------------------------------------------------------------------------------------------------

VARIANTS = {
    # grids 24x40 -> 12x20 -> 6x10 -> 3x5: padding, and stage 2 has window (6, 7) with shift (0, 3)
    "non_square_96x160": (dict(img_size=(96, 160)), (1, 96, 160, 3)),
    # grids 25x33 -> 13x17 -> 7x9 -> 4x5: odd maps into every PatchMerging, padding in every stage; 5 input
    # channels, avgmax pooling
    "odd_100x132_in_chans_5_pool_avgmax": (
        dict(img_size=(100, 132), in_chans=5, global_pool="avgmax"),
        (1, 100, 132, 5),
    ),
    # grids 14x56 -> 7x28 -> 4x14 -> 2x7: one axis smaller than the window
    "clipped_56x224": (dict(img_size=(56, 224)), (1, 56, 224, 3)),
    # built for 224, run at 160x128: timm computes the shift masks from the input (dynamic mask)
    "dynamic_160x128": (dict(strict_img_size=False), (2, 160, 128, 3)),
    # built for 96x160 (clipped windows), run at a larger, odd-grid size
    "dynamic_odd_100x132": (dict(strict_img_size=False, img_size=(96, 160)), (1, 100, 132, 3)),
    # pooled features (no classifier), max-pooled, from one input channel
    "num_classes_0_in_chans_1_pool_max": (dict(num_classes=0, in_chans=1, global_pool="max"), (1, 224, 224, 1)),
    # per-position logits [B, 7, 7, num_classes]
    "pool_none": (dict(global_pool=""), (2, 224, 224, 3)),
    "window_4x6_pool_catavgmax_num_classes_10": (
        dict(window_size=(4, 6), global_pool="catavgmax", num_classes=10),
        (1, 224, 224, 3),
    ),
    # grids 16x24 -> 8x12 -> 4x6 -> 2x3: windows (4, 6), 5, (7, 3) -> (4, 3), 2 -> (2, 2)
    "window_per_stage": (dict(window_size=((4, 6), 5, (7, 3), 2), img_size=(64, 96)), (1, 64, 96, 3)),
    # windows larger than the maps (3x5 at the last stage), still partitioned and shifted
    "always_partition_96x160": (dict(always_partition=True, img_size=(96, 160)), (1, 96, 160, 3)),
    "patch_2_odd_depths": (
        dict(patch_size=2, img_size=(40, 44), depths=(1, 2, 3, 2), window_size=5),
        (1, 40, 44, 3),
    ),
    # maps 4x5 -> 2x3 -> 1x2 -> 1x1: every window clipped, PatchMerging of a 1-wide map
    "tiny_maps_16x20": (dict(img_size=(16, 20)), (1, 16, 20, 3)),
    # dynamic size with always_partition and a non-square window
    "dynamic_always_partition_window_3x9": (
        dict(strict_img_size=False, always_partition=True, img_size=(60, 44), window_size=(3, 9)),
        (2, 36, 80, 3),
    ),
    "window_8_head_dim_mlp_ratio_no_qkv_bias": (
        dict(window_size=8, head_dim=12, mlp_ratio=2.5, qkv_bias=False, img_size=(64, 96)),
        (1, 64, 96, 3),
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_parity(variant):
    kwargs, shape = VARIANTS[variant]
    kw = {**SMALL, **kwargs}
    tm = timm_model(TINY, **kw)
    model = jax_from_timm(tm, TINY, **kw)
    assert _block_geometry(model) == _block_geometry(tm)
    x = images(shape, seed=2)
    # the model's own call has the shape of timm's forward
    with torch.no_grad():
        want = tuple(tm(to_nchw(x)).shape)
    assert jax.eval_shape(lambda x: model(x), x).shape == want
    assert_parity(model, tm, x)


def test_float64_is_timms_function():
    """Swin V1 in float64 equals timm in float64 to 1e-10 (the structural check; fp32 parity is the test above) on
    a padded, shifted, clipped, non-square configuration."""
    kw = dict(embed_dim=32, depths=(2, 2, 2), num_heads=(2, 2, 4), img_size=(56, 40), window_size=5)
    tm = timm_model(TINY, **kw)  # maps 14x10, 7x5, 4x3: padded, shifted, clipped (last stage), odd PatchMerging
    errs = assert_parity_float64(jax_from_timm(tm, TINY, **kw), tm, TINY, images((1, 56, 40, 3), seed=4), **kw)
    assert max(e["f64"] for e in errs.values()) <= F64_REL_TOL


def test_variant_geometry():
    """The variants above do hit the cases they are named for."""
    geo = _block_geometry(abstract_model(TINY, img_size=(96, 160), **SMALL))
    assert geo[2][1] == ((6, 7), (0, 3))
    geo = _block_geometry(abstract_model(TINY, img_size=(56, 224), **SMALL))
    assert geo[2][1] == ((4, 7), (0, 3)) and geo[3][1] == ((2, 7), (0, 0))
    geo = _block_geometry(abstract_model(TINY, img_size=(96, 160), always_partition=True, **SMALL))
    assert geo[3][1] == ((7, 7), (3, 3))
    geo = _block_geometry(abstract_model(TINY, window_size=((4, 6), 5, (7, 3), 2), img_size=(64, 96), **SMALL))
    assert [stage[1] for stage in geo] == [((4, 6), (2, 3)), ((5, 5), (2, 2)), ((4, 3), (0, 1)), ((2, 2), (0, 1))]
    geo = _block_geometry(abstract_model(TINY, img_size=(16, 20), **SMALL))
    assert [stage[1] for stage in geo] == [((4, 5), (0, 0)), ((2, 3), (0, 0)), ((1, 2), (0, 0)), ((1, 1), (0, 0))]


@EAGER
def test_num_classes_0_is_timm_pooled_features(small_pair):
    tm, _, x = small_pair
    headless = swin_jax.create_model(TINY, num_classes=0, **SMALL)
    # a head-less model loads a full checkpoint (head.* dropped, as timm does), strictly
    result = swin_jax.load_timm_state_dict(headless, tm.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    out = np.asarray(headless(x))
    assert out.shape == (2, 256)
    assert_close(out, _timm_pooled(tm, x), what="pooled features")


# ----------------------------------------------------------------------------------------------------------
# features_only
# ----------------------------------------------------------------------------------------------------------


def _timm_features_twin(tm: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """timm's features_only model with the weights of the full model ``tm`` (its keys are ``layers_i``)."""
    ft = timm.create_model(TINY, pretrained=False, features_only=True, **kwargs).eval()
    want = set(ft.state_dict())
    sd = {re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v for k, v in tm.state_dict().items()}
    ft.load_state_dict({k: v for k, v in sd.items() if k in want}, strict=True)
    return ft


@EAGER
@pytest.mark.parametrize("out_indices", [None, (1, 3), (0, -1), (0, 1)])
def test_features_only(small_pair, out_indices):
    tm, _, x = small_pair
    oi = {} if out_indices is None else dict(out_indices=out_indices)
    ft = _timm_features_twin(tm, **SMALL, **oi)
    model = swin_jax.create_model(TINY, features_only=True, **SMALL, **oi)
    assert model.head is None and model.norm is None
    # built from a FULL timm checkpoint, strictly: final norm, head and unused stages are dropped
    result = swin_jax.load_timm_state_dict(model, tm.state_dict(), strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    # only the stages up to the last index are built, as timm
    assert len(model.layers) == len([k for k in dict(ft.named_children()) if k.startswith("layers_")])
    ours = [np.asarray(m) for m in model(x)]
    with torch.no_grad():
        ref = [t.numpy() for t in ft(to_nchw(x))]  # timm's features_only Swin returns NHWC maps
    assert len(ours) == len(ref) == len(ft.feature_info.out_indices)
    assert [o.shape[-1] for o in ours] == ft.feature_info.channels()
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, what=f"feature map {i}")


@EAGER
def test_features_only_default_shapes(small_pair):
    _, _, x = small_pair
    model = swin_jax.create_model(TINY, features_only=True, **SMALL)
    shapes = [m.shape for m in model(x)]
    assert shapes == [(2, 56, 56, 32), (2, 28, 28, 64), (2, 14, 14, 128), (2, 7, 7, 256)]


# ----------------------------------------------------------------------------------------------------------
# forward_intermediates
# ----------------------------------------------------------------------------------------------------------


@EAGER
@pytest.mark.parametrize(
    "indices, norm, stop_early",
    [(None, True, False), (2, True, False), ([0, 2], True, False), ([-1], True, False), ([1], False, True)],
)
def test_forward_intermediates(small_pair, indices, norm, stop_early):
    tm, model, x = small_pair
    final, maps = model.forward_intermediates(x, indices=indices, norm=norm, stop_early=stop_early)
    with torch.no_grad():
        t_final, t_maps = tm.forward_intermediates(to_nchw(x), indices=indices, norm=norm, stop_early=stop_early)
    assert_close(np.asarray(final), t_final.numpy(), what="final")
    assert len(maps) == len(t_maps)
    for i, (a, b) in enumerate(zip(maps, t_maps)):
        assert_close(np.asarray(a), b.permute(0, 2, 3, 1).numpy(), what=f"intermediate {i}")


# ----------------------------------------------------------------------------------------------------------
# weights: round trip to timm
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        (TINY, SMALL),
        ("swin_s3_small_224", dict(_shallow("swin_s3_small_224"), num_classes=3, in_chans=2)),
        (TINY, dict(SMALL, global_pool="catavgmax", window_size=(4, 6), qkv_bias=False)),
    ],
)
def test_round_trip_to_timm(arch, kwargs):
    tm = timm_model(arch, **kwargs)
    model = jax_from_timm(tm, arch, **kwargs)
    sd = swin_jax.to_timm_state_dict(model)
    ref = tm.state_dict()  # persistent entries only: relative_position_index / attn_mask are not in it
    assert set(sd) == set(ref)
    for k, v in sd.items():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32, k
        np.testing.assert_array_equal(v, ref[k].numpy(), err_msg=k)
    tm2 = timm.create_model(arch, pretrained=False, **kwargs)
    tm2.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    tm2.eval()
    x = images((1, *tm.patch_embed.img_size, kwargs.get("in_chans", 3)), seed=3)
    np.testing.assert_array_equal(_timm_call(tm2, x), _timm_call(tm, x))


# ----------------------------------------------------------------------------------------------------------
# jit, train / eval, dtypes, classifier reset
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["default", "padded_clipped_window"])
def test_attention_weights_are_timms_softmax(variant):
    """``block.attention_weights`` equals what timm's ``attn.softmax`` outputs, in every block: windows
    (shifted, padded, clipped) in the same order, the shift mask applied."""
    kw = {**SMALL, **({"img_size": (96, 160)} if variant == "padded_clipped_window" else {})}
    tm = timm_model(TINY, **kw)
    model = jax_from_timm(tm, TINY, **kw)
    inputs, probs = timm_attention_probs(tm, images((2, *model.img_size, 3), seed=3))
    assert len(probs) == sum(len(stage.blocks) for stage in model.layers)
    weights = jax_attention_weights(model, inputs)
    for (i, j), ref in probs.items():
        block, ours = model.layers[i].blocks[j], weights[i, j]
        assert ours.shape[:3] == (2, *(-(-s // w) for s, w in zip(block.input_resolution, block.window_size)))
        np.testing.assert_allclose(np.asarray(ours.sum(-1)), 1.0, rtol=1e-5)
        assert_close(ours.reshape(ref.shape), ref, what=f"stage {i} block {j} attention")


@pytest.mark.parametrize(
    "dtype, shapes",
    [(jnp.float32, [(1,), (169, 3), (96, 288), (4, 4, 3, 96), (10, 0)]), (jnp.bfloat16, [(7,), (2, 2, 5, 7)])],
)
def test_initializers_draw_flax_values(dtype, shapes):
    """The model's initializers (one compiled sampler per power-of-two size) give exactly the values of flax's
    ``truncated_normal(stddev=0.02)`` and ``variance_scaling(1/3, 'fan_in', 'uniform')`` for the same key."""
    from swin_jax.models._layers import _torch_conv_default, _trunc_normal_02

    trunc = nnx.initializers.truncated_normal(stddev=0.02)
    conv = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    for i, shape in enumerate(shapes):
        key = jax.random.key(i)
        for ours, ref in ((_trunc_normal_02, trunc), (_torch_conv_default, conv)):
            if ours is _torch_conv_default and len(shape) != 4:
                continue
            a, b = ours(key, shape, dtype), ref(key, shape, dtype)
            assert a.shape == b.shape and a.dtype == b.dtype == dtype
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=str(shape))
    x = np.asarray(_trunc_normal_02(jax.random.key(0), (256, 256)))
    assert np.abs(x).max() <= 0.04 and 0.015 < x.std() < 0.02  # truncated at 2 std


@EAGER
def test_forward_features_and_call_equal_forward_intermediates(small_pair):
    """The parity helper takes features and logits from ``forward_intermediates``; the model's own
    ``forward_features`` and call compute the same."""
    _, model, x = small_pair
    run = jax.jit(lambda m, x: (m.forward_intermediates(x)[0], m.forward_features(x), m(x)))
    final, feats, logits = run(model, x)
    head = jax.jit(lambda m, f: m.forward_head(f))(model, final)
    assert_close(feats, final, tol=1e-6, what="forward_features")
    assert_close(logits, head, tol=1e-6, what="logits")


@EAGER
def test_jit_equals_eager(small_pair):
    _, model, x = small_pair
    jitted = np.asarray(jax.jit(lambda m, x: m(x))(model, x))
    eager = np.asarray(model(x))
    assert jitted.shape == eager.shape == (2, 1000)
    assert_close(jitted, eager, what="jit vs eager")


def test_train_mode_drop_path():
    x = images((2, 64, 64, 3), seed=5)  # 64 px: stage maps 16 to 2, padded and clipped windows
    kw = dict(TRAIN_SMALL, drop_path_rate=0.5)
    tm = timm_model(TINY, **kw)
    model = jax_from_timm(tm, TINY, **kw)
    step = nnx.jit(lambda m, x: m(x))  # carries the drop path RNG state across calls (eager: test_jit_equals_eager)
    eval_out = np.asarray(step(model, x))
    model.train()
    a, b = np.asarray(step(model, x)), np.asarray(step(model, x))
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    assert not np.allclose(a, b), "drop path is not random across calls in train mode"
    assert not np.allclose(a, eval_out), "drop path has no effect in train mode"
    model.eval()
    out = np.asarray(step(model, x))
    np.testing.assert_array_equal(out, eval_out)
    assert_close(out, _timm_call(tm, x), what="eval after train")


def test_train_mode_dropout():
    x = images((2, 64, 64, 3), seed=5)  # 64 px: stage maps 16 to 2, padded and clipped windows
    kw = dict(TRAIN_SMALL, drop_rate=0.5, proj_drop_rate=0.2, attn_drop_rate=0.2)
    tm = timm_model(TINY, **kw)
    model = jax_from_timm(tm, TINY, **kw)
    step = nnx.jit(lambda m, x: m(x))  # carries the dropout RNG state across calls
    eval_out = np.asarray(step(model, x))
    assert_close(eval_out, _timm_call(tm, x), what="eval with dropout rates")
    model.train()
    a, b = np.asarray(step(model, x)), np.asarray(step(model, x))
    assert not np.allclose(a, b) and not np.allclose(a, eval_out)
    model.eval()
    np.testing.assert_array_equal(np.asarray(step(model, x)), eval_out)


def test_train_mode_without_drop_rates_equals_eval(small_pair):
    tm, _, x = small_pair
    model = jax_from_timm(tm, TINY, **SMALL)  # drop rates all 0
    step = jax.jit(lambda m, x: m(x))
    eval_out = np.asarray(step(model, x))
    model.train()
    np.testing.assert_array_equal(np.asarray(step(model, x)), eval_out)
    assert_close(eval_out, _timm_call(tm, x))


@EAGER
def test_bfloat16_compute(small_pair):
    tm, model32, x = small_pair
    model = swin_jax.create_model(TINY, dtype=jnp.bfloat16, **SMALL)
    swin_jax.load_timm_state_dict(model, tm.state_dict())
    # parameters stay fp32, compute is bf16
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    out = jax.jit(lambda m, x: m(x))(model, x)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 1000)
    ref = np.asarray(model32(x))
    err = rel_err(np.asarray(out.astype(jnp.float32)), ref)
    assert 0 < err <= BF16_REL_TOL, f"bf16 vs fp32 rel err {err:.3e}"
    maps = jax.eval_shape(lambda x: model.forward_intermediates(x, intermediates_only=True), x)
    assert [m.dtype for m in maps] == [jnp.bfloat16] * 4


def test_bfloat16_layernorm_is_fp32_inside(small_pair):
    """With bf16 compute, LayerNorm applies its fp32 scale and shift before rounding to bf16 (as torch autocast
    runs LayerNorm), instead of rounding them to bf16 first (nnx.LayerNorm's rule)."""
    tm, _, _ = small_pair
    model = swin_jax.create_model(TINY, dtype=jnp.bfloat16, **SMALL)
    swin_jax.load_timm_state_dict(model, tm.state_dict())
    norm, ref = model.layers[1].blocks[0].norm1, tm.layers[1].blocks[0].norm1
    x = jnp.asarray(images((4, 7, 7, norm.num_features), seed=5), jnp.bfloat16)
    out = norm(x)
    assert out.dtype == jnp.bfloat16
    with torch.no_grad():
        want = ref(torch.from_numpy(np.asarray(x.astype(jnp.float32)))).to(torch.bfloat16).float().numpy()
    # fp32 LayerNorm rounded once: equal to timm's fp32 result rounded to bf16, up to one bf16 ulp
    np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, rtol=2**-7, atol=0)
    rounded_params = (np.asarray(norm.scale[...]).astype(jnp.bfloat16) != np.asarray(norm.scale[...])).any()
    assert rounded_params  # the scale is not bf16-representable, so rounding it first would show


def test_bfloat16_params(small_pair):
    tm, model32, x = small_pair
    model = swin_jax.create_model(TINY, param_dtype=jnp.bfloat16, **SMALL)
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    assert leaves and {leaf.dtype for leaf in leaves} == {jnp.dtype("bfloat16")}
    swin_jax.load_timm_state_dict(model, tm.state_dict())
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    assert {leaf.dtype for leaf in leaves} == {jnp.dtype("bfloat16")}
    assert jax.eval_shape(lambda x: model(x), x).shape == (2, 1000)
    np.testing.assert_array_equal(
        np.asarray(model.patch_embed.proj.kernel[...], np.float32),
        tm.patch_embed.proj.weight.detach().to(torch.bfloat16).float().numpy().transpose(2, 3, 1, 0),
    )


@EAGER
def test_reset_classifier_7(small_pair):
    _, _, x = small_pair
    tm = timm_model(TINY, **SMALL)
    model = jax_from_timm(tm, TINY, **SMALL)
    model.reset_classifier(7)
    tm.reset_classifier(7)
    assert model.num_classes == tm.num_classes == 7
    assert model(x).shape == (2, 7)
    assert model.get_classifier().out_features == 7
    torch.nn.init.normal_(tm.head.fc.weight, generator=torch.Generator().manual_seed(0))
    swin_jax.load_timm_state_dict(model, tm.state_dict())  # the new head has timm's shapes
    assert_close(np.asarray(model(x)), _timm_call(tm, x), what="logits after reset_classifier(7)")


@EAGER
def test_reset_classifier_0(small_pair):
    tm, _, x = small_pair
    model = jax_from_timm(tm, TINY, **SMALL)
    model.reset_classifier(0)
    assert model.get_classifier() is None and model.num_classes == 0
    out = np.asarray(model(x))
    assert out.shape == (2, 256)
    assert_close(out, _timm_pooled(tm, x), what="pooled features after reset_classifier(0)")
    tm0 = timm_model(TINY, **SMALL)
    tm0.reset_classifier(0)
    assert set(swin_jax.to_timm_state_dict(model)) == set(tm0.state_dict())


@EAGER
def test_reset_classifier_5_max(small_pair):
    _, _, x = small_pair
    tm = timm_model(TINY, **SMALL)
    model = jax_from_timm(tm, TINY, **SMALL)
    model.reset_classifier(5, global_pool="max")
    tm.reset_classifier(5, global_pool="max")
    assert model.global_pool == "max" and model.head_hidden_size == tm.head_hidden_size == 256
    torch.nn.init.normal_(tm.head.fc.weight, generator=torch.Generator().manual_seed(1))
    swin_jax.load_timm_state_dict(model, tm.state_dict())
    out = np.asarray(model(x))
    assert out.shape == (2, 5)
    assert_close(out, _timm_call(tm, x), what="logits after reset_classifier(5, 'max')")
    # catavgmax doubles the head input
    model.reset_classifier(4, global_pool="catavgmax")
    assert model.head_hidden_size == 512 and model(x).shape == (2, 4)
