"""Prefix sums over blocks that stay linear in time on every platform.

The cache of block n is a prefix over the blocks before it, and its gradient a
reverse prefix. The obvious `jnp.cumsum` is not linear everywhere: jax lowers
a cumulative reduction to a `reduce_window` whose window is the whole axis
(O(N^2) unless the backend rewrites it), except a forward cumsum on GPU (a
CUB-style scan). Its transpose is a *reverse* cumsum, which the GPU lowering
does not cover, so the backward held an O(N^2 * codes * d_v) term (measured
on an H200: 45 of 70 ms at 128k tokens). Here:

- `prefix_sum`: on GPU the forward cumsum (the linear scan), and a backward
  that flips, scans forward and flips back (`custom_vjp`); elsewhere a
  sequential `lax.scan` over blocks (O(N), one add per block; CPU's and TPU's
  compilers turn an associative scan into an O(N log N) tree).
- `linear_recurrence`: `y_n = a_n y_(n-1) + x_n` (decayed or document-reset
  caches) as a `lax.scan`, whose autodiff is a reverse scan: O(N) both ways.
- `running_max`: the int running max over tokens that finds each token's
  document start, as an associative scan (O(T) as lowered; no gradient).

`tests/test_linear_time.py` lowers the attention forms for cuda and tpu and
fails on any long `reduce_window`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int


def _scan_sum(
    x: Float[Array, "batch blocks ..."],
) -> Float[Array, "batch blocks ..."]:
    """Inclusive sum over axis 1, one block at a time."""

    def step(total, x_n):
        total = total + x_n
        return total, total

    _, ys = jax.lax.scan(step, jnp.zeros_like(x[:, 0]), jnp.moveaxis(x, 1, 0))
    return jnp.moveaxis(ys, 0, 1)


def _inclusive_sum(x):
    gpu = functools.partial(jax.lax.cumsum, axis=1)
    return jax.lax.platform_dependent(x, cuda=gpu, rocm=gpu, default=_scan_sum)


@jax.custom_vjp
def prefix_sum(
    x: Float[Array, "batch blocks ..."],
) -> Float[Array, "batch blocks ..."]:
    """Inclusive prefix sum over axis 1 (the blocks), linear in the number of
    blocks forward and backward on every platform (see the module doc).
    Reverse-mode only (forward-mode autodiff raises, as for the kernels)."""
    return _inclusive_sum(x)


def _prefix_sum_fwd(x):
    return _inclusive_sum(x), None


def _prefix_sum_bwd(_, g):
    # The transpose of an inclusive prefix sum is a reverse one: flip, scan
    # forward (the form every platform runs in linear time), flip back.
    return (jnp.flip(_inclusive_sum(jnp.flip(g, axis=1)), axis=1),)


prefix_sum.defvjp(_prefix_sum_fwd, _prefix_sum_bwd)


def linear_recurrence(
    a: Float[Array, "batch blocks"],
    x: Float[Array, "batch blocks ..."],
    y0: Float[Array, "batch ..."],
) -> Float[Array, "batch blocks ..."]:
    """`y_n = a_n * y_(n-1) + x_n` from `y_(-1) = y0`, every `y_n` (axis 1):
    a sequential scan over blocks, O(N) forward and backward."""

    def step(y, inputs):
        a_n, x_n = inputs
        y = a_n.reshape(a_n.shape + (1,) * (x_n.ndim - 1)) * y + x_n
        return y, y

    _, ys = jax.lax.scan(step, y0, (a.T, jnp.moveaxis(x, 1, 0)))
    return jnp.moveaxis(ys, 0, 1)


def running_max(x: Int[Array, "batch seq"]) -> Int[Array, "batch seq"]:
    """Running maximum over axis 1 (`lax.cummax` lowers to a reduce_window
    as long as the sequence on every platform)."""
    return jax.lax.associative_scan(jnp.maximum, x, axis=1)
