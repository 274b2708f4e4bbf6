"""Experiment: window attention through ``jax.nn.dot_product_attention`` vs the model's einsum attention.

    PYTHONPATH=. python benchmarks/attention_experiment.py [--batch 256] [--out FILE]

Nothing in swin_jax changes: ``swin_jax.model.WindowAttention.__call__`` is replaced while a forward is
traced, then restored. The replacement computes q, k, v as the model does and calls
``jax.nn.dot_product_attention`` with the relative position bias (and, in shifted blocks, the shift
mask) as an additive bias. To keep the bias small in shifted blocks, the window index is folded into
the head axis (``[B, N, nW * heads, d]``), so the bias is ``[1, nW * heads, N, N]`` and broadcasts over
the batch instead of being materialized per window.

1. Parity at fp32 (``jax_default_matmul_precision='highest'``), randomized weights (tests/parity.py):
   the patched path (implementation None) vs the model's own path, logits and every stage map; both
   vs timm fp32 on the CPU too. cuDNN (bf16 only) vs the model's bf16 path and vs fp32.
2. Speed: bf16 compute and parameters, ``compile_forward`` (as benchmarks/bench.py's jax-bf16), the
   implementations compiled once each, then timed in interleaved rounds on the same random input.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import swin_jax  # noqa: E402
import swin_jax.model as swin_model  # noqa: E402

ORIGINAL_CALL = swin_model.WindowAttention.__call__


def dpa_call(implementation: str | None):
    """A ``WindowAttention.__call__`` that uses ``jax.nn.dot_product_attention``."""

    def call(self, x: jax.Array, mask=None) -> jax.Array:
        b_, n, _ = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b_, n, 3, h, -1)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B * nW, N, heads, d]
        d = q.shape[-1]
        bias = self.relative_position_bias()  # [heads, N, N]
        if mask is None:
            bias = bias[None]
        else:
            nw = mask.shape[0]

            def fold(t):  # [B * nW, N, heads, d] -> [B, N, nW * heads, d]
                return t.reshape(-1, nw, n, h, d).transpose(0, 2, 1, 3, 4).reshape(-1, n, nw * h, d)

            q, k, v = fold(q), fold(k), fold(v)
            bias = (bias[None] + jnp.asarray(mask, bias.dtype)[:, None]).reshape(1, nw * h, n, n)
        out = jax.nn.dot_product_attention(
            q, k, v, bias=bias.astype(q.dtype), scale=self.scale, implementation=implementation
        )
        if mask is not None:
            out = out.reshape(-1, n, nw, h, d).transpose(0, 2, 1, 3, 4)
        x = out.reshape(b_, n, h * d)
        return self.proj_drop(self.proj(x))

    return call


@contextlib.contextmanager
def attention(impl: str):
    """``impl``: 'einsum' (the model's own), 'dpa-none' or 'dpa-cudnn'."""
    if impl != "einsum":
        swin_model.WindowAttention.__call__ = dpa_call(None if impl == "dpa-none" else impl.split("-", 1)[1])
    try:
        yield
    finally:
        swin_model.WindowAttention.__call__ = ORIGINAL_CALL


def errors(ours: dict, ref: dict) -> dict:
    from parity import rel_err

    errs = {"logits": rel_err(ours["logits"], ref["logits"])}
    for i, (a, b) in enumerate(zip(ours["maps"], ref["maps"], strict=True)):
        errs[f"stage{i}"] = rel_err(a, b)
    errs["max"] = max(errs.values())
    return errs


def parity(model_name: str, batch: int) -> dict:
    import torch
    from parity import images, jax_from_timm, rel_err, timm_model, to_nchw

    tmodel = timm_model(model_name)
    model32 = jax_from_timm(tmodel, model_name)
    model16 = jax_from_timm(tmodel, model_name, dtype=jnp.bfloat16)
    x = images((batch, *model32.img_size, 3), seed=1)
    with torch.no_grad():
        timm_logits = tmodel(to_nchw(x)).numpy()
    res: dict = {}
    with jax.default_matmul_precision("highest"):
        ref32 = _run(model32, x, "einsum")
        dpa32 = _run(model32, x, "dpa-none")
    res["fp32_highest_dpa_none_vs_einsum"] = errors(dpa32, ref32)
    res["fp32_highest_einsum_logits_vs_timm_cpu"] = rel_err(ref32["logits"], timm_logits)
    res["fp32_highest_dpa_none_logits_vs_timm_cpu"] = rel_err(dpa32["logits"], timm_logits)
    ref16 = _run(model16, x, "einsum")
    res["bf16_einsum_vs_fp32"] = errors(ref16, ref32)
    try:
        cud16 = _run(model16, x, "dpa-cudnn")
        res["bf16_dpa_cudnn_vs_bf16_einsum"] = errors(cud16, ref16)
        res["bf16_dpa_cudnn_vs_fp32"] = errors(cud16, ref32)
    except Exception as e:  # noqa: BLE001
        res["bf16_dpa_cudnn"] = f"failed: {type(e).__name__}: {str(e)[:400]}"
    return res


def _run(model, x, impl: str) -> dict:
    from flax import nnx

    with attention(impl):

        @nnx.jit
        def fn(m, x):
            return dict(logits=m(x), maps=m.forward_intermediates(x, intermediates_only=True))

        out = fn(model, x)
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), out)


