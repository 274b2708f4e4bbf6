"""swin-jax vs timm, side by side in one run on one machine.

    python benchmarks/bench.py                       # CPU: batches 1 and 8; GPU: 1, 64, 256
    python benchmarks/bench.py --batches 1 8 --train-batch 8 --out benchmarks/results/cpu.json
    python benchmarks/bench.py --merge part1.json part2.json --out benchmarks/results/gpu.json

Each variant runs in its own subprocess (same machine, one after the other), so every figure has its
own peak memory and no variant warms another's caches. Inference variants: swin-jax fp32 and bf16
(``compile_forward``, the documented fast path), timm eager fp32 and ``torch.compile`` fp32, and on
GPU timm bf16 autocast (eager and compiled). Training step (forward + backward + AdamW, drop path off)
for swin-jax (through ``swin_jax.train.TrainStep``, the fast path finetune uses) and timm. On GPU, a
bf16 matmul is timed in the same run to give the fraction of the measured matmul peak that the model
reaches.

fp32 matmul precision on GPU, as each framework does it by default: jax's "default" precision lets
XLA use TF32 on the tensor cores; torch computes fp32 matmuls in full fp32 (its cuDNN convolutions
may use TF32). Like-for-like variants (GPU only, run on request with ``--variants``):
``jax-fp32-highest`` (``jax_default_matmul_precision='highest'``) against timm's default fp32, and
``timm-eager-fp32-tf32`` / ``timm-compile-fp32-tf32`` (``torch.set_float32_matmul_precision('high')``)
against swin-jax's default fp32. Each row records the settings it ran with.

Timing: warm-up calls, then the median of at least ``--repeats`` timed calls (and at least
``--min-time`` seconds of them), each ended by ``block_until_ready`` / ``torch.cuda.synchronize``.
Compile time: jax's lower+compile (inference), the first call (training, both frameworks: trace, compile and
one step; ``compile_less_step_s`` in the JSON takes the median step off it), torch.compile's first call. Peak
memory: device peak on GPU, the worker process' peak RSS on CPU.

Drift: this project's CPU machines change speed by 10-25% over minutes, enough to move a ratio taken from two
rows run one after the other. ``--rounds N`` runs the whole list N times, every other round in reverse order;
each round's ratios pair rows of that round, and the summary gives each ratio's median and range over rounds.

Huge pages (CPU, Linux): a ``-thp`` row (named in ``--variants``) runs its worker with its framework's switch for
transparent huge pages: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` for swin-jax, ``THP_MEM_ALLOC_ENABLE=1`` for
torch. swin-jax's ``-thp`` rows are compared with timm's default rows (``vs_timm_eager``) and with timm's own
``-thp`` rows (``vs_timm_eager_thp``).

Steps per call: a ``-k8`` training row (named in ``--variants``) runs 8 steps per call with ``TrainStep.run`` (as
``finetune --steps-per-call 8`` does); its times are per step, and its ``compile_s`` is the first call less 7 steps.

The JSON is rewritten after every row, so a run that is stopped keeps the rows it finished. A long
GPU run can be split (``--variants``, ``--batches``, ``--train-batch``, ``--out``) and the parts joined
with ``--merge``, which recomputes the ratios only between rows measured on the same device (same GPU
UUID, or same host for CPU) and lists the parts in the result.
Run from the repository root (the project on ``PYTHONPATH``, as ``python benchmarks/bench.py`` does).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INFER = ["jax-fp32", "jax-bf16", "timm-eager-fp32", "timm-compile-fp32"]
INFER_GPU = ["timm-eager-bf16", "timm-compile-bf16", "timm-compile-bf16-fused"]
# like-for-like fp32 precision (GPU only): run when named in --variants
INFER_GPU_EXTRA = ["jax-fp32-highest", "timm-eager-fp32-tf32", "timm-compile-fp32-tf32"]
# timm's experimental fused attention (TIMM_FUSED_ATTN=2: F.scaled_dot_product_attention with the bias as
# mask) on the CPU: run when named in --variants
FUSED_EXTRA = ["timm-eager-fp32-fused", "timm-train-eager-fp32-fused"]
# swin-jax with the per-block backward cut forced on (SWIN_JAX_BACKWARD_CUT=always; by default it applies on
# the CPU only): an A/B on a GPU, run when named in --variants
CUT_EXTRA = ["jax-train-bf16-cut", "jax-train-fp32-cut"]
# swin-jax with each stage's repeated blocks as one lax.scan (model.set_scan_blocks(True)): fewer kernels to
# compile; run when named in --variants
SCAN_EXTRA = ["jax-fp32-scan", "jax-bf16-scan", "jax-train-fp32-scan", "jax-train-bf16-scan"]
# transparent huge pages for the process' large allocations (CPU, Linux with glibc >= 2.35), each framework by its
# own switch: swin-jax rows run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (XLA:CPU allocates a step's temporaries,
# ~2 GB for Swin-B training, as one block per call, fresh pages each time), timm rows with torch's
# THP_MEM_ALLOC_ENABLE=1. Run when named in --variants
THP_EXTRA = ["jax-fp32-thp", "jax-train-fp32-thp", "timm-eager-fp32-thp", "timm-train-eager-fp32-thp"]
THP_ENV = {"jax": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "timm": {"THP_MEM_ALLOC_ENABLE": "1"}}
# swin-jax training with 8 steps per call (TrainStep.run: one compiled step run 8 times by a lax.scan, so a call's
# temporaries are allocated once for 8 steps); times are per step. Run when named in --variants
STEPS_EXTRA = ["jax-train-fp32-k8", "jax-train-bf16-k8", "jax-train-fp32-k8-thp"]
# swin-jax with an explicit attention implementation (create_model(attn_impl=...); the plain rows run 'auto'):
# VARIANT@IMPL, run when named in --variants
ATTN_EXTRA = [
    f"jax-{kind}{dtype}@{impl}"
    for kind in ("", "train-")
    for dtype in ("fp32", "bf16")
    for impl in ("einsum", "xla", "cudnn", "pallas", "pallas_fused")
]
TRAIN = ["jax-train-fp32", "timm-train-eager-fp32"]
TRAIN_GPU = [
    "jax-train-bf16",
    "timm-train-eager-bf16",
    "timm-train-compile-fp32",
    "timm-train-compile-bf16",
    "timm-train-compile-bf16-fused",
]
TIMM_FLOPS_PER_IMAGE = {"swin_base_patch4_window7_224": 30.9e9}  # timm's model card (2 x 15.4 GMACs)
TRAIN_FLOPS_FACTOR = 3.0  # forward + backward ~ 3x the forward's FLOPs (the usual estimate, not counted)
# swin-jax variant -> ratio key -> timm variant it is compared with (same kind and batch)
REFS = {
    "jax-fp32": {
        "vs_timm_eager": "timm-eager-fp32",
        "vs_timm_compile": "timm-compile-fp32",
        "vs_timm_eager_tf32": "timm-eager-fp32-tf32",
        "vs_timm_compile_tf32": "timm-compile-fp32-tf32",
        "vs_timm_eager_fused": "timm-eager-fp32-fused",
    },
    "jax-fp32-highest": {"vs_timm_eager": "timm-eager-fp32", "vs_timm_compile": "timm-compile-fp32"},
    "jax-bf16": {
        "vs_timm_eager": "timm-eager-bf16",
        "vs_timm_compile": "timm-compile-bf16",
        "vs_timm_compile_fused": "timm-compile-bf16-fused",
    },
    "jax-train-fp32": {
        "vs_timm_eager": "timm-train-eager-fp32",
        "vs_timm_compile": "timm-train-compile-fp32",
        "vs_timm_eager_fused": "timm-train-eager-fp32-fused",
    },
    "jax-train-bf16": {
        "vs_timm_eager": "timm-train-eager-bf16",
        "vs_timm_compile": "timm-train-compile-bf16",
        "vs_timm_compile_fused": "timm-train-compile-bf16-fused",
    },
}
REFS["jax-train-bf16-cut"] = REFS["jax-train-bf16"]
REFS["jax-train-fp32-cut"] = REFS["jax-train-fp32"]
for _scanned in SCAN_EXTRA:
    REFS[_scanned] = REFS[_scanned.removesuffix("-scan")]
for _multi in [v for v in STEPS_EXTRA if not v.endswith("-thp")]:
    REFS[_multi] = REFS[_multi.removesuffix("-k8")]
# against timm's default rows, and timm with its own THP switch
for _thp in ("jax-fp32-thp", "jax-train-fp32-thp", "jax-train-fp32-k8-thp"):
    _base = _thp.removesuffix("-thp")
    _eager = REFS[_base]["vs_timm_eager"]
    REFS[_thp] = {"vs_timm_eager": _eager, "vs_timm_eager_thp": _eager + "-thp"}


# ----------------------------------------------------------------------------------------------------------
# workers (one variant, one batch size, in a fresh process)
# ----------------------------------------------------------------------------------------------------------


def _time_calls(fn, sync, warmup: int, repeats: int, min_time: float = 0.0, max_calls: int = 200) -> list[float]:
    """Warm up, then time calls: at least ``repeats`` of them and at least ``min_time`` seconds in all."""
    for _ in range(warmup):
        sync(fn())
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < max_calls):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return times


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_busy(trace_dir: str | Path) -> dict | None:
    """From a ``jax.profiler`` trace (``create_perfetto_trace=True``): how much of the traced span the
    accelerator was busy. Busy = the union of the kernel intervals on every device track; span = first
    kernel start to last kernel end. ``None`` when the trace has no device tracks (CPU).

    A step whose device is busy for most of its span is device-bound; large idle gaps mean the host
    (dispatch, Python) or the input feeding bounds it.
    """
    import gzip

    files = sorted(Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        return None
    data = json.loads(gzip.open(files[-1]).read())
    events = data["traceEvents"] if isinstance(data, dict) else data
    device_pids = {
        e["pid"]
        for e in events
        if e.get("ph") == "M"
        and e.get("name") == "process_name"
        and any(k in str(e.get("args", {}).get("name", "")) for k in ("/device:GPU", "/device:TPU"))
    }
    spans = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in events
        if e.get("ph") == "X" and e.get("pid") in device_pids and float(e.get("dur", 0)) > 0
    )
    if not spans:
        return None
    busy, cur_start, cur_end = 0.0, *spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = spans[-1][1] - spans[0][0]
    return {"busy_ms": busy / 1e3, "span_ms": span / 1e3, "busy_fraction": busy / span if span else None}


def _profile(call, sync, calls: int = 3) -> dict | None:
    """Trace ``calls`` calls (already compiled) and summarize the device's busy time (:func:`device_busy`)."""
    import tempfile

    import jax

    with tempfile.TemporaryDirectory() as tmp:
        sync(call())
        t = time.perf_counter()
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                out = call()
            sync(out)
        wall = time.perf_counter() - t
        busy = device_busy(tmp)
    return {"calls": calls, "wall_ms_per_call": wall / calls * 1e3, **({} if busy is None else busy)}


