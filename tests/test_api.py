"""The public API against timm's: registry, data configs, create_model arguments, weight loading, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax import nnx
from parity import abstract_model, assert_close, images, jax_from_timm, timm_model
from timm.models import get_pretrained_cfg

import swin_jax
from swin_jax.factory import build_abstract_model
from swin_jax.registry import ARCHITECTURES, get_arch_config
from swin_jax.registry import get_pretrained_cfg as jax_pretrained_cfg
from swin_jax.weights import timm_param_shapes

TINY = "swin_tiny_patch4_window7_224"
BASE = "swin_base_patch4_window7_224"
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4))
# 64x64 input: maps 16, 8, 4, 2 (the last ones clipped windows), cheap to run
SMALL64 = dict(SMALL, img_size=64)


def _ours(names: list[str]) -> list[str]:
    """timm's Swin V1, V2 and V2-CR names."""
    return [n for n in names if n.startswith(("swin_", "swinv2_"))]


TIMM_ARCHS = _ours(timm.list_models("swin*"))
TIMM_PRETRAINED = _ours(timm.list_pretrained("swin*"))


@pytest.fixture(scope="module")
def small_timm():
    return timm_model(TINY, **SMALL64)


@pytest.fixture(scope="module")
def small_model(small_timm):
    return jax_from_timm(small_timm, TINY, **SMALL64)


_call = jax.jit(lambda m, x: m(x))


def _params(model) -> dict:
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


# ----------------------------------------------------------------------------------------------------------
# list_models
# ----------------------------------------------------------------------------------------------------------


def test_list_models_names_match_timm():
    assert len(TIMM_ARCHS) == 9 + 12 + 16
    assert sorted(swin_jax.list_models()) == sorted(TIMM_ARCHS)


def test_list_models_order_matches_timm():
    """timm sorts names naturally (window7 before window12): the same list, in the same order."""
    assert swin_jax.list_models() == TIMM_ARCHS


def test_list_pretrained_names_match_timm():
    assert len(TIMM_PRETRAINED) == 19 + 12 + 3
    assert sorted(swin_jax.list_models(pretrained=True)) == sorted(TIMM_PRETRAINED)


def test_list_pretrained_order_matches_timm():
    assert swin_jax.list_models(pretrained=True) == TIMM_PRETRAINED


@pytest.mark.parametrize(
    "pattern, pretrained",
    [
        ("*base*", False),
        ("swin_s3*", False),
        (["*tiny*", "*small*"], False),
        ("*window12*", False),
        ("swin_base*", True),
        ("*in22k", True),
        ("*.ms_in1k", True),
        ("swin_s3*", True),
        ("swin_large_patch4_window12_384", True),
        ("swinv2*", False),
        ("swinv2_cr*", True),
        ("*_ns_*", False),
        ("*192*", True),
        ("nothing*", False),
    ],
)
def test_list_models_patterns(pattern, pretrained):
    want = _ours(timm.list_models(pattern, pretrained=pretrained))
    got = swin_jax.list_models(pattern, pretrained=pretrained)
    assert sorted(got) == sorted(want)


def test_list_pretrained_filters_architectures():
    pretrained = swin_jax.list_models(pretrained=True)
    assert all("." in n and n.split(".")[0] in ARCHITECTURES for n in pretrained)
    # every V1 and V2 architecture has weights; of V2-CR's 16, three do (the others have an untrained tag only)
    with_weights = {n.split(".")[0] for n in pretrained}
    assert with_weights == {a for a in swin_jax.list_models() if not a.startswith("swinv2_cr_")} | {
        "swinv2_cr_tiny_ns_224",
        "swinv2_cr_small_224",
        "swinv2_cr_small_ns_224",
    }
    assert len(swin_jax.list_models("*in22k", pretrained=True)) == 6 + 2


# ----------------------------------------------------------------------------------------------------------
# pretrained configs and default tags
# ----------------------------------------------------------------------------------------------------------


