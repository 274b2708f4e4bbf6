"""Suite-wide settings: one persistent JAX compilation cache for the whole run, and torch / BLAS threads sized to
the xdist workers.

Many tests start processes (the CLIs, the multi-process and multi-device runs, the notebooks' kernels) that
compile the same small programs again; JAX's persistent cache, in a temporary directory that lives as long as
the run (inherited by every subprocess through the environment), lets them load instead. It changes no result:
a cached executable is the one XLA compiled for the same program, flags and device.

With one xdist worker per core, torch's OpenMP pool and numpy's BLAS pool in each worker spin on cores the other
worker is using: on a 2-core CPU a timm SwinV2-T forward took 4.1 s with 2 threads and 0.4 s with 1. Each worker
(and what it starts) gets its share of the cores instead. XLA's own thread pool does not suffer from this and is
left alone. Results change at most in float summation order, within every tolerance.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="swin-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _workers > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // _workers))
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _threads)
