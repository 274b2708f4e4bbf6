"""Weight conversion between timm checkpoints (PyTorch, the Hub, original Microsoft Swin) and swin_jax.

A thin layer over :mod:`swin_jax`: reading, mapping and writing weights is swin_jax's
(``create_model(pretrained=...)`` and ``swin_jax.hub.save_pretrained``); this package resolves what
the user named, checks the result against timm (``--verify``) and turns errors into one-line messages.
torch and timm are imported only here (and only for ``--verify`` or a pickled checkpoint).

Run ``python -m convert --help``.
"""
