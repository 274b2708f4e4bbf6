"""``python -m swin_jax.convert``: the converter (the same as ``swin-jax convert``)."""

import sys

from .cli import main

sys.exit(main(prog="python -m swin_jax.convert"))
