"""TensorFloat-32 emulated on any backend: what jax's default matmul precision computes on an NVIDIA GPU.

On Ampere and later GPUs, jax's default precision runs float32 matmuls and convolutions on tensor cores with
TF32 inputs: each float32 operand is rounded to 10 mantissa bits (from 23) and the products are accumulated in
float32 (https://docs.jax.dev/en/latest/201/precision.html). :func:`emulate_tf32` gives the same rounding on
the CPU, so the accuracy of the default precision can be measured where no GPU is lent:

    run = jax.jit(emulate_tf32(fn))   # fn's float32 dots and convs at DEFAULT precision get TF32 inputs

It traces ``fn`` at jax's default precision (whatever ``jax_default_matmul_precision`` says outside) and
evaluates the jaxpr, rounding the float32 inputs of every ``dot_general`` and ``conv_general_dilated`` left at
the default (``precision=None`` or ``DEFAULT``) to the nearest TF32 value (ties to even) and computing it at
``HIGHEST`` from there; dots that ask for more (``HIGHEST``, an explicit algorithm) and all other ops run
unchanged. The accumulation stays XLA:CPU's float32 one, so what it models is the input rounding, the dominant
term (2^-11 relative per operand against float32's 2^-24). Forward computations only: nested jit, custom_jvp /
custom_vjp functions and remat are followed; any other primitive with a sub-program raises rather than skipping
its dots.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

__all__ = ["emulate_tf32", "round_to_tf32"]

_ROUNDED = ("dot_general", "conv_general_dilated")
# primitives whose sub-program is the computation itself (evaluated inline, with the same rounding)
_INLINED = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_INLINED |= {"custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}
_INLINED |= {"checkpoint": "jaxpr", "remat": "jaxpr", "remat2": "jaxpr"}  # remat2: jax.checkpoint (the MLP's GELU)


def round_to_tf32(x: jax.Array) -> jax.Array:
    """``x`` (float32) rounded to the nearest TF32 value (10 explicit mantissa bits), ties to even; other dtypes
    unchanged."""
    if x.dtype != jnp.float32:
        return x
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    bits = (bits + jnp.uint32(0xFFF) + ((bits >> 13) & jnp.uint32(1))) & jnp.uint32(0xFFFFE000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _default_precision(params: dict) -> bool:
    precision = params.get("precision")
    if precision is None:
        return True
    pair = precision if isinstance(precision, tuple) else (precision, precision)
    return all(p is None or p == jax.lax.Precision.DEFAULT for p in pair)


def _sub_jaxpr(value: Any) -> tuple[Any, list]:
    if isinstance(value, jex_core.ClosedJaxpr):
        return value.jaxpr, list(value.consts)
    return value, []


def _has_sub_program(params: dict) -> bool:
    def sub(v: Any) -> bool:
        if isinstance(v, (jex_core.ClosedJaxpr, jex_core.Jaxpr)):
            return True
        return isinstance(v, (tuple, list)) and any(sub(e) for e in v)

    return any(sub(v) for v in params.values())


def _eval(jaxpr: Any, consts: list, args: list) -> list:
    env: dict = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex_core.Literal) else env[v]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _ROUNDED and _default_precision(eqn.params):  # TF32 inputs, then exact float32 products
            full = {**eqn.params, "precision": (jax.lax.Precision.HIGHEST,) * 2}
            outs = eqn.primitive.bind(*[round_to_tf32(v) for v in invals], **full)
        elif name in _INLINED:
            sub, sub_consts = _sub_jaxpr(eqn.params[_INLINED[name]])
            outs = _eval(sub, sub_consts, invals[len(invals) - len(sub.invars) :])
        elif _has_sub_program(eqn.params):
            raise NotImplementedError(f"emulate_tf32: cannot follow the sub-program of primitive {name!r}")
        else:
            params = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) in older jax
            subfuns, params = params if isinstance(params, tuple) else ((), params)
            outs = eqn.primitive.bind(*subfuns, *invals, **params)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def emulate_tf32(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with TF32 inputs to its default-precision float32 dots and convolutions (see the module docstring).
    Arguments and results are pytrees, as for ``fn``; wrap the result in ``jax.jit`` to compile it."""

    def wrapped(*args: Any) -> Any:
        with jax.default_matmul_precision("default"):  # jax records the precision in force when tracing
            closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _eval(closed.jaxpr, list(closed.consts), jax.tree_util.tree_leaves(args))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped
