"""SwinV2-CR (timm's ``swin_transformer_v2_cr.py``) against timm.

As for SwinV2 (test_swinv2.py), cosine attention scales logits by up to 100, so outputs are judged against timm in
float64 (tests/parity.py ``assert_parity_float64``): swin_jax in float64 equals it to 1e-10, and swin_jax fp32 is as
close to it as timm's own fp32 is. Weights are randomized so every parameter matters (post-norms away from their zero
init, logit scales on both sides of the ln(100) clamp, the position-bias MLP like any other weights).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import timm
import timm.optim
import torch
from flax import nnx
from hub_cache import export_timm
from parity import (
    abstract_model,
    assert_grads_float64,
    assert_parity,
    assert_parity_float64,
    images,
    jax_attention_weights,
    jax_from_timm,
    rel_err,
    small_logit_scales_,
    timm_attention_probs,
    timm_model,
    to_nchw,
)

import swin_jax
from swin_jax.hub import CheckpointError
from swin_jax.models._layers import SwinStage
from swin_jax.models.swin_transformer_v2_cr import relative_coordinates_log
from swin_jax.registry import ARCHITECTURES
from swin_jax.train import param_groups

NAME = "swinv2_cr_tiny_ns_224"
# two stages, window 5 on 16x12 and 8x6 maps: padded, shifted, non-square; norm3 after every second block
SMALL = dict(embed_dim=32, depths=(2, 3), num_heads=(2, 4), img_size=(64, 48), window_size=5, extra_norm_period=2)


def _geometry(model) -> list[list[tuple]]:
    """Per block: window, shift and whether it ends with norm3 (swin_jax's or timm's model)."""
    stages = model.stage_modules if hasattr(model, "stage_modules") else model.stages

    def norm3(block) -> bool:
        return block.norm3 is not None and not isinstance(block.norm3, torch.nn.Identity)

    return [
        [(tuple(map(int, b.window_size)), tuple(map(int, b.shift_size)), norm3(b)) for b in stage.blocks]
        for stage in stages
    ]


def _pair(name: str = NAME, **kwargs):
    kw = {**SMALL, **kwargs}
    tm = timm_model(name, **kw)
    return tm, jax_from_timm(tm, name, **kw), kw


# ----------------------------------------------------------------------------------------------------------
# the function: float64 structure, fp32 as good as timm's, per configuration
# ----------------------------------------------------------------------------------------------------------

VARIANTS = {
    # norm3 every second block and at the end; max pooling into 3 classes
    "padded_shifted_non_square_norm3": (NAME, dict(global_pool="max", num_classes=3), (2, 64, 48, 3)),
    # windows from window_ratio 4 (16x16 grid -> 4x4), built for 64x64 and run at 70x50: the stem floors it to a
    # 17x12 grid (padded windows, the mask from the input), always partitioned and shifted, no stage norms but the last
    "window_ratio_dynamic_floored": (
        "swinv2_cr_tiny_224",
        dict(img_size=64, window_size=None, window_ratio=4, extra_norm_period=0, strict_img_size=False),
        (1, 70, 50, 3),
    ),
}
# the real _ns architecture's geometry at 224 (windows 7 from the ratio 8, the last 7x7 stage one unshifted window,
# norm3 closing every stage), shallow and narrow: test_architecture_geometry_and_parity
ARCH_NS = ("swinv2_cr_small_ns_224", dict(img_size=224, window_size=None, depths=(1, 2, 2, 2), num_heads=(1, 2, 2, 4)))


@pytest.mark.parametrize(
    "variant, impl",
    [(v, "auto") for v in VARIANTS] + [("window_ratio_dynamic_floored", "pallas_fused")],
    ids=[*VARIANTS, "window_ratio_dynamic_floored-pallas_fused"],
)
def test_parity_against_float64(variant, impl):
    """Each variant; the fused kernel (interpreted, float64 too) on the one whose every block is padded and whose
    shifted blocks wrap the map around (the map's side is not a multiple of the window)."""
    name, kwargs, shape = VARIANTS[variant]
    tm, model, kw = _pair(name, **kwargs)
    model.set_attn_impl(impl)
    assert _geometry(model) == _geometry(tm)
    errs = assert_parity_float64(model, tm, name, images(shape, seed=1), attn_impl=impl, **kw)
    assert set(errs) == {"logits", "features", "pre_logits"} | {f"stage{i}" for i in range(len(kw["depths"]))}


def test_variants_hit_their_cases():
    geo = _geometry(abstract_model(NAME, **SMALL))
    assert geo == [
        [((5, 5), (0, 0), False), ((5, 5), (2, 2), True)],
        [((5, 5), (0, 0), False), ((5, 5), (2, 2), True), ((5, 5), (0, 0), True)],
    ]
    name, kwargs, _ = VARIANTS["window_ratio_dynamic_floored"]
    model = abstract_model(name, **{**SMALL, **kwargs})
    assert _geometry(model)[0] == [((4, 4), (0, 0), False), ((4, 4), (2, 2), False)]
    name, kwargs = ARCH_NS
    geo = _geometry(abstract_model(name, **{**SMALL, **kwargs, "embed_dim": 16}))
    assert [stage[-1] for stage in geo] == [((7, 7), (0, 0), True)] + [((7, 7), (3, 3), True)] * 2 + [
        ((7, 7), (0, 0), True)
    ]
    tm = timm_model(NAME, **SMALL)
    scales = torch.cat([p.flatten() for n, p in tm.named_parameters() if n.endswith("logit_scale")])
    assert (scales < np.log(100)).any() and (scales > np.log(100)).any()  # both sides of the clamp


def test_architecture_geometry_and_parity():
    """The real ``_ns`` geometry at 224 against timm (fp32 directly: logit scales at most e make fp32 exact enough;
    the float64 tests above cover the large scales)."""
    name, kwargs = ARCH_NS
    kw = {**SMALL, **kwargs, "embed_dim": 16}
    tm = small_logit_scales_(timm_model(name, **kw))
    model = jax_from_timm(tm, name, **kw)
    assert _geometry(model) == _geometry(tm) and model.window_sizes == ((7, 7),) * 4
    assert_parity(model, tm, images((1, 224, 224, 3), seed=6))


@pytest.mark.parametrize("window", [(1, 1), (5, 5), (7, 7), (12, 12), (3, 8)])
def test_relative_coordinates_log_is_timms(window):
    """timm computes the meta network's input in float32; ours (float64) rounds to it within one float32 ulp."""
    from timm.models.swin_transformer_v2_cr import WindowMultiHeadAttention

    ref = WindowMultiHeadAttention(8, 2, window).relative_coordinates_log
    ours = relative_coordinates_log(window)
    assert ours.shape == tuple(ref.shape) and ours.dtype == np.float64
    np.testing.assert_array_max_ulp(ours.astype(np.float32), ref.numpy(), maxulp=1)


def test_gradients_against_float64():
    """Judged against timm's float64 gradients: the meta network's weight gradients sum softmax gradients of logits
    scaled by up to 100, which cancel, and timm's own fp32 gradients sit up to ~6e-4 from float64 there. The meta
    network's output bias shifts every logit of a head alike, which the softmax cancels: its gradient is zero up to
    rounding."""
    tm, model, _ = _pair()
    x, y = images((2, 64, 48, 3), seed=3), np.array([1, 7])
    errs = assert_grads_float64(model, tm, x, y, exact_zero=("meta_mlp.fc2.bias",))
    assert max(e for e, _ in errs.values()) > 1e-4  # fp32 is not exact here (else test_swinv2's 1e-4 would do)


def test_train_mode_drops_out_the_position_bias_mlp_as_timm():
    """timm's meta network always has dropout 0.125 after its ReLU, per window pair: in train mode the bias varies,
    in eval mode it does not; with both off, the block computes the same in either mode."""
    model = swin_jax.create_model(NAME, **SMALL)
    attn = model.stages[0].blocks[0].attn
    assert attn.meta_mlp.drop1.rate == 0.125 and attn.meta_mlp.drop2.rate == 0.0
    np.testing.assert_array_equal(attn.relative_position_bias(), attn.relative_position_bias())
    model.train()
    a, b = attn.relative_position_bias(), attn.relative_position_bias()
    assert a.shape == (2, 25, 25) and not np.array_equal(a, b)
    model.eval()
    np.testing.assert_array_equal(attn.relative_position_bias(), attn.relative_position_bias())


# ----------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------


def test_round_trip_and_old_tau_checkpoint(tmp_path):
    """to_timm_state_dict is bit-exact and timm loads it strictly; an old checkpoint (``tau`` instead of
    ``logit_scale``, ``head.`` instead of ``head.fc.``, wrapped in ``{"model": ...}``) loads through timm's filter
    into timm's weights."""
    tm, model, kw = _pair()
    sd, ref = swin_jax.to_timm_state_dict(model), tm.state_dict()
    assert set(sd) == set(ref)  # persistent entries only: relative_coordinates_log and attn_mask are not
    for k, v in sd.items():
        np.testing.assert_array_equal(v, ref[k].numpy(), err_msg=k)
    tm2 = timm.create_model(NAME, pretrained=False, **kw)
    tm2.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
    x = to_nchw(images((1, 64, 48, 3), seed=7))
    with torch.no_grad():
        np.testing.assert_array_equal(tm2.eval()(x).numpy(), tm(x).numpy())

    old = {}
    for k, v in ref.items():
        if k.endswith("logit_scale"):
            k, v = k.replace("logit_scale", "tau"), torch.exp(-v)
        old[k.replace("head.fc.", "head.")] = v
    torch.save({"model": old}, tmp_path / "old.pth")
    loaded = swin_jax.to_timm_state_dict(swin_jax.create_model(NAME, pretrained=str(tmp_path / "old.pth"), **kw))
    timm_filtered = timm.models.swin_transformer_v2_cr.checkpoint_filter_fn({"model": old}, tm)
    assert set(loaded) == set(timm_filtered) == set(ref)
    for k, v in timm_filtered.items():  # ln(1 / tau) in float32: numpy's and torch's log may differ by an ulp
        np.testing.assert_array_max_ulp(loaded[k], v.numpy(), maxulp=1 if k.endswith("logit_scale") else 0)


def test_convert_both_ways_verified_against_timm_float64(tmp_path):
    """timm Hub layout -> Flax checkpoint with --verify (against timm float64) -> timm Hub layout: bit-exact. A
    perturbed position-bias MLP fails verify."""
    from safetensors.numpy import load_file

    from swin_jax.convert.commands import flax_to_timm, timm_to_flax
    from swin_jax.convert.verify import compare, verify_inputs

    tm = timm_model(NAME, **SMALL)
    flax_dir, report = timm_to_flax(str(export_timm(tm, tmp_path / "timm")), tmp_path / "flax", verify_with_timm=True)
    assert report.passed and report.reference == "timm float64", report.table()
    back = load_file(flax_to_timm(flax_dir, tmp_path / "back") / "model.safetensors")
    ref = tm.state_dict()
    assert set(back) == set(ref)
    for k, v in ref.items():
        np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)
    model = swin_jax.create_model(NAME, pretrained=str(flax_dir))
    kernel = model.stages[1].blocks[2].attn.meta_mlp.fc2.kernel
    kernel[...] = kernel[...] * 1.001
    assert not compare(model, tm, verify_inputs(model)).passed


