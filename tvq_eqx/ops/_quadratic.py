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
    mem_len: int | None = None,
    key_grad_window: bool = False,
    cache_grad: bool = True,
    use_cache: bool = True,
    sliding_window: bool | None = None,
    quantize_keys: bool = True,
) -> Float[Array, "batch seq heads d_v"]:
    """Dense causal attention over straight-through quantized keys.

    The window of a query in block n (blocks of `block_len` = L) is the last
    `mem_len` (M, default L) keys before the block plus the block itself: key j
    is in it iff `j >= n L - M`. The options below reproduce the linear-time
    form's gradient estimators and masks; the forward value of the first two is
    the plain definition's.

    - `key_grad_window`: the straight-through gradient reaches `k_j` only from
      queries whose window holds `j` (the linear-time form's estimator).
    - `cache_grad=False` (official `grad_thru_cache=False`): keys and values
      get gradient only from queries of their own block (the carried state is
      a constant between blocks).
    - `use_cache=False`: keys outside the window are masked; additionally, with
      `sliding_window` (default: `not use_cache`), a query sees only keys at
      distance `i - j <= M` (official `agg_cache=False`). `sliding_window=False`
      with `use_cache=False` is the block-granular window baseline.
    - `quantize_keys=False`: plain causal attention on the raw keys (the "full"
      baseline); `codebook` is then unused.

    `block_len` is needed by every option except `use_cache=False` with the
    sliding window (which needs only `mem_len`).
    """
    if sliding_window is None:
        sliding_window = not use_cache
    if use_cache and sliding_window:
        raise ValueError("sliding_window=True needs use_cache=False")
    needs_blocks = (
        key_grad_window or not cache_grad or not (use_cache or sliding_window)
    )
    if needs_blocks and block_len is None:
        raise ValueError(
            "key_grad_window, cache_grad=False and the block window "
            "(use_cache=False, sliding_window=False) need block_len"
        )
    if mem_len is None:
        if block_len is None and not use_cache:
            raise ValueError("use_cache=False needs mem_len (or block_len)")
        mem_len = block_len
    t = query.shape[1]
    pos = jnp.arange(t)
    i, j = pos[:, None], pos[None, :]
    causal = i >= j
    if block_len is not None:
        in_window = j >= (i // block_len) * block_len - mem_len
        same_block = (i // block_len) == (j // block_len)

    def dot(a, b):
        return jnp.einsum(
            "bihk,bjhk->bhij",
            a,
            b,
            precision=HIGHEST,
            preferred_element_type=jnp.float32,
        )

    key_grad = None  # None: every causal query
    if key_grad_window:
        key_grad = in_window
    if not cache_grad:
        key_grad = same_block
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
        scores = scores + relative_bias_dense(rel_query, rel_table)
    keep = causal
    if not use_cache:
        keep = keep & ((i - j <= mem_len) if sliding_window else in_window)
    scores = jnp.where(keep, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    v32 = value.astype(jnp.float32)

    def mix(p, v):
        return jnp.einsum("bhij,bjhv->bihv", p, v, precision=HIGHEST)

    if not cache_grad:
        # Same value; the (exactly zero) second term carries the in-block gradient.
        out = mix(probs, jax.lax.stop_gradient(v32)) + mix(
            jnp.where(same_block, probs, 0.0), v32 - jax.lax.stop_gradient(v32)
        )
    else:
        out = mix(probs, v32)
    return out.astype(value.dtype)
