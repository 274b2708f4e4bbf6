"""Time one block's attention per attention implementation and, for the Pallas kernels, per Triton launch, at each
block geometry of a model: which launch each kernel should get (``swin_jax.attention.TRITON_TUNING``) and which
implementation ``'auto'`` should pick (``AUTO_PICKS``), before a whole-model run (bench.py) confirms it.

What is timed is a block's attention sublayer on its map, ``[B, H, W, C]`` -> ``[B, H, W, C]``: the qkv projection,
shift, padding, partition, attention with bias and mask, merge and the output projection (``WindowBlock._attn``), in
one jitted call. Each distinct block (stage, shifted or not) is timed once; a model's estimate weights it by how many
blocks are like it. Every variant's output is compared with the einsum path's on the same input (``rel_err``): a
fast launch that computes something else shows.

A Triton launch is written ``w<num_warps>h<heads per program>``, e.g. ``w4h1`` (today's), ``w2h2``. On a GPU (step 5 of
``gpu_check.sh``; ~2-3 minutes for Swin-B at batch 256)::

    PYTHONPATH=. python benchmarks/kernel_tune.py --out /tmp/gpu/tune.json

A launch it picks is then confirmed on the whole model against timm, side by side, by a bench.py row that names it:
``python benchmarks/bench.py --batches 256 --train-batch 0 --variants jax-bf16@pallas_fused:w4h2 timm-compile-bf16``.

A CPU dry run (the Pallas kernels interpreted: it checks the tool and every launch's function, it measures nothing
of interest)::

    python benchmarks/kernel_tune.py --model swin_tiny_patch4_window7_224 --batch 1 --repeats 1 --out /tmp/tune.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

TUNINGS = ["w4h1", "w2h1", "w8h1", "w4h2", "w2h2", "w4h4"]
IMPLS = ["einsum", "xla", "cudnn", "pallas", "pallas_fused"]
_TUNING = re.compile(r"w(\d+)h(\d+)")


def parse_tuning(spec: str):
    """``'w4h2'`` -> ``TritonTuning(num_warps=4, heads_per_step=2)``."""
    from swin_jax.attention import TritonTuning

    found = _TUNING.fullmatch(spec)
    if found is None or min(map(int, found.groups())) < 1:
        raise ValueError(f"a Triton launch is w<num_warps>h<heads per program>, e.g. w4h1; got {spec!r}")
    return TritonTuning(num_warps=int(found[1]), heads_per_step=int(found[2]))


def distinct_blocks(model) -> list[tuple[object, int]]:
    """The model's window blocks, one per distinct attention geometry (map size, channels, heads, window, shift), each
    with how many of the model's blocks are like it; the most frequent first (a run cut short has timed those)."""
    from flax import nnx

    from swin_jax.models._layers import WindowBlock

    found: dict[tuple, list] = {}
    for _, module in nnx.iter_graph(model):
        if isinstance(module, WindowBlock):
            key = (
                module.input_resolution,
                module.norm1.num_features,
                module.attn.num_heads,
                module.window_size,
                module.shift_size,
            )
            found.setdefault(key, [module, 0])[1] += 1
    return sorted(((block, count) for block, count in found.values()), key=lambda pair: -pair[1])


