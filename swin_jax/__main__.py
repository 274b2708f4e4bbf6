"""``python -m swin_jax COMMAND ...``: see :mod:`swin_jax.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
