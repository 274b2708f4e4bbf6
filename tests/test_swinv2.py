"""SwinV2 (timm's ``swin_transformer_v2.py``) against timm.

fp32 is not exact here: cosine attention scales logits by up to 100, so outputs are judged against timm in
float64 (tests/parity.py ``assert_parity_float64``): swin_jax in float64 equals it to 1e-10, and swin_jax fp32 is
as close to it as timm's own fp32 is. Weights are randomized so every parameter matters (post-norms away from
their zero init, logit scales on both sides of the ln(100) clamp).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import timm.optim
import torch
from flax import nnx
from hub_cache import export_timm, ms_state_dict
from parity import (
    assert_close,
    assert_grads_close,
    assert_parity,
    assert_parity_float64,
    grads_as_timm,
    images,
    jax_attention_weights,
    jax_from_timm,
    jax_grads,
    jax_outputs,
    small_logit_scales_,
    timm_attention_probs,
    timm_grads,
    timm_model,
    to_nchw,
)

import swin_jax
from swin_jax.models.swin_transformer_v2 import relative_coords_table
from swin_jax.registry import ARCHITECTURES
from swin_jax.train import param_groups

NAME = "swinv2_tiny_window8_256"
# two stages, window 5 on 16x12 and 8x6 maps: padded, shifted, non-square
SMALL = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), img_size=(64, 48), window_size=5)


def _block_geometry(model) -> list[list[tuple]]:
    return [
        [(tuple(map(int, b.window_size)), tuple(map(int, b.shift_size))) for b in stage.blocks]
        for stage in model.layers
    ]


def _pair(**kwargs):
    kw = {**SMALL, **kwargs}
    tm = timm_model(NAME, **kw)
    return tm, jax_from_timm(tm, NAME, **kw), kw


# ----------------------------------------------------------------------------------------------------------
# the function: float64 structure, fp32 as good as timm's, per configuration
# ----------------------------------------------------------------------------------------------------------

# (clipped windows: test_architecture_geometry_and_parity, window 16 on the last 8x8 stage)
VARIANTS = {
    "padded_shifted_non_square": (dict(), (2, 64, 48, 3)),
    # pre-trained windows (8, 6) and (3, 3) normalize the bias MLP's coordinates differently per stage; no q/v bias
    "pretrained_windows_no_qkv_bias_pool_max": (
        dict(pretrained_window_sizes=((8, 6), 3), qkv_bias=False, global_pool="max", num_classes=3),
        (1, 64, 48, 3),
    ),
    # windows larger than the maps, still partitioned and shifted (padding, mask on the padded size); built for
    # 32x32, run at 40x24: construction-time windows and shifts, the mask from the input
    "always_partition_dynamic_40x24": (
        dict(img_size=32, window_size=6, always_partition=True, strict_img_size=False),
        (1, 40, 24, 3),
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_against_float64(variant):
    kwargs, shape = VARIANTS[variant]
    tm, model, kw = _pair(**kwargs)
    assert _block_geometry(model) == _block_geometry(tm)
    errs = assert_parity_float64(model, tm, NAME, images(shape, seed=1), **kw)
    assert set(errs) == {"logits", "features", "pre_logits", "stage0", "stage1"}


def test_variants_hit_their_cases():
    geo = _block_geometry(swin_jax.create_model(NAME, **{**SMALL, "img_size": 32, "window_size": 8}))
    assert geo == [[((8, 8), (0, 0))] * 2, [((4, 4), (0, 0))] * 2]
    geo = _block_geometry(
        swin_jax.create_model(NAME, **{**SMALL, "img_size": 32, "window_size": 6, "always_partition": True})
    )
    assert geo == [[((6, 6), (0, 0)), ((6, 6), (3, 3))]] * 2
    tm = timm_model(NAME, **SMALL)
    scales = torch.cat([p.flatten() for n, p in tm.named_parameters() if n.endswith("logit_scale")])
    assert (scales < np.log(100)).any() and (scales > np.log(100)).any()  # both sides of the clamp


@pytest.mark.parametrize("window", [1, 2, 5, 8, 12, 16, 24, (3, 7)])
@pytest.mark.parametrize("pretrained", [0, 6, 12])
def test_relative_coords_table_is_timms(window, pretrained):
    """timm computes the bias MLP's input table in float32; ours (float64) rounds to it within one float32 ulp."""
    from timm.models.swin_transformer_v2 import WindowAttention

    ws = window if isinstance(window, tuple) else (window, window)
    ref = WindowAttention(8, ws, 2, pretrained_window_size=(pretrained, pretrained)).relative_coords_table[0]
    ours = relative_coords_table(ws, (pretrained, pretrained))
    assert ours.shape == tuple(ref.shape) and ours.dtype == np.float64
    np.testing.assert_array_max_ulp(ours.astype(np.float32), ref.numpy(), maxulp=1)


def test_gradients_match_timm():
    tm, model, _ = _pair()
    x, y = images((2, 64, 48, 3), seed=3), np.array([1, 7])
    assert_grads_close(grads_as_timm(model, jax_grads(model, x, y)), timm_grads(tm, x, y))


