"""Convergence on real data shipped offline: a small Swin trained from scratch on scikit-learn's digits
(1797 real 8x8 scans of handwritten digits, upscaled to 16x16) with the training library reaches >= 90%
held-out accuracy in about a minute and a half on a 2-core CPU. Seeds fix everything (data split, init,
drop path, batch order), so the run is reproducible; the recipe reached 91.9% when it was written."""

from __future__ import annotations

import numpy as np
from flax import nnx
from sklearn.datasets import load_digits

import swin_jax
from swin_jax.train import create_optimizer, eval_step, train_step


def test_small_swin_learns_digits_from_scratch():
    digits = load_digits()
    x = np.kron(digits.images / 16.0, np.ones((2, 2)))[..., None].repeat(3, -1).astype(np.float32)
    x = (x - 0.5) / 0.5  # [1797, 16, 16, 3] in [-1, 1]
    y = digits.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(y))
    x, y = x[perm], y[perm]
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]

    model = swin_jax.create_model(
        "swin_tiny_patch4_window7_224",
        img_size=16,
        patch_size=2,
        embed_dim=64,
        depths=(2, 2),
        num_heads=(2, 4),
        window_size=4,
        num_classes=10,
        drop_path_rate=0.1,
        rngs=nnx.Rngs(0),
    )
    batch_size, epochs = 50, 30
    steps_per_epoch = len(y_train) // batch_size
    tx = create_optimizer(model, lr=2e-3, weight_decay=0.05, warmup_steps=50, total_steps=epochs * steps_per_epoch)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    model.train()
    rng = np.random.default_rng(1)
    for _ in range(epochs):
        order = rng.permutation(len(y_train))
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            metrics = train_step(model, optimizer, (x_train[idx], y_train[idx]), num_classes=10)
    model.eval()
    result = eval_step(model, (x_test, y_test))
    accuracy = float(result["top1"]) / len(y_test)
    assert float(metrics["loss"]) < 0.5
    assert accuracy >= 0.90, f"held-out accuracy {accuracy:.3f} < 0.90"
