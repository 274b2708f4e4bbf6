"""Compile for a GPU or a TPU on a machine that has neither: the step after lowering, where a kernel's layout,
register or memory problems would show.

``triton``: the Pallas kernels of a model (``attn_impl`` ``pallas`` and ``pallas_fused``), lowered for CUDA here,
compiled by the installed ``triton`` package (torch's dependency) for an NVIDIA architecture, ptxas included. Per
kernel: registers per thread, local memory (spills), shared memory. jax (0.10 and 0.11 alike) leaves each kernel's
Triton IR in the program, for XLA to compile on the GPU with its own Triton; this compiles that IR with another
Triton release, so it is strong evidence, not proof, that the GPU's compile succeeds. A jax that lowers to kernels
already compiled (``triton_kernel_call_ffi``) did this check while lowering, and the tool says so.

``tpu`` and ``cuda``: whole models (forward pass and training gradient) compiled ahead of time for a device that is
not there, described instead (``jax.experimental.topologies``): a TPU slice, or an H200 as XLA's GPU compiler sees
one. XLA:TPU with Mosaic, or XLA:GPU with its own Triton for the Pallas kernels, compile as on the device's host.
Without a GPU, XLA cannot autotune, and its Triton GEMM emitter then finds no tile sizes for the larger dots, so
``cuda`` compiles with ``--xla_gpu_enable_triton_gemm=false`` (cuBLAS for those). Per program: whether it compiles,
its Pallas (and cuDNN attention) calls, XLA's figure for its temporaries, and on CUDA its memory traffic estimated
from the compiled program (:func:`kernel_traffic`). Each needs a compiler jax does not install by default (libtpu;
jax's CUDA plugin), and installed in the dev environment, it would make every jax process probe for its device and
print errors. Give each a venv of its own, at the version jax pins:

    python benchmarks/device_compile.py triton --out triton.json
    python -m venv --system-site-packages /tmp/tpu && /tmp/tpu/bin/pip install "libtpu==0.0.42.*"
    /tmp/tpu/bin/python benchmarks/device_compile.py tpu --topology v5e:2x2 --out tpu.json
    python -m venv --system-site-packages /tmp/cuda && /tmp/cuda/bin/pip install "jax-cuda13-plugin[with-cuda]==0.10.2"
    /tmp/cuda/bin/python benchmarks/device_compile.py cuda --out cuda.json
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lowered_ops

# the custom call jax lowers a Triton kernel to (its IR, for XLA to compile), and the one of a kernel jax compiled
XLA_TRITON_CALL = "__gpu$xla.gpu.triton"
COMPILED_TRITON_CALL = "triton_kernel_call_ffi"
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


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
    from jax._src.lib import triton as triton_lib
    from jax._src.lib.mlir import ir

    module = lowered_ops.lower_forward(name, impl, "cuda", batch, dtype, **kwargs).compiler_ir("stablehlo")
    triton_lib.dialect.register_dialect(module.context)  # to read the kernels' IR
    kernels, compiled = [], 0
    for op in _custom_calls(module):
        target = ir.StringAttr(op.attributes["call_target_name"]).value
        if target == COMPILED_TRITON_CALL:
            compiled += 1
        if target != XLA_TRITON_CALL:
            continue
        config = op.attributes["mhlo.backend_config"]
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


# an sm_80/sm_90 multiprocessor: 64K registers, at most 64 warps and 32 programs (thread blocks) resident
SM_REGISTERS, SM_WARPS, SM_PROGRAMS = 65536, 64, 32


def programs_per_sm(registers: int, num_warps: int) -> int:
    """How many programs of ``num_warps`` warps at ``registers`` per thread one multiprocessor holds at once, as its
    registers (allocated per warp in units of 256: 8 per thread) and warp slots allow."""
    per_warp = -(-registers // 8) * 8 * 32
    return min(SM_PROGRAMS, SM_WARPS // num_warps, SM_REGISTERS // (per_warp * num_warps))


def triton_rows(name: str, impls, batch: int, dtypes, arch: int, tunings=("w4h1",), **kwargs) -> list[dict]:
    """One row per distinct kernel of each implementation, dtype and Triton launch (``tunings``, as
    ``kernel_tune.py`` writes them: ``w<num_warps>h<heads per program>``), compiled for ``sm_<arch>``, with the
    programs a multiprocessor holds at once; or one row saying that jax compiled the kernels while lowering."""
    from kernel_tune import parse_tuning

    from swin_jax import attention

    rows, seen = [], set()
    for spec in tunings:
        tuning = parse_tuning(spec)
        for impl in impls:
            for dtype in dtypes:
                with attention.triton_tuning(**{impl: tuning}):
                    kernels, compiled_at_lowering = triton_kernels(name, impl, batch, dtype, **kwargs)
                if compiled_at_lowering and not kernels:
                    rows.append({"impl": impl, "dtype": dtype, "compiled_at_lowering": compiled_at_lowering})
                    continue
                for kernel in kernels:
                    key = (spec, hashlib.sha1(kernel["ir"].encode()).hexdigest())
                    if key in seen:  # stages of one geometry share a kernel
                        continue
                    seen.add(key)
                    row = {"impl": impl, "dtype": dtype, "tuning": spec, "kernel": kernel["name"]}
                    row |= {"grid": kernel["grid"], "num_warps": kernel["num_warps"]}
                    row |= compile_triton(kernel, arch)
                    row["programs_per_sm"] = programs_per_sm(row["registers"], kernel["num_warps"])
                    rows.append(row)
    return rows


_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
_HLO_BYTES |= {"f64": 8, "s64": 8, "u64": 8}
_HLO_ARRAY = re.compile(r"\b(" + "|".join(_HLO_BYTES) + r")\[([\d,]*)\]")
_HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) ([\w\-]+)\((.*)$")
# instructions that launch nothing: views, tuples, parameters, constants
_HLO_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id"}


def _hlo_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _HLO_ARRAY.findall(shape):
        size = 1
        for d in dims.split(",") if dims else ():
            size *= int(d)
        total += size * _HLO_BYTES[dtype]
    return total


def kernel_traffic(hlo: str) -> dict[str, int]:
    """A compiled (optimized) XLA program's memory traffic, estimated from its text: each top-level instruction of
    the entry computation (a fusion, a library call, a Pallas kernel, a copy) reads its operands and writes its
    result once, in full. Bytes per kind (``fusion:kLoop``, ``custom-call:<target>``, ...). An estimate: no cache
    reuse, and a kernel that reads part of an operand is charged all of it."""
    entry = hlo[hlo.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    sizes: dict[str, int] = {}
    traffic: dict[str, int] = {}
    for line in entry.splitlines()[1:]:
        found = _HLO_LINE.match(line)
        if found is None:
            continue
        name, shape, opcode, rest = found.groups()
        sizes[name] = _hlo_bytes(shape)
        if opcode in _HLO_FREE:
            continue
        operands = re.findall(r"%([\w.\-]+)", rest.split("),", 1)[0])
        kind = opcode
        if opcode == "fusion":
            fusion_kind = re.search(r"kind=(k\w+)", rest)
            kind = f"fusion:{fusion_kind.group(1) if fusion_kind else '?'}"
        elif opcode == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', rest)
            kind = f"custom-call:{target.group(1) if target else '?'}"
        traffic[kind] = traffic.get(kind, 0) + sizes[name] + sum(sizes.get(o, 0) for o in operands)
    return traffic


def _check_installed(module: str, requirement: str, what: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise SystemExit(
            f"the {what} command needs {module}, which this environment lacks. Install it in a venv of its own "
            f"(installed here, every jax process would probe for the device and print its errors):\n"
            f'  python -m venv --system-site-packages /tmp/{what} && /tmp/{what}/bin/pip install "{requirement}"\n'
            f"then run this command with /tmp/{what}/bin/python (it sets JAX_PLATFORMS=cpu: the device is described, "
            "not probed)"
        )


def _jax_extra(extra: str) -> str:
    """What ``pip install jax[extra]`` installs besides jaxlib, at the versions this jax pins."""
    pins = [r.split(";")[0].replace(" ", "") for r in importlib.metadata.requires("jax") or () if f'"{extra}"' in r]
    pin = next((p for p in pins if not p.startswith("jaxlib")), extra)
    bounds = re.fullmatch(r"(.+)<=([\w.]+),>=\2", pin)  # jax pins its plugins as <=X,>=X
    return f"{bounds[1]}=={bounds[2]}" if bounds else pin


# an H200 (sm_90, 132 SMs) as XLA's GPU compiler sees one: a compile-only CUDA client needs no GPU
H200_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 shared_memory_per_block_optin: 232448 threads_per_core_limit: 2048
  core_count: 132 fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 4800000000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 150000000000 cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 24 }
runtime_version { major: 13 minor: 0 }
device_description_str: "NVIDIA H200"
"""


