"""swin-jax vs timm, side by side in one run on one machine.

    python benchmarks/bench.py                       # CPU: batches 1 and 8; GPU: 1, 64, 256
    python benchmarks/bench.py --batches 1 8 --train-batch 8 --out benchmarks/results/cpu.json

Each variant runs in its own subprocess (same machine, one after the other), so every figure has its
own peak memory and no variant warms another's caches. Inference variants: swin-jax fp32 and bf16
(``compile_forward``, the documented fast path), timm eager fp32 and ``torch.compile`` fp32, and on
GPU timm bf16 autocast (eager and compiled). Training step (forward + backward + AdamW, drop path off)
for swin-jax and timm. On GPU, a bf16 matmul is timed in the same run to give the fraction of the
measured matmul peak that the model reaches.

Timing: warm-up calls, then the median of ``--repeats`` timed calls, each ended by
``block_until_ready`` / ``torch.cuda.synchronize``. Compile time: jax's lower+compile, torch.compile's
first call. Peak memory: device peak on GPU, the worker process' peak RSS on CPU.
Run from the repository root (the project on ``PYTHONPATH``, as ``python benchmarks/bench.py`` does).
"""

from __future__ import annotations

import argparse
import datetime
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
INFER_GPU = ["timm-eager-bf16", "timm-compile-bf16"]
TRAIN = ["jax-train-fp32", "timm-train-eager-fp32"]
TRAIN_GPU = ["jax-train-bf16", "timm-train-compile-fp32", "timm-train-eager-bf16"]
TIMM_FLOPS_PER_IMAGE = {"swin_base_patch4_window7_224": 30.9e9}  # timm's model card (2 x 15.4 GMACs)


# ----------------------------------------------------------------------------------------------------------
# workers (one variant, one batch size, in a fresh process)
# ----------------------------------------------------------------------------------------------------------


def _time_calls(fn, sync, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return times


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _jax_worker(variant: str, model_name: str, batch: int, warmup: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    import swin_jax

    bf16 = variant.endswith("bf16")
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    train = "train" in variant
    # inference stores bf16 weights too; training keeps fp32 master weights and computes in bf16
    param_dtype = jnp.bfloat16 if (bf16 and not train) else jnp.float32
    model = swin_jax.create_model(model_name, dtype=dtype, param_dtype=param_dtype)
    size = model.img_size
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, *size, 3)), jnp.float32)
    gpu = jax.default_backend() == "gpu"
    out = {}
    if not train:
        forward = swin_jax.compile_forward(model)
        t = time.perf_counter()
        compiled = forward.lower(x).compile()
        out["compile_s"] = time.perf_counter() - t
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out["xla_gflop_per_image"] = float(cost.get("flops", 0.0)) / batch / 1e9 if cost else None
        times = _time_calls(lambda: compiled(forward.state, x), jax.block_until_ready, warmup, repeats)
    else:
        y = jnp.asarray(np.arange(batch) % model.num_classes)
        model.train()
        optimizer = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.05), wrt=nnx.Param)

        @nnx.jit
        def step(model, optimizer, x, y):
            def loss_fn(model):
                logits = model(x).astype(jnp.float32)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss

        t = time.perf_counter()
        jax.block_until_ready(step(model, optimizer, x, y))
        out["compile_s"] = time.perf_counter() - t  # first step: trace + compile + one step
        times = _time_calls(lambda: step(model, optimizer, x, y), jax.block_until_ready, warmup, repeats)
    if gpu:
        stats = jax.devices()[0].memory_stats() or {}
        out["peak_mem_mb"] = stats.get("peak_bytes_in_use", 0) / 2**20
    else:
        out["peak_mem_mb"] = _peak_rss_mb()
    out["times"] = times
    return out


