"""What each attention implementation leaves to XLA: the data-movement ops of the forward program as lowered for a
platform (StableHLO, before XLA's own optimization), counted with the bytes of their results.

The window plumbing (roll = slices + concatenate, pad, partition and merge = transposes, q/k/v split = slices) is
what ``attn_impl='pallas_fused'`` moves into its kernel. XLA fuses some of these ops into their neighbours, so the
bytes are an upper bound on what the compiled program moves, not a measurement of it; lowering needs no device
(a GPU or TPU program can be counted on the CPU), compiling does.

    python benchmarks/lowered_ops.py --platform cuda --batch 256 --dtype bf16 --out ops.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import re
import sys

OPS = ("transpose", "slice", "concatenate", "pad", "gather", "dot_general", "custom_call")
_OP = re.compile(r"stablehlo\.(" + "|".join(OPS) + r")\b")
_RESULT = re.compile(r"-> tensor<((?:\d+x)*)(bf16|f16|f32|f64|i32|i64|i1)>")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "i32": 4, "i64": 8, "i1": 1}


def count_ops(text: str) -> dict[str, dict[str, float]]:
    """``{op: {"count": n, "gib": result bytes / 2**30}}`` over the ops of :data:`OPS` in a StableHLO module."""
    count, nbytes = collections.Counter(), collections.Counter()
    for line in text.splitlines():
        op = _OP.search(line)
        if op is None:
            continue
        count[op.group(1)] += 1
        result = _RESULT.findall(line)
        if result:
            dims, dtype = result[-1]
            size = 1
            for d in dims.rstrip("x").split("x") if dims else ():
                size *= int(d)
            nbytes[op.group(1)] += size * _BYTES[dtype]
    return {op: {"count": count[op], "gib": round(nbytes[op] / 2**30, 3)} for op in sorted(count)}


def abstract_model(model_name: str, impl: str, dtype: str, **kwargs):
    """``model_name`` with ``attn_impl=impl`` and ``dtype`` compute (``'fp32'``, ``'bf16'``), shapes only (no weights
    are drawn)."""
    import jax.numpy as jnp
    from flax import nnx

    import swin_jax

    compute = {"fp32": None, "bf16": jnp.bfloat16}[dtype]
    return nnx.eval_shape(lambda: swin_jax.create_model(model_name, attn_impl=impl, dtype=compute, **kwargs))


def lower_forward(model_name: str, impl: str, platform: str, batch: int, dtype: str, **kwargs):
    """``model_name``'s forward pass with ``attn_impl=impl``, lowered for ``platform`` (a ``jax.stages.Lowered``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from swin_jax import attention

    model = abstract_model(model_name, impl, dtype, **kwargs)
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((batch, *model.img_size, model.in_chans), jnp.float32)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    with attention.lowering_for(platform):
        return jax.jit(forward).trace(state, x).lower(lowering_platforms=(platform,))


def lowered_forward(model_name: str, impl: str, platform: str, batch: int, dtype: str, **kwargs) -> str:
    """The StableHLO text of ``model_name``'s forward pass with ``attn_impl=impl``, lowered for ``platform``."""
    return lower_forward(model_name, impl, platform, batch, dtype, **kwargs).as_text()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="swin_base_patch4_window7_224")
    parser.add_argument("--platform", default="cuda", choices=["cpu", "cuda", "tpu"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--attn-impls", nargs="+", default=["einsum", "xla", "pallas", "pallas_fused"])
    parser.add_argument("--out", help="write the counts as JSON here too")
    args = parser.parse_args(argv)
    import jax
    import jaxlib

    result = {
        "settings": {k: getattr(args, k) for k in ("model", "platform", "batch", "dtype")},
        "command": " ".join(["python", "benchmarks/lowered_ops.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__},
        "ops": {
            impl: count_ops(lowered_forward(args.model, impl, args.platform, args.batch, args.dtype))
            for impl in args.attn_impls
        },
    }
    for impl, ops in result["ops"].items():
        print(impl, " ".join(f"{op}={v['count']}/{v['gib']}GiB" for op, v in ops.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
