"""The repository's entry point for the weight converter: ``python -m convert ...`` in a checkout.

The converter is :mod:`swin_jax.convert`, installed with swin-jax as ``swin-jax convert``; this package only runs
it under the name a checkout has always used. It is not installed (``pyproject.toml`` packages ``swin_jax`` only).
"""
