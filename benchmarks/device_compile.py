"""Compile for a GPU or a TPU on a machine that has neither: the step after lowering, where a kernel's layout,
register or memory problems would show.

``triton``: the Pallas kernels of a model (``attn_impl`` ``pallas`` and ``pallas_fused``), lowered for CUDA here,
compiled by the installed ``triton`` package (torch's dependency) for an NVIDIA architecture, ptxas included. Per
kernel: registers per thread, local memory (spills), shared memory. jax (0.10 and 0.11 alike) leaves each kernel's
Triton IR in the program, for XLA to compile on the GPU with its own Triton; this compiles that IR with another
Triton release, so it is strong evidence, not proof, that the GPU's compile succeeds. A jax that lowers to kernels
already compiled (``triton_kernel_call_ffi``) did this check while lowering, and the tool says so.

``tpu``: whole models compiled ahead of time for a TPU topology (``jax.experimental.topologies``): XLA:TPU and, for
``attn_impl='pallas'``, Mosaic compile as on a TPU host. It needs libtpu, which is not a dependency (installed, it
makes every jax process print its TPU probe's errors). Give it a venv of its own, at the version jax pins:

    python benchmarks/device_compile.py triton --out triton.json
    python -m venv --system-site-packages /tmp/tpu && /tmp/tpu/bin/pip install "libtpu==0.0.42.*"
    JAX_PLATFORMS=cpu /tmp/tpu/bin/python benchmarks/device_compile.py tpu --topology v5e:2x2 --out tpu.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the custom call jax lowers a Triton kernel to (its IR, for XLA to compile), and the one of a kernel jax compiled
XLA_TRITON_CALL = "__gpu$xla.gpu.triton"
COMPILED_TRITON_CALL = "triton_kernel_call_ffi"
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _model(name: str, impl: str, dtype: str, **kwargs):
    import jax.numpy as jnp
    from flax import nnx

    import swin_jax

    compute = {"fp32": None, "bf16": jnp.bfloat16}[dtype]
    return nnx.eval_shape(lambda: swin_jax.create_model(name, attn_impl=impl, dtype=compute, **kwargs))


def _custom_calls(module) -> list:
    """The ``stablehlo.custom_call`` operations of an MLIR module, nested ones included."""
    found = []

    def walk(op) -> None:
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call":
                        found.append(child.operation)
                    walk(child.operation)

    walk(module.operation)
    return found


def triton_kernels(name: str, impl: str, batch: int, dtype: str, **kwargs) -> tuple[list[dict], int]:
    """The Triton kernels of ``name``'s forward pass lowered for CUDA: ``[{"name", "ir" (text), "num_warps",
    "num_stages", "grid"}]`` as jax leaves them for XLA; and how many kernels jax compiled while lowering."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax._src.lib import triton as triton_lib
    from jax._src.lib.mlir import ir

    from swin_jax import attention

    model = _model(name, impl, dtype, **kwargs)
    graphdef, state = nnx.split(model)
    x = jax.ShapeDtypeStruct((batch, *model.img_size, model.in_chans), jnp.float32)
    with attention.lowering_for("cuda"):
        lowered = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).trace(state, x).lower(lowering_platforms=("cuda",))
    module = lowered.compiler_ir("stablehlo")
    kernels, compiled = [], 0
    for op in _custom_calls(module):
        target = ir.StringAttr(op.attributes["call_target_name"]).value
        if target == COMPILED_TRITON_CALL:
            compiled += 1
        if target != XLA_TRITON_CALL:
            continue
        config = op.attributes["mhlo.backend_config"]
        triton_lib.dialect.register_dialect(module.context)
        text = str(ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes, context=module.context))
        kernels.append(
            {
                "name": ir.StringAttr(config["name"]).value,
                "ir": text,
                "num_warps": ir.IntegerAttr(config["num_warps"]).value,
                "num_stages": ir.IntegerAttr(config["num_stages"]).value,
                "grid": [ir.IntegerAttr(config[f"grid_{a}"]).value for a in "xyz"],
            }
        )
    return kernels, compiled


def compile_triton(kernel: dict, arch: int) -> dict:
    """Compile one kernel's Triton IR for ``sm_<arch>`` with the installed ``triton`` (no GPU needed): its
    registers per thread, stack, shared and local (spilled) memory in bytes, as the cubin records them."""
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp, "kernel.ttir")
        source.write_text(kernel["ir"])
        options = {"num_warps": kernel["num_warps"], "num_stages": kernel["num_stages"]}
        compiled = triton.compile(str(source), target=GPUTarget("cuda", arch, 32), options=options)
        cubin = Path(tmp, "kernel.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    found = _RESOURCES.search(usage)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {kernel['name']}:\n{usage}")
    regs, stack, shared, local = map(int, found.groups())
    shared_needed = compiled.metadata.shared  # Triton's dynamic shared memory; the cubin's SHARED is the static part
    return {"registers": regs, "stack": stack, "shared": shared, "local": local, "triton_shared": shared_needed}


