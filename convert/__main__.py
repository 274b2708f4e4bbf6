"""``python -m convert``: ``swin-jax convert`` from a checkout (see :mod:`swin_jax.convert`)."""

import sys

from swin_jax.convert.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m convert"))