def _rel_err(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tune_rows(model, batch: int, impls, tunings, repeats: int, warmup: int = 2, on_row=None) -> list[dict]:
    """One row per distinct block and variant (an implementation, with a Triton launch for the Pallas kernels):
    median milliseconds per call, compile seconds, and the output's relative deviation from the einsum path's."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from swin_jax import attention

    dtype = model.dtype or jnp.float32
    rows = []
    for index, (block, count) in enumerate(distinct_blocks(model)):
        (h, w), c = block.input_resolution, block.norm1.num_features
        x = jnp.asarray(np.random.default_rng(index).standard_normal((batch, h, w, c)), dtype)
        geometry = {
            "block": index,
            "count": count,
            "size": [h, w],
            "channels": c,
            "heads": block.attn.num_heads,
            "window": list(block.window_size),
            "shift": list(block.shift_size),
        }
        reference, own_impl = None, block.attn.attn_impl
        for impl in impls:
            for spec in tunings if impl in attention.TRITON_TUNING else [None]:
                variant = impl if spec is None else f"{impl}:{spec}"
                row = {"variant": variant, "impl": impl, "tuning": spec, **geometry}
                block.attn.attn_impl = impl
                graphdef, state = nnx.split(block)
                tuning = {} if spec is None else {impl: parse_tuning(spec)}
                try:
                    with attention.triton_tuning(**tuning):  # read while tracing: a fresh function each time

                        def attend(state, x, graphdef=graphdef):
                            return nnx.merge(graphdef, state)._attn(x)

                        start = time.perf_counter()
                        compiled = jax.jit(attend).lower(state, x).compile()
                        row["compile_s"] = round(time.perf_counter() - start, 3)
                    out = compiled(state, x)
                    out.block_until_ready()
                    for _ in range(warmup):
                        compiled(state, x).block_until_ready()
                    times = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        compiled(state, x).block_until_ready()
                        times.append(time.perf_counter() - start)
                    row["ms"] = round(1e3 * statistics.median(times), 4)
                    if impl == "einsum":
                        reference = np.asarray(out, np.float32)
                    if reference is not None:
                        row["rel_err_vs_einsum"] = _rel_err(out, reference)
                except Exception as e:  # noqa: BLE001 -- a launch that does not compile is a result, not the end
                    row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
                rows.append(row)
                if on_row is not None:
                    on_row(row)
        block.attn.attn_impl = own_impl
    return rows


def summarize(rows: list[dict], batch: int) -> list[dict]:
    """Per variant: the model's attention sublayers, each distinct block weighted by its count (milliseconds per
    forward pass and microseconds per image), fastest first; variants with a failed block are left out."""
    totals: dict[str, float] = {}
    failed = {row["variant"] for row in rows if "error" in row}
    for row in rows:
        if row["variant"] not in failed:
            totals[row["variant"]] = totals.get(row["variant"], 0.0) + row["ms"] * row["count"]
    worst = {}
    for row in rows:
        if "rel_err_vs_einsum" in row:
            worst[row["variant"]] = max(worst.get(row["variant"], 0.0), row["rel_err_vs_einsum"])
    out = [
        {
            "variant": v,
            "model_ms": round(ms, 3),
            "us_per_image": round(1e3 * ms / batch, 3),
            "max_rel_err": worst.get(v),
        }
        for v, ms in totals.items()
    ]
    return sorted(out, key=lambda r: r["model_ms"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swin_base_patch4_window7_224")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--impls", nargs="+", default=IMPLS)
    parser.add_argument("--tunings", nargs="+", default=TUNINGS, help="Triton launches, e.g. w4h1 w2h2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="write the results as JSON here, after each row")
    args = parser.parse_args(argv)
    for spec in args.tunings:
        parse_tuning(spec)  # refuse a malformed launch before anything is compiled

    import flax
    import jax
    import jax.numpy as jnp

    import swin_jax
    from swin_jax import attention

    unknown = sorted(set(args.impls) - set(attention.IMPLS))
    if unknown:
        parser.error(f"unknown --impls {', '.join(unknown)}; expected some of {', '.join(attention.IMPLS)}")
    bf16 = args.dtype == "bf16"
    dtype = jnp.bfloat16 if bf16 else None
    model = swin_jax.create_model(args.model, dtype=dtype, param_dtype=jnp.bfloat16 if bf16 else jnp.float32)
    device = jax.devices()[0]
    result = {
        "command": " ".join(["python", "benchmarks/kernel_tune.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": {"platform": device.platform, "kind": device.device_kind},
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
        "settings": {k: getattr(args, k) for k in ("model", "batch", "dtype", "impls", "tunings", "repeats")},
        "rows": [],
    }

    def write(row: dict) -> None:
        result["rows"].append(row)
        result["summary"] = summarize(result["rows"], args.batch)
        print(json.dumps(row), flush=True)
        if args.out:
            path = Path(args.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            tmp.replace(path)

    tune_rows(model, args.batch, args.impls, args.tunings, args.repeats, on_row=write)
    for row in result.get("summary", []):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
