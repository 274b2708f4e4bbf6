#!/usr/bin/env bash
# The environment of a GPU run, printed for its env.txt: date, GPU, driver, Python and package versions.
# Used by gpu_check.sh and gpu_runs.sh.
date -u
nvidia-smi
nvidia-smi --query-gpu=name,uuid,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
python -c 'import sys; print(sys.version)'
python -m pip list 2>/dev/null | grep -i -E "^(jax|jaxlib|jax-cuda|flax|optax|torch|timm|numpy|scikit-image|nvidia-cudnn|nvidia-cublas|ml.dtypes) "
python -c 'import skimage; print("skimage", skimage.__version__)' || echo "skimage: not importable"
python -c 'import torch; print("torch cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
python -c 'import jax; print(jax.devices(), jax.devices()[0].client.platform_version)'
