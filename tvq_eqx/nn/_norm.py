"""Normalisation layers."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class RMSNorm(eqx.Module):
    """Root-mean-square norm with a learned gain, computed in float32.

    `y = x / sqrt(mean(x^2) + eps) * weight`, cast back to `x.dtype`.
    """

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
        self.weight = jnp.ones((dim,), dtype)
        self.eps = eps

    @jax.named_scope("tvq_eqx.RMSNorm")
    def __call__(
        self, x: Float[Array, "*batch dim"], *, key=None
    ) -> Float[Array, "*batch dim"]:
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = self.weight.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (x32 * inv * weight).astype(x.dtype)


def layer_norm(
    x: Float[Array, "*batch dim"], eps: float = 1e-6
) -> Float[Array, "*batch dim"]:
    """Parameter-free layer norm (centre and scale) in float32, as used on q and k.

    Each normalised row has mean 0 and mean square 1, so its norm is sqrt(dim).
    """
    x32 = x.astype(jnp.float32)
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv).astype(x.dtype)