@pytest.mark.parametrize("impl", ["xla", "pallas", "pallas_fused"])
def test_attention_impls_compute_the_same_function(impl):
    """The kernel implementations run SwinV2's cosine attention with the per-head scale folded into the normalized
    q, one code path for all of them (each is checked against timm on V1 in test_attention.py; the einsum path,
    'auto' on the CPU, in every other test here), as close to the float64 reference as timm's fp32; the Pallas
    kernels with padded tokens (zero q/k rows after normalization, masked keys), the fused one on the padded maps.
    Each runs in float64 too: 'xla''s softmax then stays float64 (jax.nn's does not), and the interpreted kernels
    compute in float64."""
    tm = timm_model(NAME, **SMALL)
    model = jax_from_timm(tm, NAME, attn_impl=impl, **SMALL)
    x = images((1, 64, 48, 3), seed=4)
    assert_parity_float64(model, tm, NAME, x, attn_impl=impl, **SMALL)


def test_attention_weights_are_timms_softmax():
    tm, model, _ = _pair()
    inputs, probs = timm_attention_probs(tm, images((1, 64, 48, 3), seed=5))
    assert len(probs) == 4
    weights = jax_attention_weights(model, inputs)
    for (i, j), ref in probs.items():
        ours = weights[i, j]
        # peaked rows (logits up to 100 apart): compare the probabilities themselves, absolutely
        np.testing.assert_allclose(np.asarray(ours).reshape(ref.shape), ref, atol=2e-5, err_msg=f"{i}.{j}")


# ----------------------------------------------------------------------------------------------------------
# weights and architectures
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["swinv2_base_window12to16_192to256"])
def test_architecture_geometry_and_parity(arch):
    """Real window, image size, pre-trained windows and heads (shallow and narrow): timm's clipped windows and
    outputs. Window 16 at 256 clips the last stage (8x8) to one unshifted window; the bias MLP's coordinates are
    normalized by the pre-training windows (12, 12, 12, 6). Logit scales at most e keep fp32 exact enough to compare
    with timm's fp32 directly (the float64 tests above cover the large scales)."""
    heads = ARCHITECTURES[arch]["num_heads"]
    kw = dict(depths=(2, 2, 2, 2), num_heads=heads, embed_dim=8 * heads[0])
    tm = small_logit_scales_(timm_model(arch, **kw))
    model = jax_from_timm(tm, arch, **kw)
    assert model.img_size == tuple(tm.patch_embed.img_size)
    assert _block_geometry(model) == _block_geometry(tm)
    assert _block_geometry(model)[3][1][1] == (0, 0)
    size = model.img_size[0]
    assert_parity(model, tm, images((1, size, size, 3), seed=6))


def test_round_trip_to_timm_is_bit_exact():
    tm, model, kw = _pair()
    sd = swin_jax.to_timm_state_dict(model)
    ref = tm.state_dict()  # persistent entries only: k_bias, relative_coords_table / _index, attn_mask are not
    assert set(sd) == set(ref)
    for k, v in sd.items():
        np.testing.assert_array_equal(v, ref[k].numpy(), err_msg=k)
    tm2 = timm.create_model(NAME, pretrained=False, **kw)
    tm2.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    x = to_nchw(images((1, 64, 48, 3), seed=7))
    with torch.no_grad():
        np.testing.assert_array_equal(tm2.eval()(x).numpy(), tm(x).numpy())


def test_original_microsoft_checkpoint_loads(tmp_path):
    """Microsoft's SwinV2 release layout (downsample at the end of the previous stage, ``head.``, buffers saved,
    wrapped in ``{"model": ...}``) loads through timm's filter into exactly timm's weights."""
    tm = timm_model(NAME, **SMALL)
    pth = tmp_path / "swinv2_ms.pth"
    torch.save({"model": ms_state_dict(tm)}, pth)
    model = swin_jax.create_model(NAME, pretrained=str(pth), **SMALL)
    ours = swin_jax.to_timm_state_dict(model)
    assert set(ours) == set(tm.state_dict())
    for k, v in tm.state_dict().items():
        np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


def test_convert_both_ways_verified_against_timm_float64(tmp_path):
    """timm Hub layout -> Flax checkpoint with --verify (against timm float64: root-mean-square error within 2x timm
    fp32's own) -> timm Hub layout again: bit-exact, and timm loads it strictly. A perturbed position-bias MLP fails
    verify."""
    from safetensors.numpy import load_file

    from swin_jax.convert.commands import flax_to_timm, timm_to_flax
    from swin_jax.convert.verify import compare, verify_inputs

    tm = timm_model(NAME, **SMALL)
    flax_dir, report = timm_to_flax(str(export_timm(tm, tmp_path / "timm")), tmp_path / "flax", verify_with_timm=True)
    assert report.passed and report.reference == "timm float64", report.table()
    assert all(bound >= 1e-5 for bound in report.rms_bounds) and len(report.rms) == len(report.rows)
    back = load_file(flax_to_timm(flax_dir, tmp_path / "back") / "model.safetensors")
    ref = tm.state_dict()
    assert set(back) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    model = swin_jax.create_model(NAME, pretrained=str(flax_dir))
    kernel = model.layers[1].blocks[1].attn.cpb_mlp[2].kernel
    kernel[...] = kernel[...] * 1.001
    assert not compare(model, tm, verify_inputs(model)).passed


