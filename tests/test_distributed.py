"""Multi-device training (8 simulated CPU devices) equals 1 device; gradient checkpointing changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from parity import FP32_REL_TOL, rel_err

import swin_jax

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), img_size=64, window_size=4, num_classes=10)

# Runs in a fresh process: the host device count must be set before jax is imported.
CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import swin_jax
from swin_jax.distributed import make_mesh, shard_batch, shard_model
from swin_jax.train import create_optimizer, train_step

kw = json.loads(sys.argv[1])
x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 64, 64, 3)), jnp.float32)
y = jnp.arange(8) % 10

def run(mesh):
    model = swin_jax.create_model("swin_tiny_patch4_window7_224", drop_path_rate=0.0, **kw)
    model.train()
    # eps=1e-3: gradients that are zero in exact arithmetic (the key bias) are fp32 noise whose rounding depends
    # on the reduction order across devices; with a tiny eps Adam's g/(|g|+eps) turns that noise into O(lr) updates
    tx = create_optimizer(model, lr=1e-3, layer_decay=0.75, total_steps=10, eps=1e-3)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    batch = (x, y)
    if mesh is not None:
        shard_model(model, mesh); shard_model(optimizer, mesh); batch = shard_batch(batch, mesh)
    losses = [float(train_step(model, optimizer, batch, label_smoothing=0.1, num_classes=10)["loss"]) for _ in range(2)]
    params = swin_jax.to_timm_state_dict(model)
    return losses, params, model

ref_losses, ref_params, _ = run(None)
out = {"devices": jax.device_count()}
for fsdp in (1, 2):
    losses, params, model = run(make_mesh(fsdp=fsdp))
    qkv = model.layers[0].blocks[0].attn.qkv.kernel[...]
    out[f"fsdp{fsdp}"] = {
        "losses": losses, "ref_losses": ref_losses,
        "param_rel_err": max(float(np.abs(params[k] - ref_params[k]).max() / max(np.abs(ref_params[k]).max(), 1e-12))
                             for k in params),
        "qkv_shards": len(qkv.sharding.device_set), "qkv_spec": str(qkv.sharding.spec),
    }
print("RESULT " + json.dumps(out))
"""


def test_eight_simulated_devices_equal_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(TINY)], env=env, capture_output=True, text=True, timeout=600
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    out = json.loads(line[len("RESULT ") :])
    assert out["devices"] == 8
    for fsdp in ("fsdp1", "fsdp2"):
        r = out[fsdp]
        np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=1e-5)
        assert r["losses"][1] < r["losses"][0]
        assert r["param_rel_err"] <= 1e-5, r
    assert out["fsdp1"]["qkv_spec"] in ("P()", "PartitionSpec()")  # data parallel: replicated parameters
    assert "fsdp" in out["fsdp2"]["qkv_spec"]  # FSDP: the kernel is split over the fsdp axis


def test_gradient_checkpointing_same_loss_and_grads_same_names():
    model = swin_jax.create_model("swin_tiny_patch4_window7_224", **TINY)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
    y = jnp.array([1, 3])

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    grad = nnx.value_and_grad(loss_fn)
    names = list(swin_jax.to_timm_state_dict(model))
    loss, grads = nnx.jit(grad)(model)
    model.set_grad_checkpointing(True)
    # the remat is really in the program
    assert "remat" in str(jax.make_jaxpr(lambda s: grad(nnx.merge(nnx.graphdef(model), s)))(nnx.state(model)))
    loss_r, grads_r = nnx.jit(grad)(model)
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        assert rel_err(b, a) <= FP32_REL_TOL
    assert list(swin_jax.to_timm_state_dict(model)) == names  # the timm mapping is unchanged
    model.set_grad_checkpointing(False)
    assert "remat" not in str(jax.make_jaxpr(lambda s: grad(nnx.merge(nnx.graphdef(model), s)))(nnx.state(model)))