def _timm_worker(variant: str, model_name: str, batch: int, warmup: int, repeats: int) -> dict:
    import timm
    import torch

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    bf16 = variant.endswith("bf16")
    train = "train" in variant
    model = timm.create_model(model_name, pretrained=False, drop_path_rate=0.0).to(device)
    size = model.pretrained_cfg["input_size"][1:]
    x = torch.randn(batch, 3, *size, device=device)
    sync = (lambda _: torch.cuda.synchronize()) if gpu else (lambda _: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    out = {}
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
        fwd = torch.compile(model) if "compile" in variant else model

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
    out["times"] = _time_calls(call, sync, warmup, repeats)
    out["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20 if gpu else _peak_rss_mb()
    return out


def _matmul_peak_worker(repeats: int) -> dict:
    """Measured bf16 matmul throughput of the device (jax), TFLOP/s."""
    import jax
    import jax.numpy as jnp

    n = 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    times = _time_calls(lambda: f(a, a), jax.block_until_ready, 3, repeats)
    return {"tflops": 2 * n**3 / statistics.median(times) / 1e12, "times": times}


def _worker(args: argparse.Namespace) -> None:
    if args.worker == "matmul-peak":
        result = _matmul_peak_worker(args.repeats)
    elif args.worker.startswith("jax"):
        result = _jax_worker(args.worker, args.model, args.batch, args.warmup, args.repeats)
    else:
        result = _timm_worker(args.worker, args.model, args.batch, args.warmup, args.repeats)
    print("RESULT " + json.dumps(result))


# ----------------------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------------------


def _run_worker(variant: str, model: str, batch: int, warmup: int, repeats: int, timeout: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--model", model, "--batch", str(batch)]
    cmd += ["--warmup", str(warmup), "--repeats", str(repeats)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}


def _versions() -> dict:
    import flax
    import jax
    import timm
    import torch

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "flax": flax.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def _device() -> dict:
    import jax

    dev = jax.devices()[0]
    info = {"backend": jax.default_backend(), "jax_device": dev.device_kind, "cpu_count": os.cpu_count()}
    try:
        info["cpu_model"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor()
    return info


def _table(rows: list[dict]) -> str:
    head = "| kind | variant | batch | img/s | vs timm eager | vs timm compile | compile s | peak MB | note |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        lines.append(
            f"| {r['kind']} | {r['variant']} | {r['batch']} | {fmt(r.get('img_s'), '.2f')} | "
            f"{fmt(r.get('vs_timm_eager'), '.2f')} | {fmt(r.get('vs_timm_compile'), '.2f')} | "
            f"{fmt(r.get('compile_s'), '.1f')} | {fmt(r.get('peak_mem_mb'), '.0f')} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="swin_base_patch4_window7_224")
    p.add_argument("--batches", type=int, nargs="+", help="inference batch sizes (CPU: 1 8, GPU: 1 64 256)")
    p.add_argument("--train-batch", type=int, help="training step batch size (CPU: 8, GPU: 64); 0 skips it")
    p.add_argument("--variants", nargs="+", help="run only these variants")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    p.add_argument("--out", type=Path, help="JSON file (default benchmarks/results/<backend>.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0

    device = _device()
    gpu = device["backend"] == "gpu"
    batches = args.batches or ([1, 64, 256] if gpu else [1, 8])
    train_batch = args.train_batch if args.train_batch is not None else (64 if gpu else 8)
    infer = INFER + (INFER_GPU if gpu else [])
    train = (TRAIN + (TRAIN_GPU if gpu else [])) if train_batch else []
    if args.variants:
        infer = [v for v in infer if v in args.variants]
        train = [v for v in train if v in args.variants]
    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    command = "python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])

    peak = _run_worker("matmul-peak", args.model, 1, 0, args.repeats, args.timeout) if gpu else None
    flops = TIMM_FLOPS_PER_IMAGE.get(args.model)
    rows: list[dict] = []
    jobs = [("infer", v, b) for b in batches for v in infer] + [("train", v, train_batch) for v in train]
    for kind, variant, batch in jobs:
        print(f"running {kind} {variant} batch {batch} ...", file=sys.stderr, flush=True)
        res = _run_worker(variant, args.model, batch, args.warmup, args.repeats, args.timeout)
        row = {"kind": kind, "variant": variant, "batch": batch, **{k: v for k, v in res.items() if k != "times"}}
        if "times" in res:
            row["median_s"] = statistics.median(res["times"])
            row["img_s"] = batch / row["median_s"]
            row["times"] = res["times"]
            if gpu and peak and "tflops" in peak and flops and kind == "infer":
                row["fraction_of_matmul_peak"] = row["img_s"] * flops / 1e12 / peak["tflops"]
        else:
            row["note"] = res.get("error", "")
        rows.append(row)
    # ratios against timm at the same kind, batch and precision
    for row in rows:
        if "img_s" not in row or not row["variant"].startswith("jax"):
            continue
        prec = row["variant"].rsplit("-", 1)[1]
        for ref, key in (("eager", "vs_timm_eager"), ("compile", "vs_timm_compile")):
            want = f"timm-{'train-' if row['kind'] == 'train' else ''}{ref}-{prec}"
            if prec == "bf16" and not gpu:
                want = want.replace("bf16", "fp32")  # on CPU timm runs fp32 only
            match = [r for r in rows if r["variant"] == want and r["batch"] == row["batch"] and "img_s" in r]
            if match:
                row[key] = row["img_s"] / match[0]["img_s"]
    result = {
        "date": started,
        "command": command,
        "model": args.model,
        "device": device,
        "versions": _versions(),
        "matmul_peak_bf16": peak,
        "flops_per_image": flops,
        "rows": rows,
    }
    table = _table(rows)
    print(table)
    if peak and "tflops" in peak:
        print(f"\nmeasured bf16 matmul peak: {peak['tflops']:.1f} TFLOP/s")
    out = args.out or ROOT / "benchmarks" / "results" / f"{device['backend']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
