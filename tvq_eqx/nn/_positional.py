"""Position information: Transformer-XL relative biases (Dai et al., 2019)
and the scaled absolute sinusoids (Hua et al., 2022)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._embedding import sinusoids


def dropout(x, p: float, key):
    """Inverted dropout; identity when `key` is None or p == 0."""
    if key is None or p == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
    return jnp.where(keep, x / (1.0 - p), 0.0).astype(x.dtype)


class XLRelativeBias(eqx.Module):
    """Learned u, v and projected sinusoids r_d for distances d = 0..mem_len.

    Scores get `(q_i + u) . k_j` (content, every key) plus `(q_i + v) . r_{i-j}`
    (position, only for `0 <= i - j <= mem_len`). Sinusoid dropout acts on the
    sinusoid table before the projection.
    """

    u: Float[Array, "heads d_k"]
    v: Float[Array, "heads d_k"]
    w_r: Float[Array, "d_model heads_d_k"]
    mem_len: int = eqx.field(static=True)
    n_head: int = eqx.field(static=True)
    d_k: int = eqx.field(static=True)
    pe_lam: float = eqx.field(static=True)
    p_dropsin: float = eqx.field(static=True)

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_k: int,
        mem_len: int,
        *,
        pe_lam: float = 10_000.0,
        p_dropsin: float = 0.0,
        key: PRNGKeyArray,
        dtype=jnp.float32,
    ):
        self.u = jnp.zeros((n_head, d_k), dtype)
        self.v = jnp.zeros((n_head, d_k), dtype)
        self.w_r = (
            jax.random.normal(key, (d_model, n_head * d_k), dtype) * d_model**-0.5
        )
        self.mem_len, self.n_head, self.d_k = mem_len, n_head, d_k
        self.pe_lam, self.p_dropsin = pe_lam, p_dropsin

    def table(
        self, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "dist heads d_k"]:
        """r_d for d = 0..mem_len, shape [mem_len + 1, heads, d_k] (float32)."""
        sin = sinusoids(jnp.arange(self.mem_len + 1), self.w_r.shape[0], self.pe_lam)
        sin = dropout(sin, self.p_dropsin, key)
        r = jnp.dot(
            sin, self.w_r.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        return r.reshape(self.mem_len + 1, self.n_head, self.d_k)


class ScaledSinusoids(eqx.Module):
    """Absolute position embedding `scale * sinusoids(position)` with a learned
    scalar `scale` initialised at 0 (official `ScaledSin`, `pe_abs`): the model
    starts without absolute positions and learns how much to use them."""

    scale: Float[Array, ""]
    d_model: int = eqx.field(static=True)
    pe_lam: float = eqx.field(static=True)

    def __init__(self, d_model: int, *, pe_lam: float):
        self.scale = jnp.zeros((), jnp.float32)
        self.d_model, self.pe_lam = d_model, pe_lam

    def __call__(
        self, positions: Int[Array, " seq"], *, key=None
    ) -> Float[Array, "seq d_model"]:
        """float32 `[seq, d_model]` embeddings of absolute `positions`."""
        table = sinusoids(positions, self.d_model, self.pe_lam)
        return self.scale.astype(jnp.float32) * table
