"""Normalisation layers."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


class RMSNorm(eqx.Module):
    """Root-mean-square norm (no centring) with a learned gain and bias,
    computed in float32.

    `y = x / sqrt(mean(x^2) + eps) * weight + bias`, cast back to `x.dtype`.
    This is the official Transformer-VQ `LayerNorm` at its defaults
    (`center=False`, gain and bias), used on each unit's input and before the
    output head. `use_bias=False` drops the bias.
    """

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"] | None
    eps: float = eqx.field(static=True)

    def __init__(
        self, dim: int, *, eps: float = 1e-6, use_bias: bool = True, dtype=jnp.float32
    ):
        self.weight = jnp.ones((dim,), dtype)
        self.bias = jnp.zeros((dim,), dtype) if use_bias else None
        self.eps = eps

    @jax.named_scope("tvq_eqx.RMSNorm")
    def __call__(
        self, x: Float[Array, "*batch dim"], *, key=None
    ) -> Float[Array, "*batch dim"]:
        shape = (1,) * (x.ndim - 1) + (-1,)
        y = rms_norm(x.astype(jnp.float32), self.eps)
        y = y * self.weight.astype(jnp.float32).reshape(shape)
        if self.bias is not None:
            y = y + self.bias.astype(jnp.float32).reshape(shape)
        return y.astype(x.dtype)


def rms_norm(
    x: Float[Array, "*batch dim"], eps: float = 1e-6
) -> Float[Array, "*batch dim"]:
    """Parameter-free RMS norm (no centring) in float32, as the official code
    normalises q and k: `x / sqrt(mean(x^2) + eps)`.

    Each normalised row has mean square 1 (norm sqrt(dim)); unlike
    `layer_norm`, adding a constant to a row changes the result.
    """
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv).astype(x.dtype)


def layer_norm(
    x: Float[Array, "*batch dim"], eps: float = 1e-6
) -> Float[Array, "*batch dim"]:
    """Parameter-free layer norm (centre and scale) in float32: the q/k norm
    of `qk_norm="layer"`.

    Each normalised row has mean 0 and mean square 1, so its norm is sqrt(dim).
    """
    x32 = x.astype(jnp.float32)
    x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    return rms_norm(x32, eps).astype(x.dtype)