def compile_rows(
    platform: str, topology: str, models, impls, batch: int, dtype: str, grads: bool, scan: bool = False
) -> list[dict]:
    """Each model's forward pass (and training gradient) compiled ahead of time for one device of a TPU
    ``topology`` (``platform='tpu'``, needs libtpu) or for an H200 (``platform='cuda'``, needs jax's CUDA plugin;
    ``topology`` unused): whether it compiles, its Pallas kernels, XLA's figure for its temporaries, and the compile's
    seconds on this host (no autotuning: there is no device to time candidates on). ``scan``: each stage's repeated
    blocks as one scan (``set_scan_blocks``)."""
    if platform == "tpu":
        _check_installed("libtpu", _jax_extra("tpu"), "tpu")
    else:
        _check_installed("jax_plugins.xla_cuda13", _jax_extra("cuda13"), "cuda")
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental import topologies

    from swin_jax import attention
    from swin_jax.train import cross_entropy, reverse_mode

    if platform == "tpu":
        device = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices[0]
    else:
        device = topologies.get_topology_desc(platform="cuda", target_config=H200_TARGET, topology="1x1x1").devices[0]
    on_device = jax.sharding.SingleDeviceSharding(device)
    kernel_call = "tpu_custom_call" if platform == "tpu" else XLA_TRITON_CALL

    def spec(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_device), tree)

    rows = []
    for name in models:
        for impl in impls:
            model = lowered_ops.abstract_model(name, impl, dtype)
            model.set_scan_blocks(scan)
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            x = jax.ShapeDtypeStruct((batch, *model.img_size, model.in_chans), jnp.float32, sharding=on_device)
            y = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=on_device)

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
                row = {"model": name, "impl": impl, "dtype": dtype, "program": what, "scan_blocks": scan}
                try:
                    with attention.lowering_for(platform):
                        lowered = jax.jit(fn).lower(spec(params), spec(rest), *data)
                    text = lowered.as_text()
                    row[f"{'mosaic' if platform == 'tpu' else 'triton'}_kernels"] = text.count(kernel_call)
                    if platform == "cuda":
                        row["cudnn_attention_calls"] = text.count("__cudnn$fmha")
                    compiling = time.perf_counter()
                    compiled = lowered.compile()
                    row["compile_s"] = round(time.perf_counter() - compiling, 1)
                    row["temp_gib"] = round(compiled.memory_analysis().temp_size_in_bytes / 2**30, 3)
                    if not scan:  # kernel_traffic reads ENTRY's kernels: a scan's loop body is not counted
                        traffic = kernel_traffic(compiled.as_text())
                        row["traffic_gib"] = round(sum(traffic.values()) / 2**30, 2)
                        row["traffic_gib_by_kind"] = {k: round(v / 2**30, 2) for k, v in sorted(traffic.items())}
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
    tri.add_argument("--tunings", nargs="+", default=["w4h1"], help="Triton launches (kernel_tune.py), e.g. w2h2")
    tpu = sub.add_parser("tpu", help="compile whole models ahead of time for a TPU topology (needs libtpu)")
    tpu.add_argument("--topology", default="v5e:2x2", help="e.g. v5e:2x2, v6e:2x2, v5p:2x2x1, v4:2x2x1")
    cuda = sub.add_parser("cuda", help="compile whole models ahead of time for an H200 (needs jax's CUDA plugin)")
    for p, impls, batch in ((tpu, ["einsum", "pallas"], 32), (cuda, ["einsum", "xla", "pallas", "pallas_fused"], 256)):
        p.add_argument("--models", nargs="+", default=["swin_base_patch4_window7_224", "swinv2_base_window8_256"])
        p.add_argument("--attn-impls", nargs="+", default=impls)
        p.add_argument("--batch", type=int, default=batch)
        p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
        p.add_argument("--no-grads", action="store_true", help="forward passes only")
        p.add_argument("--scan-blocks", action="store_true", help="each stage's repeated blocks as one scan")
    for p in (tri, tpu, cuda):
        p.add_argument("--out", help="write the rows as JSON here too")
    args = parser.parse_args(argv)
    if args.command != "triton":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the device is described, not probed
    if args.command == "cuda":
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_enable_triton_gemm=false".strip()

    import jax
    import jaxlib

    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    if args.command == "triton":
        import triton

        versions["triton"] = triton.__version__
        settings = {k: getattr(args, k) for k in ("model", "batch", "dtypes", "arch", "tunings")}
        rows = triton_rows(args.model, ("pallas", "pallas_fused"), args.batch, args.dtypes, args.arch, args.tunings)
        for row in rows:
            print(json.dumps(row))
    else:
        plugin = "libtpu" if args.command == "tpu" else "jax-cuda13-plugin"
        try:
            versions[plugin] = importlib.metadata.version(plugin)
        except importlib.metadata.PackageNotFoundError:
            versions[plugin] = None
        keys = ("topology",) * (args.command == "tpu") + ("models", "attn_impls", "batch", "dtype", "scan_blocks")
        settings = {**{k: getattr(args, k) for k in keys}, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
        topology = getattr(args, "topology", "")
        rows = compile_rows(
            args.command,
            topology,
            args.models,
            args.attn_impls,
            args.batch,
            args.dtype,
            not args.no_grads,
            args.scan_blocks,
        )
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
