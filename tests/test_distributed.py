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
from parity import FP32_REL_TOL, adamw_divergence_bound, rel_err

import swin_jax

ROOT = Path(__file__).resolve().parents[1]
# two stages: windows of 4 shifted on the 8x8 map of stage 0, one unshifted window on stage 1's 4x4 map
TINY = dict(embed_dim=16, depths=(2, 2), num_heads=(2, 2), img_size=32, window_size=4, num_classes=10)

LR, EPS, WEIGHT_DECAY, LAYER_DECAY, STEPS, TOTAL = 1e-3, 1e-3, 0.05, 0.75, 2, 10

# Runs in a fresh process: the host device count must be set before jax is imported.
CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
import swin_jax
from swin_jax.distributed import make_mesh, shard_batch, shard_model, to_host
from swin_jax.train import create_optimizer, create_schedule, cross_entropy, param_groups
from swin_jax.weights import timm_name

kw, (LR, EPS, WD, LD, STEPS, TOTAL) = json.loads(sys.argv[1]), json.loads(sys.argv[2])
x = np.random.default_rng(0).standard_normal((8, kw["img_size"], kw["img_size"], 3)).astype(np.float32)
y = np.arange(8) % 10


@nnx.jit
def step(model, optimizer, batch):
    # train_step's computation, returning the gradients it applied
    images, labels = batch
    loss_fn = lambda m: cross_entropy(m(images), labels, num_classes=10, label_smoothing=0.1)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, grads


def named(state):
    return {timm_name([str(k) for k in path]): np.asarray(v.get_value(), np.float64)
            for path, v in nnx.to_flat_state(to_host(state))}


def run(mesh, bug=None):
    model = swin_jax.create_model("swin_tiny_patch4_window7_224", drop_path_rate=0.0, **kw)
    tx = create_optimizer(model, lr=LR, weight_decay=WD, layer_decay=LD, total_steps=TOTAL, eps=EPS)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if bug == "head_lr":  # a wrong learning rate for one group: the head's, 5% high
        # the lr scales are optimizer state (scale_by_param_name, last in the chain; its values sorted): under layer
        # decay the head alone has scale 1, the largest. Set there, the bug runs the reference's own program
        ones = [n for n, g in param_groups(model, weight_decay=WD, layer_decay=LD).items() if g.lr_scale == 1.0]
        assert sorted(ones) == ["head.fc.bias", "head.fc.weight"], ones
        head = optimizer.opt_state[-1].scales[-1]
        assert float(head.get_value()) == 1.0
        head.set_value(jnp.asarray(1.05, jnp.float32))
    batch = (x, y)
    if mesh is not None:
        shard_model(model, mesh); shard_model(optimizer, mesh); batch = shard_batch(batch, mesh)
    start = named(nnx.state(model, nnx.Param))
    losses, grads, params = [], [], []
    for _ in range(STEPS):
        loss, g = step(model, optimizer, batch)
        losses.append(float(loss)); grads.append(named(g)); params.append(named(nnx.state(model, nnx.Param)))
    qkv = model.layers[0].blocks[0].attn.qkv.kernel[...]
    return {"losses": losses, "grads": grads, "params": params, "start": start,
            "qkv_shards": len(qkv.sharding.device_set), "qkv_spec": str(getattr(qkv.sharding, "spec", None))}


ref = run(None)
model = swin_jax.create_model("swin_tiny_patch4_window7_224", **kw)
groups = param_groups(model, weight_decay=WD, layer_decay=LD)
schedule = create_schedule(lr=LR, total_steps=TOTAL)
lrs = [float(schedule(t)) for t in range(STEPS)]


def compare(r):
    # per parameter tensor and step: gradients (max |diff|, max |ref|), parameter difference after the step, and
    # the inputs of the AdamW divergence bound
    out = {}
    for name, p0 in ref["start"].items():
        assert np.array_equal(r["start"][name], p0), name
        out[name] = {
            "grad_diff": [float(np.abs(a[name] - b[name]).max()) for a, b in zip(r["grads"], ref["grads"])],
            "grad_max": [float(np.abs(b[name]).max()) for b in ref["grads"]],
            "param_diff": [float(np.abs(a[name] - b[name]).max()) for a, b in zip(r["params"], ref["params"])],
            "param_max": float(max(np.abs(p0).max(), *(np.abs(b[name]).max() for b in ref["params"]))),
            "lrs": [lr * groups[name].lr_scale for lr in lrs],
            "weight_decay": groups[name].weight_decay,
        }
    return {"losses": r["losses"], "tensors": out, "qkv_shards": r["qkv_shards"], "qkv_spec": r["qkv_spec"]}


out = {"devices": jax.device_count(), "ref_losses": ref["losses"], "runs": {}}
for fsdp in (1, 2):
    out["runs"][f"fsdp{fsdp}"] = compare(run(make_mesh(fsdp=fsdp)))