def speed(model_name: str, batch: int, impls: list[str], rounds: int, calls: int) -> dict:
    model = swin_jax.create_model(model_name, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, *model.img_size, 3)), jnp.float32)
    compiled, res = {}, {}
    for impl in impls:
        with attention(impl):
            fwd = swin_jax.compile_forward(model)
            t = time.perf_counter()
            try:
                exe = fwd.lower(x).compile()
            except Exception as e:  # noqa: BLE001
                res[impl] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
                continue
        hlo = exe.as_text()
        res[impl] = {"compile_s": time.perf_counter() - t, "cudnn_fmha_in_hlo": "cudnn$fmha" in hlo}
        compiled[impl] = (exe, fwd.state)
        for _ in range(3):
            jax.block_until_ready(exe(fwd.state, x))
    times: dict[str, list[float]] = {k: [] for k in compiled}
    for _ in range(rounds):  # interleaved, so drift hits every implementation alike
        for impl, (exe, state) in compiled.items():
            for _ in range(calls):
                t = time.perf_counter()
                jax.block_until_ready(exe(state, x))
                times[impl].append(time.perf_counter() - t)
    for impl, ts in times.items():
        med = statistics.median(ts)
        res[impl].update(median_s=med, img_s=batch / med, times=ts)
    if "einsum" in compiled:
        for impl in compiled:
            res[impl]["vs_einsum"] = res[impl]["img_s"] / res["einsum"]["img_s"]
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="swin_base_patch4_window7_224")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--parity-batch", type=int, default=2)
    p.add_argument("--impls", nargs="+", default=["einsum", "dpa-none", "dpa-cudnn"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--out", type=Path, help="JSON (default benchmarks/results/<backend>-attention-experiment.json)")
    args = p.parse_args()
    from bench import _info_worker

    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/attention_experiment.py " + " ".join(sys.argv[1:]),
        "model": args.model,
        **_info_worker(),
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"{jax.default_backend()}-attention-experiment.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.skip_parity:
        report["parity"] = parity(args.model, args.parity_batch)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["parity"], indent=1), flush=True)
    report["speed_bf16"] = {"batch": args.batch, **speed(args.model, args.batch, args.impls, args.rounds, args.calls)}
    out.write_text(json.dumps(report, indent=2) + "\n")
    for impl in args.impls:
        r = report["speed_bf16"].get(impl, {})
        print(f"{impl:10s} " + json.dumps({k: v for k, v in r.items() if k != "times"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