def _plain(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


CFG_KEYS = (
    "architecture",
    "tag",
    "hf_hub_id",
    "url",
    "input_size",
    "crop_pct",
    "crop_mode",
    "interpolation",
    "mean",
    "std",
    "num_classes",
    "pool_size",
    "fixed_input_size",
    "first_conv",
    "classifier",
    "license",
)


@pytest.mark.parametrize("name", TIMM_PRETRAINED)
def test_pretrained_cfg_matches_timm(name):
    ref = get_pretrained_cfg(name).to_dict()
    ours = jax_pretrained_cfg(name)
    for key in CFG_KEYS:
        assert _plain(ours[key]) == _plain(ref[key]), key


@pytest.mark.parametrize(
    "name",
    ["swin_base_patch4_window7_224.ms_in22k", "swinv2_base_window12_192.ms_in22k", "swinv2_cr_small_ns_224.sw_in1k"],
)
def test_model_carries_its_pretrained_cfg(name):
    """The model created under a tag carries the tag's config and classes (one tag per family, built abstractly)."""
    model = abstract_model(name, **SMALL)
    assert {k: model.pretrained_cfg[k] for k in CFG_KEYS} == {k: jax_pretrained_cfg(name)[k] for k in CFG_KEYS}
    assert model.num_classes == get_pretrained_cfg(name).to_dict()["num_classes"]


@pytest.mark.parametrize("arch", TIMM_ARCHS)
def test_default_tag_matches_timm(arch):
    ref = get_pretrained_cfg(arch).to_dict()  # timm's default tag of the architecture
    ours = jax_pretrained_cfg(arch)
    assert ours["tag"] == ref["tag"]
    assert ours["hf_hub_id"] == ref.get("hf_hub_id")  # None: timm's untrained tags (V2-CR)
    assert ours["num_classes"] == ref["num_classes"]


def test_default_tags():
    assert swin_jax.create_model(TINY, **SMALL).pretrained_cfg["tag"] == "ms_in1k"
    assert swin_jax.create_model(BASE, **SMALL).pretrained_cfg["tag"] == "ms_in22k_ft_in1k"


@pytest.mark.parametrize(
    "name, tag",
    [
        ("swin_base_patch4_window7_224_in22k", "ms_in22k"),
        ("swinv2_base_window12_192_22k", "ms_in22k"),
        ("swinv2_large_window12to24_192to384_22kft1k", "ms_in22k_ft_in1k"),
    ],
)
def test_deprecated_name_like_timm(name, tag):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = timm.create_model(name, pretrained=False, device="meta", **SMALL)
    model = abstract_model(name, **SMALL)
    assert model.num_classes == ref.num_classes
    assert model.pretrained_cfg["tag"] == ref.pretrained_cfg["tag"] == tag
    assert model.pretrained_cfg["architecture"] == ref.pretrained_cfg["architecture"]


# ----------------------------------------------------------------------------------------------------------
# create_model arguments
# ----------------------------------------------------------------------------------------------------------


def test_num_classes_from_tag():
    assert swin_jax.create_model(f"{BASE}.ms_in22k", **SMALL).num_classes == 21841
    assert swin_jax.create_model(f"{BASE}.ms_in1k", **SMALL).num_classes == 1000
    assert swin_jax.create_model(f"{BASE}.ms_in22k", num_classes=5, **SMALL).num_classes == 5
    model = swin_jax.create_model(f"{BASE}.ms_in22k", num_classes=0, **SMALL)
    assert model.num_classes == 0 and model.get_classifier() is None
    ref = timm.create_model(f"{BASE}.ms_in22k", pretrained=False, **SMALL)
    assert ref.num_classes == 21841 and ref.head.fc.out_features == 21841
    assert model.pretrained_cfg["num_classes"] == 21841  # the tag's, as timm keeps it


@pytest.mark.parametrize("img_size, want", [(96, (96, 96)), ((96, 160), (96, 160)), ([64, 128], (64, 128))])
def test_img_size_int_and_tuple(img_size, want):
    model = swin_jax.create_model(TINY, img_size=img_size, **SMALL)
    ref = timm.create_model(TINY, pretrained=False, img_size=img_size, **SMALL)
    assert model.img_size == want == tuple(ref.patch_embed.img_size)
    assert tuple(model.grid_size) == tuple(ref.patch_embed.grid_size)
    out = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, *want, 3), jnp.float32))
    assert out.shape == (1, 1000)
    maps = jax.eval_shape(
        lambda x: model.forward_intermediates(x, intermediates_only=True),
        jax.ShapeDtypeStruct((1, *want, 3), jnp.float32),
    )
    with torch.no_grad():
        ref_maps = ref.forward_intermediates(torch.zeros(1, 3, *want), intermediates_only=True)
    assert [m.shape for m in maps] == [tuple(r.permute(0, 2, 3, 1).shape) for r in ref_maps]


