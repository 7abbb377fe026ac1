"""Token embeddings, the tied/untied output head, and sinusoids."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


def sinusoids(
    positions: Int[Array, " n"] | Float[Array, " n"], width: int, lam: float = 10_000.0
) -> Float[Array, "n width"]:
    """[sin(p w_f), cos(p w_f)] with w_f = lam^(-2f/width), f < width/2 (float32)."""
    half = width // 2
    freqs = lam ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / width)
    angles = positions.astype(jnp.float32)[:, None] * freqs[None, :]
    table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    if width % 2:
        table = jnp.pad(table, ((0, 0), (0, 1)))
    return table


class Embedding(eqx.Module):
    """Token embedding table; `logits()` is the tied output head (x E^T)."""

    weight: Float[Array, "vocab d_model"]

    def __init__(
        self, n_vocab: int, d_model: int, *, key: PRNGKeyArray, dtype=jnp.float32
    ):
        self.weight = jax.random.normal(key, (n_vocab, d_model), dtype)

    def __call__(
        self, tokens: Int[Array, "*batch"], *, key=None
    ) -> Float[Array, "*batch d_model"]:
        return jnp.take(self.weight, tokens, axis=0)

    def logits(self, x: Float[Array, "*batch d_model"]) -> Float[Array, "*batch vocab"]:
        # Rows of the table have unit variance; scale so tied logits start O(1).
        w = self.weight.astype(x.dtype) * (x.shape[-1] ** -0.5)
        return jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)


class OutputHead(eqx.Module):
    """Untied output projection d_model -> vocab with bias."""

    weight: Float[Array, "d_model vocab"]
    bias: Float[Array, " vocab"]

    def __init__(
        self, d_model: int, n_vocab: int, *, key: PRNGKeyArray, dtype=jnp.float32
    ):
        self.weight = jax.random.normal(key, (d_model, n_vocab), dtype) * d_model**-0.5
        self.bias = jnp.zeros((n_vocab,), dtype)

    def __call__(
        self, x: Float[Array, "*batch d_model"], *, key=None
    ) -> Float[Array, "*batch vocab"]:
        out = jnp.einsum(
            "...d,dv->...v",
            x,
            self.weight.astype(x.dtype),
            preferred_element_type=jnp.float32,
        )
        return out + self.bias.astype(jnp.float32).reshape(
            (1,) * (out.ndim - 1) + (-1,)
        )