def test_fresh_model_initializes_like_timm():
    """Post-norms start at zero (every block the identity up to its norm3), logit scales at ln(10), and every Linear
    keeps torch's default init, U(+-1/sqrt(fan_in)) for weight and bias (timm's weight_init='reset')."""
    model = swin_jax.create_model(NAME, **SMALL)
    tm = timm.create_model(NAME, pretrained=False, **SMALL)
    ours = swin_jax.to_timm_state_dict(model)
    for name, ref in tm.state_dict().items():
        if "norm" in name or name.endswith("logit_scale"):
            np.testing.assert_array_equal(ours[name], ref.numpy(), err_msg=name)
    for name in ("stages.1.blocks.0.attn.qkv", "stages.0.blocks.1.mlp.fc2", "head.fc", "stages.1.downsample.reduction"):
        weight = ours[f"{name}.weight"]
        bound = 1 / np.sqrt(weight.shape[1])
        assert np.abs(weight).max() <= bound and np.std(weight) == pytest.approx(bound / np.sqrt(3), rel=0.1), name
        if f"{name}.bias" in ours:
            assert 0 < np.abs(ours[f"{name}.bias"]).max() <= bound, name


# ----------------------------------------------------------------------------------------------------------
# training and API
# ----------------------------------------------------------------------------------------------------------