def triton_launch(variant: str) -> tuple[str, str | None]:
    """A Pallas row may name the kernel's Triton launch (``kernel_tune.py``'s ``w<warps>h<heads per program>``):
    ``'jax-bf16@pallas_fused:w4h2'`` -> ``('jax-bf16@pallas_fused', 'w4h2')``; any other name -> ``(name, None)``."""
    base, _, spec = variant.partition(":")
    return base, spec or None


def unknown_variants(variants, known) -> list[str]:
    """The names among ``variants`` that are no row of ``known``, or that name a launch (:func:`triton_launch`) on
    a row that runs no Pallas kernel or in no valid form."""
    from kernel_tune import parse_tuning

    from swin_jax.attention import TRITON_TUNING

    unknown = []
    for variant in variants:
        base, spec = triton_launch(variant)
        if base not in known:
            unknown.append(variant)
        elif spec is not None:
            try:
                parse_tuning(spec)
            except ValueError:
                unknown.append(variant)
                continue
            if base.partition("@")[2] not in TRITON_TUNING:
                unknown.append(variant)
    return sorted(unknown)


def steps_per_call(variant: str) -> tuple[str, int]:
    """A ``-kN`` training row runs N steps per call (``TrainStep.run``): ``'jax-train-fp32-k8'`` ->
    ``('jax-train-fp32', 8)``; any other name -> ``(name, 1)``."""
    head, _, tail = variant.rpartition("-k")
    return (head, int(tail)) if head and tail.isdigit() and int(tail) > 0 else (variant, 1)


