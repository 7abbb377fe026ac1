"""The definition of VQ attention: O(T^2) dense causal softmax over quantized keys.

This is the form every other implementation is tested against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._common import (
    HIGHEST,
    MASK_VALUE,
    gather_codes,
    quantize,
)


def relative_bias_dense(
    rel_query: Float[Array, "batch seq heads d_k"],
    rel_table: Float[Array, "dist heads d_k"],
) -> Float[Array, "batch heads seq seq"]:
    """b[i, j] = rel_query_i . rel_table[i - j] for 0 <= i - j <= mem_len, else 0."""
    t = rel_query.shape[1]
    mem_len = rel_table.shape[0] - 1
    proj = jnp.einsum(
        "bihk,dhk->bhid",
        rel_query,
        rel_table,
        precision=HIGHEST,
        preferred_element_type=jnp.float32,
    )
    dist = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    in_range = (dist >= 0) & (dist <= mem_len)
    idx = jnp.broadcast_to(jnp.clip(dist, 0, mem_len), proj.shape[:2] + (t, t))
    return jnp.where(in_range, jnp.take_along_axis(proj, idx, axis=-1), 0.0)


def vq_attention_quadratic(
    query: Float[Array, "batch seq heads d_k"],
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    codebook: Float[Array, "heads codes d_k"],
    *,
    scale: float,
    rel_query: Float[Array, "batch seq heads d_k"] | None = None,
    rel_table: Float[Array, "dist heads d_k"] | None = None,
    block_len: int | None = None,
    key_grad_window: bool = False,
    value_grad_window: bool = False,
    use_cache: bool = True,
    quantize_keys: bool = True,
) -> Float[Array, "batch seq heads d_v"]:
    """Dense causal attention over straight-through quantized keys.

    **Arguments:**

    - `block_len`: only needed by the two options below.
    - `key_grad_window`: if True, the straight-through gradient reaches `k_j` only
      from queries in the same or the next block (the linear-time form's
      estimator); the forward value is unchanged.
    - `value_grad_window`: if True, values receive gradient only from queries in
      the same or the next block (the linear-time form with `cache_grad=False`).
    - `use_cache`: if False, keys older than the previous block are masked out
      (the "window" baseline, official `agg_cache=0`).
    - `quantize_keys`: if False, plain causal attention on the raw keys (the
      "full" baseline); `codebook` is then unused.
    """
    t = query.shape[1]
    pos = jnp.arange(t)
    causal = pos[:, None] >= pos[None, :]
    if block_len is not None:
        near = (pos[:, None] // block_len - pos[None, :] // block_len) <= 1
    elif key_grad_window or value_grad_window or not use_cache:
        raise ValueError("key/value_grad_window and use_cache=False need block_len")

    def dot(a, b):
        return jnp.einsum(
            "bihk,bjhk->bhij",
            a,
            b,
            precision=HIGHEST,
            preferred_element_type=jnp.float32,
        )

    if quantize_keys:
        codeword = gather_codes(codebook.astype(key.dtype), quantize(key, codebook))
        scores = dot(query, jax.lax.stop_gradient(codeword))
        # Straight-through term: exactly zero in value, carries d(score)/dk.
        st = dot(query, key - jax.lax.stop_gradient(key))
        scores = scores + (jnp.where(near, st, 0.0) if key_grad_window else st)
    else:
        scores = dot(query, key)
    scores = scale * scores
    if rel_query is not None:
        scores = scores + relative_bias_dense(rel_query, rel_table)
    keep = causal if use_cache else causal & near
    scores = jnp.where(keep, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    v32 = value.astype(jnp.float32)

    def mix(p, v):
        return jnp.einsum("bhij,bjhv->bihv", p, v, precision=HIGHEST)

    if value_grad_window:
        # Same value; the (exactly zero) second term carries the window gradient.
        out = mix(probs, jax.lax.stop_gradient(v32)) + mix(
            jnp.where(near, probs, 0.0), v32 - jax.lax.stop_gradient(v32)
        )
    else:
        out = mix(probs, v32)
    return out.astype(value.dtype)
