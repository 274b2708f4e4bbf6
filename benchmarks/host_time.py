"""Host time per training-step call: what Python and dispatch cost before the device starts.

    python benchmarks/host_time.py                     # Swin-B's structure at width 16, 32 px
    python benchmarks/host_time.py --out benchmarks/results/host_time_cpu.json

The model has Swin-B's module tree (depths 2-2-18-2, the same parameter and optimizer-state leaves)
at embed_dim 16 and 32x32 images, so the device work is tiny and the time until a call returns is
mostly host time: flattening the state, the NNX graph walk (if any) and dispatch (XLA:CPU may run a
small program inline, so part of the device work can be in the figure too). Two forms of the same
step (cross-entropy, backward, timm's AdamW recipe from ``create_optimizer``), each timed as the
median over ``--calls`` calls of the time until the call returns, its result awaited after the clock
stops:

* ``train_step (nnx.jit)``: :func:`swin_jax.train.train_step`, an ``nnx.jit`` function of (model,
  optimizer) that walks both objects' graphs on every call (the form ``finetune`` used before);
* ``TrainStep``: :class:`swin_jax.train.TrainStep`, one ``jax.jit`` pure function over the flat
  state with donated buffers (what ``finetune`` uses).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench import cpu_description
from flax import nnx

import swin_jax
from swin_jax.train import TrainStep, create_optimizer, train_step


def _host_ms(call, calls: int) -> float:
    jax.block_until_ready(call())  # compile
    jax.block_until_ready(call())
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t)
        jax.block_until_ready(out)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="swin_base_patch4_window7_224")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    def make():
        model = swin_jax.create_model(args.model, img_size=32, embed_dim=16, window_size=4, num_classes=10)
        model.train()
        tx = create_optimizer(model, lr=1e-3, weight_decay=0.05, layer_decay=0.75, total_steps=1000)
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3)), jnp.float32)
    batch = (x, jnp.arange(2) % 10)
    rows = {}
    model, optimizer = make()
    leaves = len(jax.tree_util.tree_leaves(nnx.state((model, optimizer))))
    rows["train_step (nnx.jit)"] = _host_ms(lambda: train_step(model, optimizer, batch, num_classes=10), args.calls)
    step = TrainStep(model, optimizer, num_classes=10)
    rows["TrainStep"] = _host_ms(lambda: step(batch), args.calls)
    for name, ms in rows.items():
        print(f"{name:21s} {ms:8.2f} ms per call (host)")
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
        "model": f"{args.model} structure, embed_dim 16, 32 px, batch 2",
        "state_leaves": leaves,
        "host_ms_per_call": rows,
        "jax": jax.__version__,
        "flax": __import__("flax").__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "cpu": cpu_description(),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
