"""Token embeddings, the tied/untied output head, and sinusoids."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Integer, PRNGKeyArray


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
    """Token embedding table, initialised N(0, 1) (official `e_init`)."""

    weight: Float[Array, "vocab d_model"]

    def __init__(
        self, n_vocab: int, d_model: int, *, key: PRNGKeyArray, dtype=jnp.float32
    ):
        self.weight = jax.random.normal(key, (n_vocab, d_model), dtype)

    def __call__(
        self, tokens: Integer[Array, "*batch"], *, key=None
    ) -> Float[Array, "*batch d_model"]:
        return jnp.take(self.weight, tokens, axis=0)


class OutputHead(eqx.Module):
    """Logits `(x W + b) * e_scale` in float32 (official `Embeddings.logits` /
    `out_proj`, then `e_scale`).

    Untied: `W` is this head's `weight` `[d_model, vocab]`, initialised
    N(0, 1/d_model) (official `w_init`). Tied (`weight is None`): `W = E^T`,
    the token embedding table passed as `tied`. The bias starts at zero in
    both cases (official `bias_out` / `out_proj.bias`).
    """

    weight: Float[Array, "d_model vocab"] | None
    bias: Float[Array, " vocab"]
    e_scale: float = eqx.field(static=True)

    def __init__(
        self,
        d_model: int,
        n_vocab: int,
        *,
        tied: bool = False,
        e_scale: float = 1.0,
        key: PRNGKeyArray,
        dtype=jnp.float32,
    ):
        self.weight = (
            None
            if tied
            else jax.random.normal(key, (d_model, n_vocab), dtype) * d_model**-0.5
        )
        self.bias = jnp.zeros((n_vocab,), dtype)
        self.e_scale = e_scale

    def __call__(
        self,
        x: Float[Array, "*batch d_model"],
        tied: Float[Array, "vocab d_model"] | None = None,
        *,
        key=None,
    ) -> Float[Array, "*batch vocab"]:
        # Full-precision logits, as the official code (its output layer runs
        # in float32 whatever the activation dtype).
        x32 = x.astype(jnp.float32)
        if self.weight is None:
            if tied is None:
                raise ValueError("a tied OutputHead needs the embedding table `tied`")
            w = tied.astype(jnp.float32).T
        else:
            w = self.weight.astype(jnp.float32)
        out = jnp.einsum("...d,dv->...v", x32, w)
        out = out + self.bias.astype(jnp.float32).reshape((1,) * (out.ndim - 1) + (-1,))
        return out * self.e_scale
