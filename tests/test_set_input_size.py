"""``model.set_input_size`` on Swin V1, SwinV2 and SwinV2-CR equals timm 1.0.31's model after the same call: the
per-block windows and shifts, the resized relative position bias tables (V1), the resampled stem for a new patch size
(V1, V2: timm's V2-CR has no patch_size argument), the outputs at the new size, and what is recorded for a saved
checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from parity import FP32_REL_TOL, assert_parity, images, jax_from_timm, rel_err, small_logit_scales_, timm_model

import swin_jax

V1 = "swin_tiny_patch4_window7_224"
V2 = "swinv2_tiny_window8_256"
CR = "swinv2_cr_tiny_ns_224"
SMALL = dict(embed_dim=32, depths=(2, 2, 2), num_heads=(2, 2, 4))

CASES = {
    # img_size only: every stage's window scales with the grid (V1: 7 * 24 // 56 = 3, 7 * 40 // 56 = 5): the
    # tables are resized 13x13 -> 5x9 (non-square, timm's geometric interpolation)
    "v1_img_size_scales_windows": (V1, dict(), dict(img_size=(96, 160))),
    # window ratio 4 of the new 16x24 grid -> window (4, 6) in every stage, always partitioned
    "v1_window_ratio_always_partition": (V1, dict(), dict(img_size=(64, 96), window_ratio=4, always_partition=True)),
    # per-stage windows at a larger size; the shifted blocks shift by half the new window
    "v2_window_size_per_stage": (V2, dict(img_size=64, window_size=4), dict(img_size=(96, 80), window_size=(6, 5, 3))),
    # V2-CR at 128 px: window_ratio 8 of the 32x32 grid gives 4x4 windows; img_size only scales them with the grid
    # (24x40 -> 3x5); the meta network's coordinates follow the new windows
    "cr_img_size_scales_ratio_windows": (CR, dict(img_size=128), dict(img_size=(96, 160))),
    # a new patch size: the stem's kernel resampled as timm's resample_patch_embed (4x4 -> 2x2), the grid doubles
    # (16 -> 32) and the windows scale with it (4 -> 8: tables 7x7 -> 15x15)
    "v1_patch_size": (V1, dict(img_size=64, window_size=4), dict(patch_size=2)),
    # non-square patch 2x8 at 64x128 (upsampling one axis, downsampling the other): grid 32x16, windows 8x4
    "v2_patch_size_non_square": (V2, dict(img_size=64, window_size=4), dict(img_size=(64, 128), patch_size=(2, 8))),
}


def _geometry(model) -> list[list[tuple]]:
    stages = model.stage_modules if hasattr(model, "stage_modules") else getattr(model, "layers", None) or model.stages
    return [[(tuple(map(int, b.window_size)), tuple(map(int, b.shift_size))) for b in stage.blocks] for stage in stages]


@pytest.mark.parametrize("case", list(CASES))
def test_set_input_size_equals_timm(case):
    name, build, call = CASES[case]
    kw = {**SMALL, **build}
    tm = small_logit_scales_(timm_model(name, **kw))  # SwinV2 compared at fp32 directly (test_swinv2: large scales)
    model = jax_from_timm(tm, name, **kw)
    tm.set_input_size(**call)
    model.set_input_size(**call)
    assert model.img_size == tuple(tm.patch_embed.img_size)
    assert _geometry(model) == _geometry(tm)
    assert _geometry(model) != _geometry(jax_from_timm(timm_model(name, **kw), name, **kw))  # it did change
    ours, ref = swin_jax.to_timm_state_dict(model), tm.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    for k, v in ref.items():  # the resized tables: timm's interpolation in float32, ported to numpy
        if k == "patch_embed.proj.weight":  # a pseudo-inverse (LAPACK's, not torch's): ~6e-7 of the largest
            assert rel_err(ours[k], v.numpy()) <= FP32_REL_TOL, k
        else:
            np.testing.assert_allclose(ours[k], v.numpy(), rtol=1e-6, atol=1e-6, err_msg=k)
    assert_parity(model, tm, images((1, *model.img_size, 3), seed=1))
    assert swin_jax.resolve_data_config(model)["input_size"] == (3, *model.img_size)


def test_resized_model_saves_and_reloads_as_itself(tmp_path):
    from swin_jax.hub import save_pretrained

    model = swin_jax.create_model(V1, **SMALL)
    model.set_input_size(img_size=(96, 160))
    assert model.model_args["img_size"] == (96, 160) and model.model_args["window_size"] == ((3, 5),) * 3
    again = swin_jax.create_model(V1, pretrained=str(save_pretrained(model, tmp_path / "resized")))
    assert _geometry(again) == _geometry(model) and again.img_size == (96, 160)
    ours, ref = swin_jax.to_timm_state_dict(again), swin_jax.to_timm_state_dict(model)
    assert ours["layers.0.blocks.0.attn.relative_position_bias_table"].shape == (5 * 9, 2)
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)


def test_new_patch_size_saves_and_reloads_as_itself(tmp_path):
    from swin_jax.hub import save_pretrained

    model = swin_jax.create_model(V1, img_size=64, window_size=4, **SMALL)
    model.set_input_size(patch_size=2)
    assert model.patch_size == (2, 2) and model.grid_size == (32, 32) and model.model_args["patch_size"] == (2, 2)
    assert [info["reduction"] for info in model.feature_info] == [2, 4, 8]
    again = swin_jax.create_model(V1, pretrained=str(save_pretrained(model, tmp_path / "patch2")))
    assert again.patch_size == (2, 2) and _geometry(again) == _geometry(model)
    ours, ref = swin_jax.to_timm_state_dict(again), swin_jax.to_timm_state_dict(model)
    assert ours["patch_embed.proj.weight"].shape == (32, 3, 2, 2)
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)


def test_set_input_size_at_the_current_size_changes_nothing():
    model = swin_jax.create_model(V2, **SMALL)
    before = (_geometry(model), model.img_size)
    model.set_input_size()
    model.set_input_size(img_size=model.img_size)
    assert (_geometry(model), model.img_size) == before


@pytest.mark.parametrize(
    "call, error, match",
    [
        (dict(patch_size=0), ValueError, "patch_size must be a positive int"),
        (dict(patch_size=128), ValueError, r"patch size \(128, 128\) is larger than the input size \(96, 160\)"),
        (dict(window_size=(4, 4, 4, 4)), ValueError, "expected 3 stage window sizes"),
        (dict(window_ratio=(2, 0, 2)), ValueError, "window ratios must be positive"),
    ],
)
def test_bad_arguments_change_nothing(call, error, match):
    model = swin_jax.create_model(V1, **SMALL)
    before = (_geometry(model), model.img_size, model.patch_size, swin_jax.to_timm_state_dict(model))
    with pytest.raises(error, match=match):
        model.set_input_size(img_size=(96, 160), **call)
    after = (_geometry(model), model.img_size, model.patch_size, swin_jax.to_timm_state_dict(model))
    assert after[:3] == before[:3] and all(np.array_equal(after[3][k], v) for k, v in before[3].items())
