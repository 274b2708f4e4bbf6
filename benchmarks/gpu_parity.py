"""Parity on the accelerator: swin-jax vs timm, both frameworks on the same device (GPU if there is one).

    PYTHONPATH=. python benchmarks/gpu_parity.py [--model swin_base_patch4_window7_224] [--batch 8] [--out FILE]

Swin with timm's architecture and every parameter randomized so it matters (tests/parity.py), the same
weights mapped into swin-jax. Compared: logits, forward_features, pooled features (pre-logits) and every
stage map, as max|ours - ref| / max|ref| (tests/parity.py's ``rel_err``), against timm fp32 on the same
device with full-fp32 matmuls (torch ``allow_tf32=False`` for matmul and cuDNN).

- fp32: swin-jax under ``jax_default_matmul_precision='highest'`` (the like-for-like check, tolerance
  FP32_REL_TOL), and, for scale, swin-jax at jax's default precision (TF32 on GPU), timm with TF32 on,
  and timm on the CPU. ``jax_fp32_tf32_emulated``: swin-jax with the TF32 rounding of jax's default GPU
  precision emulated (benchmarks/tf32.py), so the CPU gives the default precision's accuracy too; on a GPU it
  sits next to the real ``jax_fp32_default_precision`` and checks the emulation.
- bf16: swin-jax bf16 compute (fp32 parameters) and timm bf16 autocast, both against timm fp32.

SwinV2 and V2-CR (cosine logits scaled by up to 100, where fp32 itself is not exact) are judged as the tests
and ``convert --verify`` judge them: every output against timm in float64 (on the CPU), swin-jax fp32's largest
root-mean-square error over the outputs (``rms_vs_float64``) within ``max(2 x timm fp32's, FP32_REL_TOL)`` and no
element off by more than ``FP32_MAX_REL_TOL`` (``max_vs_float64``). The report says what jax's default matmul
precision (TF32 on GPU) gives against the same reference.

Inputs: random N(0, 1) images (tests/parity.py's ``images``), and the photos that scikit-image ships
through the eval transform when scikit-image is installed (the output says if it was not).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jax and torch share the device here

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from parity import (  # noqa: E402
    FP32_MAX_REL_TOL,
    FP32_REL_TOL,
    images,
    jax_from_timm,
    jax_outputs,
    outputs,
    rel_err,
    rms_rel_err,
    timm_model,
    timm_outputs,
)
from tf32 import emulate_tf32  # noqa: E402

import swin_jax  # noqa: E402
from swin_jax.convert.verify import timm_float64  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
KEYS = ("logits", "features", "pre_logits")


def _set_torch_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def compare(ours: dict, ref: dict, err=rel_err) -> dict:
    errs = {k: err(np.asarray(ours[k], np.float32), ref[k]) for k in KEYS}
    for i, (a, b) in enumerate(zip(ours["maps"], ref["maps"], strict=True)):
        errs[f"stage{i}"] = err(np.asarray(a, np.float32), b)
    errs["max"] = max(errs.values())
    top1 = np.argmax(np.asarray(ours["logits"], np.float32), -1) == np.argmax(ref["logits"], -1)
    errs["top1_agreement"] = float(top1.mean())
    return errs


def photos(model: swin_jax.SwinTransformer) -> np.ndarray | str:
    try:
        from PIL import Image
        from skimage import data
    except ImportError as e:
        return f"skipped: {e}"
    transform = swin_jax.create_transform(**swin_jax.resolve_data_config(model))
    return np.stack([transform(Image.fromarray(getattr(data, name)())) for name in PHOTOS]).astype(np.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="swin_base_patch4_window7_224")
    p.add_argument("--batch", type=int, default=8, help="random images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON (default benchmarks/results/<backend>-parity.json)")
    p.add_argument(
        "--attn-impls",
        nargs="+",
        default=["auto"],
        help="attention implementations to check (swin_jax.attention_impls()); results of others than 'auto' "
        "are named jax_fp32_highest@IMPL and jax_bf16@IMPL",
    )
    args = p.parse_args()

    from bench import _info_worker

    info = _info_worker()
    backend = jax.default_backend()
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"jax on {jax.devices()[0]}, torch on {tdev}", file=sys.stderr)
    _set_torch_tf32(False)

    tmodel_cpu = timm_model(args.model, seed=args.seed)
    model32 = jax_from_timm(tmodel_cpu, args.model)
    model16 = jax_from_timm(tmodel_cpu, args.model, dtype=jnp.bfloat16)
    tmodel = copy.deepcopy(tmodel_cpu).to(tdev)
    size = tuple(model32.img_size)

    inputs: dict = {"random": images((args.batch, *size, 3), seed=args.seed), "photos": photos(model32)}
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/gpu_parity.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        "weights": "timm architecture, every parameter randomized (tests/parity.py randomize_timm_)",
        **info,
        "jax_device": str(jax.devices()[0]),
        "torch_device": torch.cuda.get_device_name(0) if tdev == "cuda" else "cpu",
        "reference": f"timm fp32 on {tdev}, torch allow_tf32=False (matmul and cuDNN)",
        "fp32_rel_tol": FP32_REL_TOL,
        "inputs": {k: (v if isinstance(v, str) else list(v.shape)) for k, v in inputs.items()},
        "results": {},
    }
    if isinstance(inputs["photos"], str):
        print(f"photos {inputs['photos']}: random images only", file=sys.stderr)
    # every configuration runs once on all inputs together (one compile each); compared per input set
    sets = {k: v for k, v in inputs.items() if not isinstance(v, str)}
    x = np.concatenate(list(sets.values()))
    outs = {"reference": timm_outputs(tmodel, x, tdev)}
    for impl in args.attn_impls:
        suffix = "" if impl == "auto" else f"@{impl}"
        model32.set_attn_impl(impl)
        model16.set_attn_impl(impl)
        with jax.default_matmul_precision("highest"):
            outs[f"jax_fp32_highest{suffix}"] = jax_outputs(model32, x)
        with jax.default_matmul_precision("default"):
            if impl == "auto":
                outs["jax_fp32_default_precision"] = jax_outputs(model32, x)
            outs[f"jax_bf16{suffix}"] = jax_outputs(model16, x)
        if impl == "auto":  # TF32 inputs emulated (benchmarks/tf32.py), every other op at full fp32
            with jax.default_matmul_precision("highest"):
                emulated = jax.jit(emulate_tf32(outputs))(model32, x)
            outs["jax_fp32_tf32_emulated"] = jax.tree_util.tree_map(np.asarray, emulated)
    _set_torch_tf32(True)
    outs["timm_fp32_tf32"] = timm_outputs(tmodel, x, tdev)
    _set_torch_tf32(False)
    outs["timm_bf16_autocast"] = timm_outputs(tmodel, x, tdev, bf16=True)
    if tdev != "cpu":
        outs["timm_fp32_cpu"] = timm_outputs(tmodel_cpu, x, "cpu")
    cosine = isinstance(model32, (swin_jax.SwinTransformerV2, swin_jax.SwinTransformerV2Cr))
    ref64 = timm_outputs(timm_float64(tmodel_cpu), x.astype(np.float64), "cpu") if cosine else None
    start = 0
    for name, xs in sets.items():
        part = slice(start, start + len(xs))
        start += len(xs)
        sub = {k: jax.tree_util.tree_map(lambda a, part=part: np.asarray(a)[part], v) for k, v in outs.items()}
        ref = sub.pop("reference")
        res = {k: compare(v, ref) for k, v in sub.items()}
        if ref64 is None:
            for k in [k for k in res if k.startswith("jax_fp32_highest")]:
                res[k]["within_fp32_tol"] = res[k]["max"] <= FP32_REL_TOL
        else:  # against timm float64: rms within 2x timm fp32's (or FP32_REL_TOL), every element within the guard
            r64 = jax.tree_util.tree_map(lambda a, part=part: np.asarray(a)[part], ref64)
            report.setdefault("timm_fp32_max_vs_float64", {})[name] = compare(ref, r64)["max"]
            timm_rms = compare(ref, r64, rms_rel_err)["max"]
            report.setdefault("timm_fp32_rms_vs_float64", {})[name] = timm_rms
            for k in sub:
                res[k]["max_vs_float64"] = compare(sub[k], r64)["max"]
                res[k]["rms_vs_float64"] = compare(sub[k], r64, rms_rel_err)["max"]
            bound = max(2 * timm_rms, FP32_REL_TOL)
            for k in [k for k in res if k.startswith("jax_fp32_highest")]:
                within = res[k]["rms_vs_float64"] <= bound and res[k]["max_vs_float64"] <= FP32_MAX_REL_TOL
                res[k]["within_fp32_tol"] = within
                res[k]["float64_rms_bound"] = bound
        report["results"][name] = res
        for k, v in res.items():
            f64 = (
                f"  vs float64 {v['max_vs_float64']:.2e} (rms {v['rms_vs_float64']:.2e})"
                if "max_vs_float64" in v
                else ""
            )
            print(f"{name:7s} {k:28s} max rel err {v['max']:.2e}  logits {v['logits']:.2e}{f64}", file=sys.stderr)
        if ref64 is not None:
            own = f"{report['timm_fp32_max_vs_float64'][name]:.2e} (rms {report['timm_fp32_rms_vs_float64'][name]:.2e})"
            print(f"{name:7s} timm fp32 vs float64: {own}", file=sys.stderr)
    ok = all(v["within_fp32_tol"] for r in report["results"].values() for v in r.values() if "within_fp32_tol" in v)
    report["fp32_parity_ok"] = ok
    out = args.out or ROOT / "benchmarks" / "results" / f"{backend}-parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["results"], indent=1))
    criterion = f"within {FP32_REL_TOL:.0e}"
    if ref64 is not None:
        criterion = f"rms within 2x timm fp32's against timm float64, no element off by {FP32_MAX_REL_TOL:.0e}"
    print(f"fp32 parity (highest) {criterion}: {ok}; wrote {out}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
