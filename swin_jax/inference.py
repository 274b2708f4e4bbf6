"""The fast inference path: one compiled, pure function of the model's state.

``nnx.split`` runs once; the jitted function ``nnx.merge``-s only while it is traced, so a call costs
one dispatch of a compiled XLA program and no Python work per module. With ``batch_size`` set, every
call runs at that batch size (smaller batches are padded, larger ones chunked), so a stream of
ragged batches compiles exactly once.

Compute dtype is the model's: create it with ``dtype=jnp.bfloat16`` (and ``param_dtype=jnp.bfloat16``
to also store bf16 weights) for bf16 inference; LayerNorm (statistics, scale and shift) and the attention
softmax run in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["CompiledForward", "compile_forward"]


class CompiledForward:
    """``model(x)`` (or another method) as a compiled function of the model's split state.

    Args:
        model: an NNX module, e.g. from :func:`swin_jax.create_model`. Put it in eval mode first.
        method: the method to run (``"__call__"``, ``"forward_features"``, ...).
        batch_size: if set, run every call at this batch size (pad / chunk); None compiles per shape.
    """

    def __init__(self, model: nnx.Module, method: str = "__call__", batch_size: int | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.method = method
        self.batch_size = batch_size
        graphdef = self.graphdef

        def run(state: Any, x: jax.Array) -> Any:
            module = nnx.merge(graphdef, state)
            return getattr(module, method)(x)

        self._run: Callable = jax.jit(run)

    def lower(self, x: Any) -> Any:
        """``jax.jit(...).lower`` at the shape calls will use (for AOT compilation and cost analysis)."""
        if self.batch_size is not None:
            x = jax.ShapeDtypeStruct((self.batch_size, *x.shape[1:]), x.dtype)
        return self._run.lower(self.state, x)

    def __call__(self, x: Any) -> Any:
        if self.batch_size is None:
            return self._run(self.state, x)
        n, bs = x.shape[0], self.batch_size
        outs = []
        for start in range(0, n, bs):
            chunk = jnp.asarray(x[start : start + bs])  # every chunk the same kind of array: one cache entry
            m = chunk.shape[0]
            if m < bs:
                chunk = jnp.concatenate([chunk, jnp.zeros((bs - m, *chunk.shape[1:]), chunk.dtype)])
            out = self._run(self.state, chunk)
            outs.append(jax.tree_util.tree_map(lambda a, m=m: a[:m], out))
        if len(outs) == 1:
            return outs[0]
        return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *outs)


def compile_forward(model: nnx.Module, method: str = "__call__", batch_size: int | None = None) -> CompiledForward:
    """The fast path for ``model``: see :class:`CompiledForward`.

    Example::

        model = swin_jax.create_model("swin_base_patch4_window7_224.ms_in22k_ft_in1k", pretrained=True,
                                      dtype=jnp.bfloat16)
        forward = swin_jax.compile_forward(model, batch_size=64)
        logits = forward(images)  # any number of images, one compiled program
    """
    return CompiledForward(model, method, batch_size)
