"""Suite-wide settings: one persistent JAX compilation cache for the whole run.

Many tests start processes (the CLIs, the multi-process and multi-device runs, the notebooks' kernels) that
compile the same small programs again; JAX's persistent cache, in a temporary directory that lives as long as
the run (inherited by every subprocess through the environment), lets them load instead. It changes no result:
a cached executable is the one XLA compiled for the same program, flags and device.
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
