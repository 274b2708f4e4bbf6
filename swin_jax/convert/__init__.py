"""Weight conversion between timm checkpoints (PyTorch, the Hub, original Microsoft Swin) and swin_jax.

A thin layer over :mod:`swin_jax`: reading, mapping and writing weights is swin_jax's
(``create_model(pretrained=...)`` and ``swin_jax.hub.save_pretrained``); this package resolves what
the user named, checks the result against timm (``--verify``) and turns errors into one-line messages.
torch and timm are imported only for ``--verify`` or a pickled checkpoint; without them those say what to install.

Run ``swin-jax convert --help`` (installed), ``python -m swin_jax convert --help``, or ``python -m convert --help``
in a checkout (the repository's ``convert/`` is a thin entry point over this package).
"""