def triton_rows(name: str, impls, batch: int, dtypes, arch: int, **kwargs) -> list[dict]:
    """One row per distinct kernel of each implementation and dtype, compiled for ``sm_<arch>``; or one row saying
    that jax compiled the kernels while lowering."""
    import hashlib

    rows, seen = [], set()
    for impl in impls:
        for dtype in dtypes:
            kernels, compiled_at_lowering = triton_kernels(name, impl, batch, dtype, **kwargs)
            if compiled_at_lowering and not kernels:
                rows.append({"impl": impl, "dtype": dtype, "compiled_at_lowering": compiled_at_lowering})
                continue
            for kernel in kernels:
                key = hashlib.sha1(kernel["ir"].encode()).hexdigest()
                if key in seen:  # stages of one geometry share a kernel
                    continue
                seen.add(key)
                row = {"impl": impl, "dtype": dtype, "kernel": kernel["name"], "grid": kernel["grid"]}
                rows.append({**row, **compile_triton(kernel, arch)})
    return rows


def _libtpu_requirement() -> str:
    pins = [r.split(";")[0] for r in importlib.metadata.requires("jax") or () if r.startswith("libtpu")]
    return pins[0].replace(" ", "") if pins else "libtpu"


def tpu_rows(topology: str, models, impls, batch: int, dtype: str, grads: bool) -> list[dict]:
    """Each model's forward pass (and gradient) compiled ahead of time for one chip of ``topology``."""
    if importlib.util.find_spec("libtpu") is None:
        raise SystemExit(
            f"the tpu command needs libtpu, which this environment lacks. Install it in a venv of its own (installed "
            f"here, every jax process would print its TPU probe's errors):\n  python -m venv --system-site-packages "
            f'/tmp/tpu && /tmp/tpu/bin/pip install "{_libtpu_requirement()}"\nthen run this command with '
            f"JAX_PLATFORMS=cpu /tmp/tpu/bin/python"
        )
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental import topologies

    from swin_jax import attention
    from swin_jax.train import cross_entropy, reverse_mode

    chip = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
    on_chip = jax.sharding.SingleDeviceSharding(chip)

    def spec(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_chip), tree)

    rows = []
    for name in models:
        for impl in impls:
            model = _model(name, impl, dtype)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            x = jax.ShapeDtypeStruct((batch, *model.img_size, model.in_chans), jnp.float32, sharding=on_chip)
            y = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=on_chip)

            def forward(p, r, x, graphdef=graphdef):
                return nnx.merge(graphdef, p, r)(x)

            def gradient(p, r, x, y, graphdef=graphdef, classes=model.num_classes):
                def loss(p):
                    with reverse_mode():
                        return cross_entropy(nnx.merge(graphdef, p, r)(x), y, num_classes=classes)

                return jax.grad(loss)(p)

            programs = [("forward", forward, (x,))] + ([("gradient", gradient, (x, y))] if grads else [])
            for what, fn, data in programs:
                start = time.perf_counter()
                row = {"model": name, "impl": impl, "dtype": dtype, "program": what}
                try:
                    with attention.lowering_for("tpu"):
                        lowered = jax.jit(fn).lower(spec(params), spec(rest), *data)
                    row["mosaic_kernels"] = lowered.as_text().count("tpu_custom_call")
                    compiled = lowered.compile()
                    row["temp_gib"] = round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3)
                    row["compiled"] = True
                except Exception as e:  # noqa: BLE001 -- recorded: the point is to see what fails
                    row["compiled"], row["error"] = False, f"{type(e).__name__}: {str(e)[:2000]}"
                row["seconds"] = round(time.perf_counter() - start, 1)
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tri = sub.add_parser("triton", help="compile the Pallas kernels' Triton IR for an NVIDIA architecture")
    tri.add_argument("--model", default="swin_base_patch4_window7_224")
    tri.add_argument("--batch", type=int, default=256)
    tri.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16"])
    tri.add_argument("--arch", type=int, default=90, help="sm_<arch>: 90 H100/H200, 80 A100")
    tpu = sub.add_parser("tpu", help="compile whole models ahead of time for a TPU topology (needs libtpu)")
    tpu.add_argument("--topology", default="v5e:2x2", help="e.g. v5e:2x2, v6e:2x2, v5p:2x2x1, v4:2x2x1")
    tpu.add_argument("--models", nargs="+", default=["swin_base_patch4_window7_224", "swinv2_base_window8_256"])
    tpu.add_argument("--attn-impls", nargs="+", default=["einsum", "pallas"])
    tpu.add_argument("--batch", type=int, default=32)
    tpu.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    tpu.add_argument("--no-grads", action="store_true", help="forward passes only")
    for p in (tri, tpu):
        p.add_argument("--out", help="write the rows as JSON here too")
    args = parser.parse_args(argv)

    import jax
    import jaxlib

    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    if args.command == "triton":
        import triton

        versions["triton"] = triton.__version__
        settings = {k: getattr(args, k) for k in ("model", "batch", "dtypes", "arch")}
        rows = triton_rows(args.model, ("pallas", "pallas_fused"), args.batch, args.dtypes, args.arch)
        for row in rows:
            print(json.dumps(row))
    else:
        versions["libtpu"] = importlib.metadata.version("libtpu") if importlib.util.find_spec("libtpu") else None
        settings = {k: getattr(args, k) for k in ("topology", "models", "attn_impls", "batch", "dtype")}
        rows = tpu_rows(args.topology, args.models, args.attn_impls, args.batch, args.dtype, not args.no_grads)
    result = {
        "command": " ".join(["python", "benchmarks/device_compile.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.date.today().isoformat(),
        "versions": versions,
        "settings": settings,
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