def test_param_groups_match_timm():
    tm, model, _ = _pair()
    opt = timm.optim.create_optimizer_v2(tm, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    names = {id(p): n for n, p in tm.named_parameters()}
    ref = {names[id(p)]: (g.get("lr_scale", 1.0), g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    ours = param_groups(model, weight_decay=0.05, layer_decay=0.75)
    assert set(ours) == set(ref)
    for name, (scale, wd) in ref.items():
        assert ours[name].lr_scale == pytest.approx(scale, rel=1e-12), name
        assert ours[name].weight_decay == wd, name
    assert ours["stages.0.blocks.0.attn.logit_scale"].weight_decay == 0.0  # 1-D
    assert ours["stages.0.blocks.0.attn.meta_mlp.fc1.weight"].weight_decay == 0.05  # timm decays it


def test_features_only_and_intermediates_like_timm():
    kw = {**SMALL, "depths": (2, 2, 2), "num_heads": (2, 2, 4), "img_size": 64}
    ref = timm.create_model(NAME, pretrained=False, features_only=True, out_indices=(0, 2), **kw)
    model = swin_jax.create_model(NAME, features_only=True, out_indices=(0, 2), output_fmt="NCHW", **kw)
    assert [model.feature_info[i]["num_chs"] for i in model.out_indices] == ref.feature_info.channels()
    assert [model.feature_info[i]["module"] for i in model.out_indices] == ref.feature_info.module_name()
    maps = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    with torch.no_grad():
        assert [m.shape for m in maps] == [tuple(r.shape) for r in ref(torch.zeros(1, 3, 64, 64))]
    full = swin_jax.create_model(NAME, **kw)
    assert full.feature_info == timm.create_model(NAME, pretrained=False, **kw).feature_info
    assert full.norm is None and full.num_features == full.head_hidden_size == 128


def test_registry_models_and_untrained_tags():
    assert len(swin_jax.list_models("swinv2_cr_*")) == 16
    assert ARCHITECTURES["swinv2_cr_giant_384"]["extra_norm_period"] == 6
    model = abstract_model("swinv2_cr_base_384", depths=(1, 1, 1, 1))  # (its configuration: no init needed)
    assert model.img_size == (384, 384) and model.window_sizes == ((12, 12),) * 4
    assert model.pretrained_cfg["tag"] == "untrained" and model.pretrained_cfg["hf_hub_id"] is None
    with pytest.raises(CheckpointError, match=r"swinv2_cr_base_384 has no pretrained weights \(tag 'untrained'\)"):
        swin_jax.create_model("swinv2_cr_base_384", pretrained=True)
    with pytest.raises(TypeError, match=r"SwinTransformerV2Cr overrides are: .*extra_norm_period"):
        swin_jax.create_model(NAME, pretrained_window_sizes=(8, 8, 8, 8))


def test_attention_weights_are_timms_softmax():
    """Each block's ``attention_weights`` equal timm's softmax output (the input of its ``attn_drop``)."""
    tm, model, _ = _pair()
    inputs, probs = timm_attention_probs(tm, images((1, 64, 48, 3), seed=5))  # timm's blocks take NHWC
    assert len(probs) == 5
    weights = jax_attention_weights(model, inputs)
    for (i, j), ref in probs.items():
        ours = weights[i, j]
        # peaked rows (logits up to 100 apart): compare the probabilities themselves, absolutely
        np.testing.assert_allclose(np.asarray(ours).reshape(ref.shape), ref, atol=2e-5, err_msg=f"{i}.{j}")


def test_bfloat16_compute_and_gradient_checkpointing():
    """bf16 compute is as far from fp32 as timm's bf16 autocast is (x100 cosine logits magnify bf16's rounding of the
    normalized q and k: 0.119 and 0.119 relative on these weights). Gradient checkpointing puts every V2-CR block
    under remat: the stages are the shared SwinStage, whose remat leaves loss and gradients unchanged
    (tests/test_distributed.py checks that numerically on V1)."""
    tm, model, _ = _pair()
    x, y = jnp.asarray(images((2, 64, 48, 3), seed=8)), jnp.array([0, 5])
    ref = jax.jit(lambda m, x: m(x))(model, x)
    bf16 = jax_from_timm(tm, NAME, dtype=jnp.bfloat16, **SMALL)
    out = jax.jit(lambda m, x: m(x))(bf16, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        timm_bf16 = tm(to_nchw(np.asarray(x))).float().numpy()
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, ref) <= 2 * rel_err(timm_bf16, ref), (rel_err(out, ref), rel_err(timm_bf16, ref))

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    def jaxpr() -> str:
        graphdef = nnx.graphdef(model)
        return str(jax.make_jaxpr(lambda s: nnx.value_and_grad(loss_fn)(nnx.merge(graphdef, s)))(nnx.state(model)))

    assert all(isinstance(stage, SwinStage) for stage in model.stages)
    plain = jaxpr().count("remat")  # the MLPs' GELU is always recomputed; checkpointing adds one remat per block
    model.set_grad_checkpointing(True)
    assert jaxpr().count("remat") > plain
