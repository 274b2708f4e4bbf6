"""The fast path (swin_jax.compile_forward): same numbers as the model, one compile per batch size."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from parity import assert_close, images, jax_from_timm, rel_err, timm_model, timm_outputs

import swin_jax

TINY = "swin_tiny_patch4_window7_224"
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), img_size=96)
BF16_REL_TOL = 2e-2  # bf16 compute vs fp32, on randomized weights (issue "speed")


@pytest.fixture(scope="module")
def pair():
    tm = timm_model(TINY, **SMALL)
    return tm, jax_from_timm(tm, TINY, **SMALL)


def test_compiled_forward_matches_timm(pair):
    tm, model = pair
    x = images((3, 96, 96, 3))
    assert_close(swin_jax.compile_forward(model)(x), timm_outputs(tm, x)["logits"])


def test_other_methods(pair):
    tm, model = pair
    x = images((2, 96, 96, 3))
    feats = swin_jax.compile_forward(model, method="forward_features")(x)
    assert_close(feats, timm_outputs(tm, x)["features"])


def test_fixed_batch_size_pads_and_chunks_with_one_compile(pair):
    _, model = pair
    forward = swin_jax.compile_forward(model, batch_size=4)
    x = images((10, 96, 96, 3), seed=1)
    out = np.asarray(forward(x))  # chunks of 4, 4, 2 (padded)
    assert out.shape == (10, model.num_classes)
    for n in (1, 3, 4):
        np.testing.assert_allclose(np.asarray(forward(x[:n])), out[:n], rtol=0, atol=1e-6 * np.abs(out).max())
    assert forward._run._cache_size() == 1  # every call ran at batch 4


def test_bf16_compute_close_to_fp32(pair):
    tm, _ = pair
    x = images((4, 96, 96, 3), seed=2)
    ref = timm_outputs(tm, x)["logits"]
    for param_dtype in (jnp.float32, jnp.bfloat16):
        model = jax_from_timm(tm, TINY, dtype=jnp.bfloat16, param_dtype=param_dtype, **SMALL)
        out = swin_jax.compile_forward(model)(x)
        assert out.dtype == jnp.bfloat16
        assert rel_err(out, ref) <= BF16_REL_TOL