out["runs"]["head_lr"] = compare(run(None, "head_lr"))  # one device, with a bug the check must catch
print("RESULT " + json.dumps(out))
"""


def equivalence_problems(run: dict, ref_losses: list[float], report: dict | None = None) -> list[str]:
    """What makes ``run`` differ from the one-device reference by more than fp32 reduction order explains.

    Exactly comparable at the parity tolerance: the loss of every step, and the gradients of the first step
    (same parameters, same batch; only the order of the sums differs). Parameters after each AdamW step: within
    :func:`parity.adamw_divergence_bound` of the reference, fed with the gradient differences measured at each
    step up to it (what the optimizer really received). After the first step that difference is reduction noise
    alone; later ones also carry what earlier steps changed, so a bug shows first in the first step.
    """
    problems = []
    if not np.allclose(run["losses"], ref_losses, rtol=FP32_REL_TOL, atol=0):
        problems.append(f"losses {run['losses']} vs {ref_losses}")
    for name, t in run["tensors"].items():
        if t["grad_diff"][0] > FP32_REL_TOL * t["grad_max"][0]:
            problems.append(f"{name}: gradient differs by {t['grad_diff'][0]:.3e} (max {t['grad_max'][0]:.3e})")
        for k, diff in enumerate(t["param_diff"], start=1):
            bound = adamw_divergence_bound(
                t["grad_diff"][:k], t["lrs"][:k], eps=EPS, weight_decay=t["weight_decay"], param_max=t["param_max"]
            )
            if report is not None:
                report[f"{name} step {k}"] = (t["grad_diff"][:k], diff, bound)
            if diff > bound:
                problems.append(f"{name}: parameters after step {k} differ by {diff:.3e} > bound {bound:.3e}")
    return problems


def test_eight_simulated_devices_equal_one_device():
    """Data parallel (fsdp=1) and FSDP (fsdp=2) on 8 simulated devices train as 1 device does, up to the
    reduction order of fp32 sums (which differs with the device count, and with the CPU's instruction set).

    The bound on the parameters comes from the optimizer: see :func:`parity.adamw_divergence_bound`. Measured
    on an AMD EPYC without AVX-512 (default ISA and ``XLA_FLAGS=--xla_cpu_max_isa=SSE4_2``; ``python
    tests/test_distributed.py`` prints these): step-1 gradients differ by at most 7.2e-7 of their tensor's largest
    (tolerance 1e-5); every parameter difference is at most 0.49x its bound (the bound adds the rounding of the
    stored parameters, which dominates here). An injected bug must fail the same check on one device: the head's
    learning rate 5% too high (4.9e-5 against a bound of 9.4e-10 after the first step).
    """
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"  # keeps an ISA flag
    env = dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=str(ROOT))
    hyper = [LR, EPS, WEIGHT_DECAY, LAYER_DECAY, STEPS, TOTAL]
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(TINY), json.dumps(hyper)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stderr[-3000:]
    out = json.loads(line[len("RESULT ") :])
    assert out["devices"] == 8
    runs = out["runs"]
    for fsdp in ("fsdp1", "fsdp2"):
        assert equivalence_problems(runs[fsdp], out["ref_losses"]) == [], fsdp
        assert runs[fsdp]["losses"][1] < runs[fsdp]["losses"][0]
    assert runs["fsdp1"]["qkv_spec"] in ("P()", "PartitionSpec()")  # data parallel: replicated parameters
    assert "fsdp" in runs["fsdp2"]["qkv_spec"]  # FSDP: the kernel is split over the fsdp axis
    # the check catches real bugs
    head_lr = equivalence_problems(runs["head_lr"], out["ref_losses"])
    assert "head.fc.weight: parameters after step 1 differ" in "\n".join(head_lr), head_lr
    assert "head.fc.bias: parameters after step 1 differ" in "\n".join(head_lr), head_lr
    assert not any("gradient differs" in p for p in head_lr), head_lr  # the gradients of step 1 are the same


def test_gradient_checkpointing_same_loss_and_grads_same_names():
    model = swin_jax.create_model("swin_tiny_patch4_window7_224", **TINY)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    y = jnp.array([1, 3])

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    grad = nnx.value_and_grad(loss_fn)

    def remats() -> int:  # the MLPs' GELU is always recomputed (one remat each); checkpointing adds one per block
        return str(jax.make_jaxpr(lambda s: grad(nnx.merge(nnx.graphdef(model), s)))(nnx.state(model))).count("remat")

    names = list(swin_jax.to_timm_state_dict(model))
    loss, grads = nnx.jit(grad)(model)
    plain = remats()
    model.set_grad_checkpointing(True)
    assert remats() > plain  # the remat is really in the program
    loss_r, grads_r = nnx.jit(grad)(model)
    np.testing.assert_allclose(float(loss_r), float(loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
        assert rel_err(b, a) <= FP32_REL_TOL
    assert list(swin_jax.to_timm_state_dict(model)) == names  # the timm mapping is unchanged
    model.set_grad_checkpointing(False)
    assert remats() == plain


if __name__ == "__main__":  # print the measured differences next to their bounds (for the docstring's figures)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(TINY), json.dumps([LR, EPS, WEIGHT_DECAY, LAYER_DECAY, STEPS, TOTAL])],
        env=dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
    )
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT ") :])
    for run_name, run in out["runs"].items():
        report: dict = {}
        problems = equivalence_problems(run, out["ref_losses"], report)
        worst = max(report.items(), key=lambda kv: kv[1][1] / kv[1][2])
        print(run_name, problems[:3], "worst param_diff/bound:", worst[0], worst[1])
        print(
            "  max step-1 grad diff / grad max:",
            max(t["grad_diff"][0] / t["grad_max"][0] for t in run["tensors"].values()),
        )