def _parameter_shaping(arch: str) -> tuple:
    """What shapes an architecture's parameters at one block per stage: its config without depths and image size,
    and for SwinV2 / V2-CR (whose position bias is an MLP) without the windows either."""
    cfg = {k: v for k, v in get_arch_config(arch).items() if k not in ("depths", "img_size")}
    if arch.startswith("swinv2"):
        cfg = {k: v for k, v in cfg.items() if k not in ("window_size", "pretrained_window_sizes")}
    return (arch.split("_")[0] + ("_cr" if "_cr_" in arch else ""), tuple(sorted(cfg.items())))


# one architecture per distinct parameter shaping (18 of the 37)
PARAM_ARCHS = sorted({_parameter_shaping(a): a for a in TIMM_ARCHS}.values(), key=TIMM_ARCHS.index)


@pytest.mark.parametrize("arch", PARAM_ARCHS)
def test_every_architecture_has_timms_parameters(arch):
    """Every parameter name and shape of timm's model (built on the meta device), at the real widths, heads, windows
    and image size, one block per stage (the stages repeat the same block). The architectures left out share their
    parameter shaping with one tested here (the image size and, for the MLP position biases, the window do not shape
    parameters; timm's models on the meta device confirm it below)."""
    kw = dict(depths=(1, 1, 1, 1))
    ref = {k: tuple(v.shape) for k, v in timm.create_model(arch, device="meta", **kw).state_dict().items()}
    num_classes = jax_pretrained_cfg(arch)["num_classes"]
    model = build_abstract_model(arch, {**get_arch_config(arch), **kw, "num_classes": num_classes})
    assert timm_param_shapes(model) == ref
    for other in TIMM_ARCHS:
        if other != arch and _parameter_shaping(other) == _parameter_shaping(arch):
            twin = timm.create_model(other, device="meta", num_classes=num_classes, **kw).state_dict()
            assert {k: tuple(v.shape) for k, v in twin.items()} == ref, other


@pytest.mark.parametrize("arch", ["swin_tiny_patch4_window7_224", "swin_base_patch4_window12_384", "swin_s3_tiny_224"])
def test_feature_info_matches_timm(arch):
    ref = timm.create_model(arch, pretrained=False, **SMALL)
    model = swin_jax.create_model(arch, **SMALL)
    assert model.feature_info == ref.feature_info
    assert model.num_features == ref.num_features and model.head_hidden_size == ref.head_hidden_size


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, -1), (0, 2)])
def test_features_only_feature_info_matches_timm(out_indices):
    ref = timm.create_model(TINY, pretrained=False, features_only=True, out_indices=out_indices, **SMALL)
    model = swin_jax.create_model(TINY, features_only=True, out_indices=out_indices, **SMALL)
    info = [model.feature_info[i] for i in model.out_indices]
    assert [i["num_chs"] for i in info] == ref.feature_info.channels()
    assert [i["reduction"] for i in info] == ref.feature_info.reduction()
    assert [i["module"] for i in info] == ref.feature_info.module_name()
    maps = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
    with torch.no_grad():
        ref_maps = ref(torch.zeros(2, 3, 224, 224))
    assert [m.shape for m in maps] == [tuple(r.shape) for r in ref_maps]  # both NHWC