def test_load_ignores_timm_buffers_and_lists_missing_keys():
    tm, model, _ = _pair()
    sd = {k: v for k, v in tm.state_dict().items()}
    sd.update({k: v for k, v in tm.named_buffers()})  # relative_coords_table, relative_position_index, k_bias, ...
    swin_jax.load_timm_state_dict(model, sd)
    del sd["layers.1.blocks.0.attn.logit_scale"], sd["layers.0.blocks.1.attn.cpb_mlp.2.weight"]
    with pytest.raises(swin_jax.WeightMismatchError, match=r"2 missing key\(s\).*cpb_mlp\.2\.weight.*logit_scale"):
        swin_jax.load_timm_state_dict(model, sd)


def test_fresh_model_initializes_like_timm():
    """Post-norms start at zero (every block the identity), logit scales at ln(10), q/v biases at zero."""
    model = swin_jax.create_model(NAME, **SMALL)
    tm = timm.create_model(NAME, pretrained=False, **SMALL)
    ours = swin_jax.to_timm_state_dict(model)
    for name, ref in tm.state_dict().items():
        if name.endswith(("norm1.weight", "norm2.weight", "norm1.bias", "norm2.bias", "logit_scale", "_bias")):
            np.testing.assert_array_equal(ours[name], ref.numpy(), err_msg=name)

    @nnx.jit  # (one compiled program: op by op, the forward compiled each of its ops)
    def first_map_and_embedding(m, x):
        return m.forward_intermediates(x, intermediates_only=True)[0], m.patch_embed(x)

    first, embedded = first_map_and_embedding(model, jnp.asarray(images((1, 64, 48, 3))))
    np.testing.assert_allclose(np.asarray(first), np.asarray(embedded), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# training and API
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_decay", [None, 0.75])
def test_param_groups_match_timm(layer_decay):
    tm, model, _ = _pair()
    opt = timm.optim.create_optimizer_v2(tm, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=layer_decay)
    names = {id(p): n for n, p in tm.named_parameters()}
    ref = {names[id(p)]: (g.get("lr_scale", 1.0), g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    ours = param_groups(model, weight_decay=0.05, layer_decay=layer_decay)
    assert set(ours) == set(ref)
    for name, (scale, wd) in ref.items():
        assert ours[name].lr_scale == pytest.approx(scale, rel=1e-12), name
        assert ours[name].weight_decay == wd, name
    assert ours["layers.0.blocks.0.attn.logit_scale"].weight_decay == 0.0
    assert ours["layers.0.blocks.0.attn.cpb_mlp.0.weight"].weight_decay == 0.0


def test_features_only_and_intermediates_like_timm():
    kw = {**SMALL, "depths": (2, 2, 2), "num_heads": (2, 2, 4), "img_size": 64}
    ref = timm.create_model(NAME, pretrained=False, features_only=True, out_indices=(0, 2), **kw)
    model = swin_jax.create_model(NAME, features_only=True, out_indices=(0, 2), **kw)
    assert [model.feature_info[i]["num_chs"] for i in model.out_indices] == ref.feature_info.channels()
    assert [model.feature_info[i]["reduction"] for i in model.out_indices] == ref.feature_info.reduction()
    maps = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    with torch.no_grad():
        assert [m.shape for m in maps] == [tuple(r.shape) for r in ref(torch.zeros(1, 3, 64, 64))]
    full = swin_jax.create_model(NAME, **kw)
    assert full.feature_info == timm.create_model(NAME, pretrained=False, **kw).feature_info


def test_attn_impl_switch_and_bfloat16_compute():
    tm, model, _ = _pair()
    x = images(VARIANTS["padded_shifted_non_square"][1], seed=1)
    ref = jax_outputs(model, x)["logits"]  # (that variant's fp32 program in test_parity_against_float64: compiled once)
    model.set_attn_impl("xla")
    assert all(b.attn.attn_impl == "xla" for s in model.layers for b in s.blocks)
    bf16 = jax_from_timm(tm, NAME, dtype=jnp.bfloat16, **SMALL)
    out = jax.jit(lambda m, x: m(x))(bf16, x)
    assert out.dtype == jnp.bfloat16
    assert_close(out, ref, tol=5e-2, what="bf16 logits")


def test_create_model_errors_name_the_family():
    with pytest.raises(TypeError, match=r"SwinTransformerV2 overrides are: .*pretrained_window_sizes"):
        swin_jax.create_model(NAME, head_dim=16)
    with pytest.raises(ValueError, match=r"needs an entry for each of the 4 stages"):
        swin_jax.create_model(NAME, pretrained_window_sizes=(12, 12))
