"""bf16 vs fp32 (and vs timm fp32) on real photos: logits error and top-1 / top-5 agreement.

    python benchmarks/bf16_agreement.py [--model swin_base_patch4_window7_224] [--weights PATH]

Without ``--weights`` the model has timm's architecture with randomized weights (tests/parity.py's
randomization, every parameter mattering); with it, real pretrained weights. Photos: every RGB photo
that scikit-image ships (``skimage.data``), preprocessed with the model's eval transform.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import swin_jax  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")


def photos(transform) -> np.ndarray:
    from skimage import data

    return np.stack([transform(Image.fromarray(getattr(data, name)())) for name in PHOTOS])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="swin_base_patch4_window7_224")
    p.add_argument("--weights", help="a checkpoint for create_model(pretrained=...); random weights if absent")
    args = p.parse_args()
    if args.weights:
        load = dict(pretrained=args.weights)
        state = None
    else:
        from parity import timm_model

        state = timm_model(args.model).state_dict()
        load = {}
    models = {}
    for name, dtype, param_dtype in (
        ("fp32", jnp.float32, jnp.float32),
        ("bf16", jnp.bfloat16, jnp.float32),
        ("bf16-params", jnp.bfloat16, jnp.bfloat16),
    ):
        model = swin_jax.create_model(args.model, dtype=dtype, param_dtype=param_dtype, **load)
        if state is not None:
            swin_jax.load_timm_state_dict(model, state)
        models[name] = model
    x = photos(swin_jax.create_transform(**swin_jax.resolve_data_config(models["fp32"])))
    logits = {k: np.asarray(swin_jax.compile_forward(m)(x), np.float32) for k, m in models.items()}
    ref = logits["fp32"]
    top5_ref = np.argsort(-ref, axis=-1)[:, :5]
    report = {"model": args.model, "weights": args.weights or "randomized", "photos": list(PHOTOS)}
    for k in ("bf16", "bf16-params"):
        top5 = np.argsort(-logits[k], axis=-1)[:, :5]
        report[k] = {
            "logits_rel_err": float(np.abs(logits[k] - ref).max() / np.abs(ref).max()),
            "top1_agreement": float((top5[:, 0] == top5_ref[:, 0]).mean()),
            "top5_overlap": float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top5, top5_ref)])),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