@pytest.mark.parametrize("out_indices", [2, 1])
def test_features_only_int_out_indices_like_timm(out_indices):
    """timm takes an int ``out_indices`` as "the last n stages"."""
    ref = timm.create_model(TINY, pretrained=False, features_only=True, out_indices=out_indices, **SMALL)
    model = swin_jax.create_model(TINY, features_only=True, out_indices=out_indices, **SMALL)
    assert [model.feature_info[i]["num_chs"] for i in model.out_indices] == ref.feature_info.channels()
    maps = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    with torch.no_grad():
        assert [m.shape for m in maps] == [tuple(r.shape) for r in ref(torch.zeros(1, 3, 224, 224))]


def test_output_fmt_nchw_like_timm(small_timm, small_model):
    """Maps stay NHWC by default; ``output_fmt='NCHW'`` gives timm's layout, in forward_intermediates and from a
    features_only model."""
    x = images((1, 64, 64, 3), seed=6)
    run = jax.jit(
        lambda m, x: (
            m.forward_intermediates(x, intermediates_only=True),
            m.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True),
        )
    )
    nhwc, nchw = run(small_model, x)
    with torch.no_grad():
        ref = small_timm.forward_intermediates(torch.from_numpy(x.transpose(0, 3, 1, 2)), intermediates_only=True)
    assert [m.shape for m in nchw] == [tuple(r.shape) for r in ref]
    for a, b in zip(nhwc, nchw):
        np.testing.assert_array_equal(np.asarray(a).transpose(0, 3, 1, 2), np.asarray(b))
    fmodel = swin_jax.create_model(TINY, features_only=True, out_indices=(1, 3), output_fmt="NCHW", **SMALL64)
    maps = jax.eval_shape(lambda x: fmodel(x), jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
    assert [m.shape for m in maps] == [tuple(ref[1].shape), tuple(ref[3].shape)]
    with pytest.raises(ValueError, match=r"output_fmt must be one of \('NHWC', 'NCHW'\), got 'NWHC'"):
        swin_jax.create_model(TINY, features_only=True, output_fmt="NWHC", **SMALL64)


@pytest.mark.parametrize("depths", [(2, 2), (2, 2, 2), (2, 2, 2, 2, 2)])
def test_features_only_default_out_indices_follow_depths(depths):
    """timm's default ``out_indices`` is every stage: ``tuple(range(len(depths)))``."""
    kw = dict(embed_dim=16, depths=depths, num_heads=(2,) * len(depths), img_size=256)
    ref = timm.create_model(TINY, pretrained=False, features_only=True, **kw)
    model = swin_jax.create_model(TINY, features_only=True, **kw)
    assert list(model.out_indices) == list(range(len(depths))) == list(ref.feature_info.out_indices)
    maps = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
    with torch.no_grad():
        assert [m.shape for m in maps] == [tuple(r.shape) for r in ref(torch.zeros(1, 3, 256, 256))]


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------


def test_unknown_model_name_suggests_close_match():
    with pytest.raises(ValueError, match=r"swin_bse_patch4_window7_224.*swin_base_patch4_window7_224"):
        swin_jax.create_model("swin_bse_patch4_window7_224")


def test_unknown_model_name_no_match():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet50'.*list_models"):
        swin_jax.create_model("resnet50")


def test_unknown_tag():
    with pytest.raises(ValueError, match=r"(?i)unknown pretrained tag.*ms_in2k.*window7_224\.ms_in22k"):
        swin_jax.create_model(f"{BASE}.ms_in2k", **SMALL)


def test_unknown_kwarg():
    with pytest.raises(TypeError, match=r"unexpected keyword argument.*'embed_dims'"):
        swin_jax.create_model(TINY, embed_dims=64)


@pytest.fixture(scope="module")
def err_model():
    return swin_jax.create_model(TINY, **SMALL)


def test_error_wrong_rank(err_model):
    with pytest.raises(ValueError, match=r"4-D.*\(224, 224, 3\).*batch axis"):
        err_model(np.zeros((224, 224, 3), np.float32))


def test_error_wrong_channels(err_model):
    with pytest.raises(ValueError, match=r"3 input channels.*\(1, 224, 224, 4\)") as info:
        err_model(np.zeros((1, 224, 224, 4), np.float32))
    assert "NCHW" not in str(info.value)


def test_error_nchw_hint(err_model):
    with pytest.raises(ValueError, match=r"\(1, 3, 224, 224\).*NCHW.*transpose"):
        err_model(np.zeros((1, 3, 224, 224), np.float32))


def test_error_wrong_size_strict(err_model):
    with pytest.raises(ValueError, match=r"224x224.*192x160.*strict_img_size"):
        err_model(np.zeros((1, 192, 160, 3), np.float32))
    with pytest.raises(ValueError, match=r"224x224.*192x160"):
        err_model.forward_features(np.zeros((1, 192, 160, 3), np.float32))
    with pytest.raises(ValueError, match=r"224x224.*192x160"):
        err_model.forward_intermediates(np.zeros((1, 192, 160, 3), np.float32))


def test_error_non_divisible_size_dynamic():
    model = swin_jax.create_model(TINY, strict_img_size=False, **SMALL)
    with pytest.raises(ValueError, match=r"130x128.*divisible by the patch size 4x4"):
        model(np.zeros((1, 130, 128, 3), np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.bool_])
def test_error_integer_input(err_model, dtype):
    with pytest.raises(TypeError, match=r"floating point.*" + np.dtype(dtype).name):
        err_model(np.zeros((1, 224, 224, 3), dtype))


def test_error_list_input(err_model):
    with pytest.raises(TypeError, match=r"got list"):
        err_model([[[[0.0] * 3] * 224] * 224])


@pytest.mark.parametrize("pool", ["mean", "token", "AVG"])
def test_error_bad_global_pool(pool, err_model):
    with pytest.raises(ValueError, match=rf"global_pool '{pool}'"):
        swin_jax.create_model(TINY, global_pool=pool, **SMALL)
    with pytest.raises(ValueError, match=rf"global_pool '{pool}'"):
        err_model.reset_classifier(3, global_pool=pool)


@pytest.mark.parametrize("out_indices", [(0, 4), (-5,), (7,)])
def test_error_out_indices_out_of_range(out_indices):
    with pytest.raises(ValueError, match=r"out of range"):
        swin_jax.create_model(TINY, features_only=True, out_indices=out_indices, **SMALL)


@pytest.mark.parametrize("indices", [5, 0, [4], [-5]])
def test_error_forward_intermediates_indices(err_model, indices):
    with pytest.raises(ValueError, match=r"out of range"):
        err_model.forward_intermediates(np.zeros((1, 224, 224, 3), np.float32), indices=indices)


def test_error_features_only_has_no_head():
    model = swin_jax.create_model(TINY, features_only=True, **SMALL)
    with pytest.raises(ValueError, match="features_only"):
        model.forward_features(np.zeros((1, 224, 224, 3), np.float32))
    with pytest.raises(ValueError, match="features_only"):
        model.reset_classifier(3)


# ----------------------------------------------------------------------------------------------------------
# load_timm_state_dict
# ----------------------------------------------------------------------------------------------------------


def test_load_strict_reports_every_bad_key_at_once(small_timm):
    sd = dict(small_timm.state_dict())
    removed = ["layers.1.blocks.1.attn.relative_position_bias_table", "norm.weight"]
    for k in removed:
        del sd[k]
    sd["layers.9.blocks.0.mlp.fc3.weight"] = torch.zeros(3)
    sd["head.fc.weight"] = torch.zeros(10, 256)
    model = swin_jax.create_model(TINY, **SMALL64)
    with pytest.raises(swin_jax.WeightMismatchError) as info:
        swin_jax.load_timm_state_dict(model, sd)
    msg = str(info.value)
    for key in [*removed, "layers.9.blocks.0.mlp.fc3.weight", "head.fc.weight"]:
        assert key in msg, key
    assert "(10, 256)" in msg and "(1000, 256)" in msg
    assert "2 missing" in msg and "1 unexpected" in msg and "1 key(s) with the wrong shape" in msg
    err = info.value
    assert sorted(err.missing) == sorted(removed)
    assert err.unexpected == ["layers.9.blocks.0.mlp.fc3.weight"]
    assert err.mismatched == [("head.fc.weight", (10, 256), (1000, 256))]
    assert isinstance(err, ValueError)


def test_load_non_strict_returns_missing_and_unexpected(small_timm):
    sd = dict(small_timm.state_dict())
    removed = ["layers.1.blocks.1.attn.relative_position_bias_table", "norm.weight"]
    for k in removed:
        del sd[k]
    sd["extra.weight"] = torch.zeros(3)
    model = swin_jax.create_model(TINY, **SMALL64)
    before = _params(model)
    result = swin_jax.load_timm_state_dict(model, sd, strict=False)
    assert isinstance(result, swin_jax.weights.LoadResult)
    assert sorted(result.missing_keys) == sorted(removed)
    assert result.unexpected_keys == ["extra.weight"]
    after = _params(model)
    # missing ones keep their values, everything else is loaded from the state dict (timm layout -> NNX)
    key = ("layers", 1, "blocks", 1, "attn", "relative_position_bias_table")
    np.testing.assert_array_equal(after[key], before[key])
    np.testing.assert_array_equal(after[("norm", "scale")], before[("norm", "scale")])
    np.testing.assert_array_equal(after[("norm", "bias")], sd["norm.bias"].numpy())
    np.testing.assert_array_equal(after[("head", "fc", "kernel")], sd["head.fc.weight"].numpy().T)
    np.testing.assert_array_equal(
        after[("patch_embed", "proj", "kernel")], sd["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0)
    )


def test_load_misshaped_raises_even_non_strict(small_timm):
    sd = dict(small_timm.state_dict())
    sd["layers.2.downsample.reduction.weight"] = torch.zeros(128, 64)
    model = swin_jax.create_model(TINY, **SMALL64)
    with pytest.raises(swin_jax.WeightMismatchError, match=r"layers\.2\.downsample\.reduction\.weight.*\(128, 64\)"):
        swin_jax.load_timm_state_dict(model, sd, strict=False)


def test_load_wrong_architecture_raises(small_timm):
    model = swin_jax.create_model(TINY, in_chans=1, **SMALL64)
    with pytest.raises(swin_jax.WeightMismatchError, match=r"patch_embed\.proj\.weight"):
        swin_jax.load_timm_state_dict(model, small_timm.state_dict())


def test_load_accepts_torch_numpy_and_jax(small_timm, small_model):
    ref = _params(small_model)  # loaded from torch tensors
    sd = small_timm.state_dict()
    for converted in (
        {k: v.numpy() for k, v in sd.items()},
        {k: jnp.asarray(v.numpy()) for k, v in sd.items()},
        dict(small_timm.named_parameters()),  # tensors that require grad
    ):
        model = swin_jax.create_model(TINY, **SMALL64)
        swin_jax.load_timm_state_dict(model, converted)
        got = _params(model)
        assert got.keys() == ref.keys()
        for k in ref:
            np.testing.assert_array_equal(got[k], ref[k])


def test_load_bfloat16_torch_tensors(small_timm):
    sd = {k: v.to(torch.bfloat16) for k, v in small_timm.state_dict().items()}
    model = swin_jax.create_model(TINY, **SMALL64)
    swin_jax.load_timm_state_dict(model, sd)
    np.testing.assert_array_equal(
        _params(model)[("norm", "scale")], sd["norm.weight"].float().numpy().astype(np.float32)
    )


def test_load_ignores_non_persistent_buffers(small_timm, small_model):
    buffers = dict(small_timm.named_buffers())
    assert any(k.endswith("relative_position_index") for k in buffers)
    assert any(k.endswith("attn_mask") for k in buffers)  # the shifted blocks of the first stages
    sd = {**small_timm.state_dict(), **buffers}
    model = swin_jax.create_model(TINY, **SMALL64)
    result = swin_jax.load_timm_state_dict(model, sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    ref = _params(small_model)
    got = _params(model)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])


@pytest.mark.parametrize("bad", [[("norm.weight", np.zeros(3))], "state.safetensors", None])
def test_load_non_mapping_raises(bad):
    model = swin_jax.create_model(TINY, **SMALL64)
    with pytest.raises(TypeError, match=r"mapping"):
        swin_jax.load_timm_state_dict(model, bad)


# ----------------------------------------------------------------------------------------------------------
# abstract build: nothing initialized twice
# ----------------------------------------------------------------------------------------------------------


def test_build_abstract_model_then_load(small_timm, small_model):
    kwargs = dict(ARCHITECTURES[TINY], **SMALL64, num_classes=1000)
    model = build_abstract_model(TINY, kwargs)
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    assert leaves and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in leaves)
    swin_jax.load_timm_state_dict(model, small_timm.state_dict())
    leaves = jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    ref = _params(small_model)
    got = _params(model)
    assert got.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])
    x = images((1, 64, 64, 3))
    np.testing.assert_array_equal(np.asarray(_call(model, x)), np.asarray(_call(small_model, x)))