def _jax_worker(
    variant: str, model_name: str, batch: int, warmup: int, repeats: int, min_time: float, profile: bool = False
) -> dict:
    if variant.endswith("-cut"):  # read when the step is traced
        os.environ["SWIN_JAX_BACKWARD_CUT"] = "always"
    variant = variant.removesuffix("-thp").removesuffix("-cut")  # -thp: set in the worker's environment
    variant, per_call = steps_per_call(variant)
    scan = variant.endswith("-scan")
    variant = variant.removesuffix("-scan")
    variant, launch = triton_launch(variant)
    variant, _, attn_impl = variant.partition("@")
    import jax

    if variant.endswith("-highest"):
        jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from kernel_tune import parse_tuning

    import swin_jax
    from swin_jax import attention
    from swin_jax.train import TrainStep

    launches = {} if launch is None else {attn_impl: parse_tuning(launch)}
    with attention.triton_tuning(**launches):  # read while each program is traced
        bf16 = variant.endswith("bf16")
        dtype = jnp.bfloat16 if bf16 else jnp.float32
        train = "train" in variant
        # inference stores bf16 weights too; training keeps fp32 master weights and computes in bf16
        param_dtype = jnp.bfloat16 if (bf16 and not train) else jnp.float32
        model = swin_jax.create_model(model_name, dtype=dtype, param_dtype=param_dtype, attn_impl=attn_impl or "auto")
        model.set_scan_blocks(scan)
        size = model.img_size
        x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, *size, 3)), jnp.float32)
        gpu = jax.default_backend() == "gpu"
        out = {"settings": {"jax_default_matmul_precision": jax.config.jax_default_matmul_precision or "default"}}
        out["settings"]["attn_impl"] = f"{attn_impl or 'auto'} (runs {attention.resolve(attn_impl or 'auto')})"
        out["settings"]["triton_tuning"] = {k: launches.get(k, v)._asdict() for k, v in attention.TRITON_TUNING.items()}
        out["settings"]["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
        out["settings"]["GLIBC_TUNABLES"] = os.environ.get("GLIBC_TUNABLES", "")
        out["settings"]["scan_blocks"] = scan
        if not train:
            forward = swin_jax.compile_forward(model)
            t = time.perf_counter()
            compiled = forward.lower(x).compile()
            out["compile_s"] = time.perf_counter() - t
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            out["xla_gflop_per_image"] = float(cost.get("flops", 0.0)) / batch / 1e9 if cost else None
            times = _time_calls(lambda: compiled(forward.state, x), jax.block_until_ready, warmup, repeats, min_time)
            if profile:
                out["profile"] = _profile(lambda: compiled(forward.state, x), jax.block_until_ready)
        else:
            y = jnp.asarray(np.arange(batch) % model.num_classes)
            model.train()
            optimizer = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.05), wrt=nnx.Param)

            # the documented fast path (what finetune runs): one jitted pure function over the flat state
            step = TrainStep(model, optimizer, num_classes=model.num_classes)
            call = lambda: step((x, y))  # noqa: E731
            if per_call > 1:  # per_call steps per call, each on the same batch
                xs, ys = jnp.stack([x] * per_call), jnp.stack([y] * per_call)
                call = lambda: step.run((xs, ys))  # noqa: E731
            out["settings"]["steps_per_call"] = per_call
            t = time.perf_counter()
            jax.block_until_ready(call())
            first = time.perf_counter() - t  # first call: trace + compile + per_call steps
            times = _time_calls(call, jax.block_until_ready, warmup, repeats, min_time)
            times = [s / per_call for s in times]  # per step
            out["compile_s"] = first - (per_call - 1) * statistics.median(times)  # as the other rows: less one step
            if profile:
                out["profile"] = _profile(call, jax.block_until_ready)
        if gpu:
            stats = jax.devices()[0].memory_stats() or {}
            out["peak_mem_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
        else:
            out["peak_mem_mb"] = _peak_rss_mb()
        out["times"] = times
        return out


def _timm_worker(variant: str, model_name: str, batch: int, warmup: int, repeats: int, min_time: float) -> dict:
    variant = variant.removesuffix("-thp")  # set in the worker's environment
    fused = variant.endswith("-fused")
    if fused:  # read by timm at import: Swin's WindowAttention uses F.scaled_dot_product_attention
        os.environ["TIMM_FUSED_ATTN"] = "2"
    variant = variant.removesuffix("-fused")
    import timm
    import torch

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if variant.endswith("-tf32"):
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls
    bf16 = variant.endswith("bf16")
    train = "train" in variant
    model = timm.create_model(model_name, pretrained=False, drop_path_rate=0.0).to(device)
    fused_modules = [m for m in model.modules() if hasattr(m, "fused_attn")]
    size = model.pretrained_cfg["input_size"][1:]
    x = torch.randn(batch, 3, *size, device=device)
    sync = (lambda _: torch.cuda.synchronize()) if gpu else (lambda _: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    out = {
        "settings": {
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "autocast_bf16": bf16,
            "TIMM_FUSED_ATTN": os.environ.get("TIMM_FUSED_ATTN"),
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "attention_modules_fused": sum(bool(m.fused_attn) for m in fused_modules),
            "attention_modules": len(fused_modules),
        }
    }
    if not train:
        model.eval()
        fn = torch.compile(model) if "compile" in variant else model

        def call():
            with torch.inference_mode(), autocast:
                return fn(x)
    else:
        model.train()
        y = torch.arange(batch, device=device) % model.num_classes
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        fwd = torch.compile(model) if "compile" in variant else model  # forward + backward compiled, AdamW eager

        def call():
            with autocast:
                loss = torch.nn.functional.cross_entropy(fwd(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    sync(call())
    out["compile_s"] = time.perf_counter() - t  # first call (torch.compile compiles here)
    out["times"] = _time_calls(call, sync, warmup, repeats, min_time)
    out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20 if gpu else _peak_rss_mb()
    return out


def _matmul_peak_worker(repeats: int) -> dict:
    """Measured bf16 matmul throughput of the device (jax, random operands), TFLOP/s."""
    import jax
    import jax.numpy as jnp

    n = 8192
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    times = _time_calls(lambda: f(a, b), jax.block_until_ready, 3, max(repeats, 20))
    return {"tflops": 2 * n**3 / statistics.median(times) / 1e12, "shape": [n, n, n], "times": times}


def cpu_description() -> str:
    """The CPU's model name with its family and model numbers (``AMD EPYC (family 25, model 1)``): timing
    ratios differ between CPU kinds, and a virtual machine's model name alone may not say which one it is."""
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.processor() or platform.machine())
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    return name


def _info_worker() -> dict:
    """Device and versions, read in a subprocess so the orchestrator never holds the GPU."""
    import flax
    import jax
    import timm
    import torch

    dev = jax.devices()[0]
    device = {"backend": jax.default_backend(), "jax_device": dev.device_kind, "cpu_count": os.cpu_count()}
    device["cpu_model"] = cpu_description()
    device["host"] = platform.node()
    versions = {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    if device["backend"] == "gpu":
        try:
            device["jax_platform_version"] = dev.client.platform_version
        except Exception:  # noqa: BLE001
            pass
        try:
            query = "name,uuid,driver_version,memory.total,clocks.max.sm,power.limit"
            line = subprocess.run(
                ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.splitlines()[0]
            device.update(
                zip(
                    ["gpu_name", "gpu_uuid", "driver", "gpu_memory", "max_sm_clock", "power_limit"],
                    [s.strip() for s in line.split(",")],
                )
            )
        except Exception as e:  # noqa: BLE001
            device["nvidia_smi_error"] = repr(e)
        versions["torch_cuda"] = torch.version.cuda
        versions["torch_cudnn"] = torch.backends.cudnn.version()
    # which swin_jax sources were measured (the tree may change between the parts of a split run)
    digest = hashlib.sha256()
    for path in sorted((ROOT / "swin_jax").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    versions["swin_jax_sources_sha256"] = digest.hexdigest()[:16]
    return {"device": device, "versions": versions}


def _worker(args: argparse.Namespace) -> None:
    if args.worker == "info":
        result = _info_worker()
    elif args.worker == "matmul-peak":
        result = _matmul_peak_worker(args.repeats)
    elif args.worker.startswith("jax"):
        result = _jax_worker(
            args.worker, args.model, args.batch, args.warmup, args.repeats, args.min_time, args.profile
        )
    else:
        result = _timm_worker(args.worker, args.model, args.batch, args.warmup, args.repeats, args.min_time)
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------------------


def _run_worker(variant: str, args: argparse.Namespace, batch: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--model", args.model, "--batch", str(batch)]
    cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats), "--min-time", str(args.min_time or 0.0)]
    cmd += ["--profile"] if args.profile else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.update(worker_env(variant, env))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}


def worker_env(variant: str, env: dict[str, str]) -> dict[str, str]:
    """The environment variables a variant's worker adds (read at process start): for ``-thp`` rows, the
    framework's switch for transparent huge pages (``THP_ENV``); glibc tunables already set are kept."""
    if not variant.endswith("-thp"):
        return {}
    add = dict(THP_ENV["jax" if variant.startswith("jax") else "timm"])
    if "GLIBC_TUNABLES" in add and env.get("GLIBC_TUNABLES"):
        add["GLIBC_TUNABLES"] = env["GLIBC_TUNABLES"] + ":" + add["GLIBC_TUNABLES"]
    return add


def _device_key(device: dict) -> str:
    """What makes two parts' rows comparable: the same GPU (UUID), or the same CPU host."""
    return device.get("gpu_uuid") or f"{device.get('backend')}:{device.get('host')}:{device.get('cpu_model')}"


def _finish_rows(rows: list[dict], parts: list[dict], flops: float | None) -> None:
    """(Re)compute img/s-derived figures: fraction of the matmul peak and the ratios against timm.

    Ratios only between rows of the same device (``_device_key`` of their part)."""
    peaks: dict[str, list[float]] = {}
    for part in parts:
        peak = part.get("matmul_peak_bf16") or {}
        if "tflops" in peak:
            peaks.setdefault(_device_key(part["device"]), []).append(peak["tflops"])
    for row in rows:
        part = parts[row.get("part", 0)]
        key = _device_key(part["device"])
        peak = (part.get("matmul_peak_bf16") or {}).get("tflops") or (
            statistics.median(peaks[key]) if key in peaks else None
        )
        for k in [k for k in row if k.startswith("vs_timm")] + ["fraction_of_matmul_peak"]:
            row.pop(k, None)
        if "img_s" not in row:
            continue
        if part["device"].get("backend") == "gpu" and peak and flops:
            factor = TRAIN_FLOPS_FACTOR if row["kind"] == "train" else 1.0
            row["fraction_of_matmul_peak"] = row["img_s"] * flops * factor / 1e12 / peak
        gpu = part["device"].get("backend") == "gpu"
        for ratio, want in REFS.get(row["variant"].split("@")[0], {}).items():
            if not gpu:
                want = want.replace("bf16", "fp32")  # on CPU timm runs fp32 only
            match = [
                r
                for r in rows
                if r["variant"] == want
                and r["kind"] == row["kind"]
                and r["batch"] == row["batch"]
                and "img_s" in r
                and r.get("round") == row.get("round")
                and _device_key(parts[r.get("part", 0)]["device"]) == key
            ]
            if match:
                row[ratio] = row["img_s"] / match[-1]["img_s"]


def _summarize(rows: list[dict]) -> list[dict]:
    """Per (kind, variant, batch) over the rounds of a ``--rounds`` run: img/s and each ratio against timm as
    median, min and max of the rounds' values."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "img_s" in r:
            groups.setdefault((r["kind"], r["variant"], r["batch"]), []).append(r)
    out = []
    for (kind, variant, batch), rs in groups.items():
        item = {"kind": kind, "variant": variant, "batch": batch, "rounds": len(rs)}
        for key in ["img_s"] + sorted({k for r in rs for k in r if k.startswith("vs_timm")}):
            vals = [r[key] for r in rs if key in r]
            item[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "values": vals}
        out.append(item)
    return out


def _summary_table(summary: list[dict]) -> str:
    lines = ["| kind | variant | batch | rounds | img/s (median) | vs timm eager: median (min-max) |", "|" + "---|" * 6]
    for s in summary:
        ratio = s.get("vs_timm_eager")
        ratio = "-" if ratio is None else f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})"
        lines.append(
            f"| {s['kind']} | {s['variant']} | {s['batch']} | {s['rounds']} | {s['img_s']['median']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def _table(rows: list[dict]) -> str:
    head = "| kind | variant | batch | img/s | vs timm eager | vs timm compile | % bf16 mm peak | compile s | peak MB "
    head += "| note |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        note = r.get("note", "")
        if "vs_timm_eager_tf32" in r or "vs_timm_compile_tf32" in r:
            note += (
                f"vs timm tf32: eager {fmt(r.get('vs_timm_eager_tf32'), '.2f')}, "
                f"compile {fmt(r.get('vs_timm_compile_tf32'), '.2f')}"
            )
        frac = r.get("fraction_of_matmul_peak")
        rnd = "" if r.get("round") is None else f" (round {r['round']})"
        lines.append(
            f"| {r['kind']} | {r['variant']}{rnd} | {r['batch']} | {fmt(r.get('img_s'), '.2f')} | "
            f"{fmt(r.get('vs_timm_eager'), '.2f')} | {fmt(r.get('vs_timm_compile'), '.2f')} | "
            f"{fmt(None if frac is None else 100 * frac, '.1f')} | "
            f"{fmt(r.get('compile_s'), '.1f')} | {fmt(r.get('peak_mem_mb'), '.0f')} | {note} |"
        )
    return "\n".join(lines)


def _write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)


def _merge(files: list[Path], out: Path | None, command: str) -> int:
    """Join part files of a split run into one result; later parts win for the same (kind, variant, batch)."""
    parts, rows, seen = [], [], {}
    for path in files:
        res = json.loads(Path(path).read_text())
        sub = res.get("parts") or [
            {k: res.get(k) for k in ("date", "command", "device", "versions", "matmul_peak_bf16")}
        ]
        base = len(parts)
        for p in sub:
            parts.append({"file": Path(path).name, **p})
        for row in res["rows"]:
            row = {**row, "part": base + row.get("part", 0)}
            ident = (row["kind"], row["variant"], row["batch"], row.get("round"))
            if ident in seen:
                rows[seen[ident]] = None  # superseded by this later part
            seen[ident] = len(rows)
            rows.append(row)
        model, flops = res["model"], res.get("flops_per_image")
    rows = [r for r in rows if r is not None]
    _finish_rows(rows, parts, flops)
    keys = {_device_key(p["device"]) for p in parts}
    result = {
        "date": min(p["date"] for p in parts),
        "command": command,
        "model": model,
        "merged_from": [str(f) for f in files],
        "same_device": len(keys) == 1,
        "note": (
            "rows from several runs (parts); ratios only between rows measured on the same device"
            + ("" if len(keys) == 1 else " - the parts ran on DIFFERENT devices")
        ),
        "device": parts[0]["device"],
        "versions": parts[0]["versions"],
        "parts": parts,
        "flops_per_image": flops,
        "rows": rows,
    }
    print(_table(rows))
    if out:
        _write(result, out)
        print(f"\nwrote {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="swin_base_patch4_window7_224")
    p.add_argument("--batches", type=int, nargs="+", help="inference batch sizes (CPU: 1 8, GPU: 1 64 256)")
    p.add_argument("--train-batch", type=int, help="training step batch size (CPU: 8, GPU: 64); 0 skips it")
    p.add_argument("--variants", nargs="+", help="run only these variants (also enables the GPU extras)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed calls, at least")
    p.add_argument("--min-time", type=float, help="seconds of timed calls, at least (CPU: 0, GPU: 2)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    p.add_argument(
        "--rounds", type=int, default=1, help="run the list this many times, every other round reversed (drift)"
    )
    p.add_argument("--no-peak", action="store_true", help="skip the bf16 matmul peak (GPU)")
    p.add_argument(
        "--profile", action="store_true", help="swin-jax rows: trace 3 calls, report the device's busy fraction"
    )
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/<backend>.json)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="PART", help="join part files into --out")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    command = "python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.merge:
        return _merge(args.merge, args.out, command)
    if args.worker:
        args.min_time = args.min_time or 0.0
        _worker(args)
        return 0

    info = _run_worker("info", args)
    if "error" in info:
        print(f"device info failed: {info['error']}", file=sys.stderr)
        return 1
    device, versions = info["device"], info["versions"]
    gpu = device["backend"] == "gpu"
    if args.min_time is None:
        args.min_time = 2.0 if gpu else 0.0
    batches = args.batches or ([1, 64, 256] if gpu else [1, 8])
    train_batch = args.train_batch if args.train_batch is not None else (64 if gpu else 8)
    infer = INFER + (INFER_GPU + (INFER_GPU_EXTRA if args.variants else []) if gpu else [])
    train = (TRAIN + (TRAIN_GPU if gpu else [])) if train_batch else []
    if args.variants:
        extra = FUSED_EXTRA + CUT_EXTRA + ATTN_EXTRA + SCAN_EXTRA + THP_EXTRA + STEPS_EXTRA
        infer += [v for v in extra if "train" not in v]
        train += [v for v in extra if "train" in v] if train_batch else []
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.variants:
        known = INFER + INFER_GPU + INFER_GPU_EXTRA + TRAIN + TRAIN_GPU
        known += FUSED_EXTRA + CUT_EXTRA + ATTN_EXTRA + SCAN_EXTRA + THP_EXTRA + STEPS_EXTRA
        unknown = unknown_variants(args.variants, set(known))
        if unknown:
            p.error(f"unknown variants: {unknown}")
        infer = [v for v in args.variants if triton_launch(v)[0] in infer]  # in the order given
        train = [v for v in args.variants if triton_launch(v)[0] in train]
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    out = args.out or ROOT / "benchmarks" / "results" / f"{device['backend']}.json"
    flops = TIMM_FLOPS_PER_IMAGE.get(args.model)
    peak = None if (not gpu or args.no_peak) else _run_worker("matmul-peak", args)
    part = {"date": started, "command": command, "device": device, "versions": versions, "matmul_peak_bf16": peak}
    result = {**part, "model": args.model, "flops_per_image": flops, "settings": {}, "rows": []}
    result["settings"] = {
        "warmup": args.warmup,
        "repeats": args.repeats,
        "min_time_s": args.min_time,
        "rounds": args.rounds,
    }
    rows: list[dict] = result["rows"]
    _write(result, out)
    if peak and "tflops" in peak:
        print(f"measured bf16 matmul peak: {peak['tflops']:.1f} TFLOP/s", file=sys.stderr, flush=True)
    jobs = [("infer", v, b) for b in batches for v in infer] + [("train", v, train_batch) for v in train]
    rounds = [(r, jobs if r % 2 == 0 else jobs[::-1]) for r in range(args.rounds)]
    for kind, variant, batch, rnd in [(*job, r) for r, order in rounds for job in order]:
        print(f"running {kind} {variant} batch {batch} ...", file=sys.stderr, flush=True)
        res = _run_worker(variant, args, batch)
        row = {"kind": kind, "variant": variant, "batch": batch, **{k: v for k, v in res.items() if k != "times"}}
        if args.rounds > 1:
            row["round"] = rnd
        if "times" in res:
            row["median_s"] = statistics.median(res["times"])
            row["img_s"] = batch / row["median_s"]
            row["times"] = res["times"]
            if kind == "train" and "compile_s" in row:  # the first step's compile alone: less one step's time
                row["compile_less_step_s"] = row["compile_s"] - row["median_s"]
        else:
            row["note"] = res.get("error", "")
        rows.append(row)
        _finish_rows(rows, [part], flops)
        _write(result, out)  # after every row: a stopped run keeps what it measured
        print("  " + _table([row]).splitlines()[-1], file=sys.stderr, flush=True)
    print(_table(rows))
    if args.rounds > 1:
        result["summary"] = _summarize(rows)
        _write(result, out)
        print("\n" + _summary_table(result["summary"]))
    if peak and "tflops" in peak:
        print(f"\nmeasured bf16 matmul peak: {peak['tflops']:.1f} TFLOP/s")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
