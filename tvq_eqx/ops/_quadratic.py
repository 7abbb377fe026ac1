"""The definition of VQ attention: O(T^2) dense causal softmax over quantized keys.

This is the form every other implementation is tested against. The variants
that reproduce the linear-time form's gradient estimators and masking modes
(for tests) live in `_reference.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ._common import (
    HIGHEST,
    MASK_VALUE,
    gather_codes,
    quantize,
    relative_bias,
    require_rel_table,
    resolve_mem_len,
)


def causal_distance(t: int):
    """`dist [T, T]`: query i to key j is at distance i - j."""
    pos = jnp.arange(t)
    return pos[:, None] - pos[None, :]


def cache_age_bias(
    t: int, *, block_len: int, mem_len: int, cache_decay: float
) -> Float[Array, "seq seq"]:
    """`age(i, j) * log(cache_decay)` where key j is in query i's cache, else 0.

    Query i (block n = i // L) reads key j through the cache when
    `j < nL - M` (older than its window); j entered the cache at block
    `(j + M) // L + 1`, so its age there is `n - (j + M) // L - 1` blocks.
    A decayed cache weighs each cached key by `cache_decay ** age`."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    n = i // block_len
    in_cache = j < n * block_len - mem_len
    age = n - (j + mem_len) // block_len - 1
    log_decay = jnp.log(jnp.float32(cache_decay))
    return jnp.where(in_cache, age.astype(jnp.float32) * log_decay, 0.0)


def dense_scores(
    query: Float[Array, "batch seq heads d_k"],
    key: Float[Array, "batch seq heads d_k"],
    codebook: Float[Array, "heads codes d_k"],
    *,
    scale: float | Float[Array, ""],
    rel_query: Float[Array, "batch seq heads d_k"] | None = None,
    rel_table: Float[Array, "dist heads d_k"] | None = None,
    quantize_keys: bool = True,
    key_grad: Bool[Array, "seq seq"] | None = None,
) -> Float[Array, "batch heads seq seq"]:
    """Scores `scale q_i . k^_j (+ relative bias)`, float32, unmasked.

    `k^` is the straight-through quantized key (`quantize_keys=False`: the raw
    key). `key_grad` (default: everywhere) restricts which scores pass the
    straight-through gradient to `k_j`; the value is the same.
    """

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
        scores = scores + (st if key_grad is None else jnp.where(key_grad, st, 0.0))
    else:
        scores = dot(query, key)
    scores = scale * scores
    if rel_query is not None:
        dist = causal_distance(query.shape[1])
        scores = scores + jnp.swapaxes(
            relative_bias(rel_query, require_rel_table(rel_table), dist), 1, 2
        )
    return scores


def vq_attention_quadratic(
    query: Float[Array, "batch seq heads d_k"],
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    codebook: Float[Array, "heads codes d_k"],
    *,
    scale: float | Float[Array, ""],
    rel_query: Float[Array, "batch seq heads d_k"] | None = None,
    rel_table: Float[Array, "dist heads d_k"] | None = None,
    quantize_keys: bool = True,
    cache_decay: float = 1.0,
    block_len: int | None = None,
    mem_len: int | None = None,
    doc_starts: Bool[Array, "batch seq"] | None = None,
) -> Float[Array, "batch seq heads d_v"]:
    """Dense causal attention over straight-through quantized keys.

    `o_i = softmax_j<=i(scale q_i . k^_j + b_ij) v`, with `k^_j` the nearest
    codeword of `k_j` (straight-through gradient to `k_j`) and `b_ij =
    rel_query_i . rel_table[i - j]` for `i - j < len(rel_table)`, else 0.
    `quantize_keys=False`: plain causal attention on the raw keys (the "full"
    baseline); `codebook` is then unused.

    `cache_decay` (gamma in (0, 1], default 1: none) defines the decayed
    cache: key j, read by query i through the cache (older than i's window of
    `mem_len` keys before its block of `block_len`, default `block_len`), gets
    the extra bias `age * log(gamma)` (`cache_age_bias`), i.e. weight
    `gamma ** age`. Then the output depends on `block_len` and `mem_len`.

    `doc_starts` (bool `[batch, seq]`, packed documents): query i attends
    only to keys of its own document, i.e. with no document start in
    `(j, i]`.
    """
    scores = dense_scores(
        query,
        key,
        codebook,
        scale=scale,
        rel_query=rel_query,
        rel_table=rel_table,
        quantize_keys=quantize_keys,
    )
    if cache_decay != 1.0:
        if block_len is None:
            raise ValueError(
                "cache_decay != 1 needs block_len (the decay is per block)"
            )
        age_bias = cache_age_bias(
            query.shape[1],
            block_len=block_len,
            mem_len=resolve_mem_len(mem_len, None, block_len),
            cache_decay=cache_decay,
        )
        scores = scores + age_bias[None, None]
    keep = (causal_distance(query.shape[1]) >= 0)[None, None]
    if doc_starts is not None:
        doc = jnp.cumsum(doc_starts.astype(jnp.int32), axis=1)  # [B, T]
        same = doc[:, :, None] == doc[:, None, :]
        keep = keep & same[:, None]
    probs = jax.nn.softmax(jnp.where(keep, scores, MASK_VALUE), axis=-1)
    out = jnp.einsum(
        "bhij,bjhv->bihv", probs, value.astype(jnp.float32), precision=HIGHEST
    )
    return out.astype(value.dtype)