def test_build_abstract_model_with_drop_path_is_trainable(small_timm):
    kwargs = dict(ARCHITECTURES[TINY], **SMALL64, num_classes=1000, drop_path_rate=0.3)
    model = build_abstract_model(TINY, kwargs)
    swin_jax.load_timm_state_dict(model, small_timm.state_dict())
    # the non-parameter state (RNG streams) is concrete
    rest = jax.tree_util.tree_leaves(nnx.state(model, nnx.Not(nnx.Param)))
    assert rest and not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in rest)


# ----------------------------------------------------------------------------------------------------------
# no torch at import
# ----------------------------------------------------------------------------------------------------------


def test_import_swin_jax_does_not_import_torch():
    code = (
        "import sys, swin_jax\n"
        "bad = sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'timm', 'torchvision'))\n"
        "print('IMPORTED:', bad)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert out.returncode == 0, out.stderr
    assert "IMPORTED: []" in out.stdout, out.stdout


def test_dynamic_img_size_is_timms_alias_of_non_strict_size():
    kw = dict(embed_dim=32, depths=(1, 2, 1, 2), num_heads=(2, 2, 4, 4))
    tm = timm_model(TINY, dynamic_img_size=True, **kw)
    model = jax_from_timm(tm, TINY, dynamic_img_size=True, **kw)
    assert not model.strict_img_size
    x = images((1, 160, 128, 3))
    with torch.no_grad():
        ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert_close(jax.jit(lambda m, x: m(x))(model, x), ref)


def test_loaded_weights_do_not_alias_the_source_arrays(small_timm):
    import copy

    tm = copy.deepcopy(small_timm)
    model = swin_jax.create_model(TINY, **SMALL64)
    swin_jax.load_timm_state_dict(model, tm.state_dict())  # torch tensors, as a user would pass them
    before = swin_jax.to_timm_state_dict(model)
    with torch.no_grad():
        for p in tm.parameters():  # training the timm model afterwards must not change the loaded model
            p.add_(1.0)
    after = swin_jax.to_timm_state_dict(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)
