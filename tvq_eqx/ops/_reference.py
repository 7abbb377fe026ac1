"""Dense (O(T^2)) references for the linear-time form's gradient estimators
and masking modes: what the tests compare the xla and pallas forms against.

`vq_attention_quadratic` is the definition; `vq_attention_reference` adds the
options that change which scores pass gradient (`key_grad_window`,
`cache_grad=False`) or which keys are seen (`use_cache=False`), all in the
dense form so each is a visibly correct mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._common import HIGHEST, MASK_VALUE, resolve_mem_len
from ._quadratic import causal_distance, dense_scores


def vq_attention_reference(
    query: Float[Array, "batch seq heads d_k"],
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    codebook: Float[Array, "heads codes d_k"],
    *,
    scale: float | Float[Array, ""],
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
    """`vq_attention_quadratic` with the linear-time form's options.

    The window of a query in block n (blocks of `block_len` = L) is the last
    `mem_len` (M, default L) keys before the block plus the block itself: key j
    is in it iff `j >= n L - M`. The forward value of the first two options is
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
    - `quantize_keys=False`: raw keys (the "full" baseline).

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
    if mem_len is None and block_len is None and not use_cache:
        raise ValueError("use_cache=False needs mem_len (or block_len)")
    if block_len is not None:  # (without blocks: the given mem_len alone)
        mem_len = resolve_mem_len(mem_len, None, block_len)
    t = query.shape[1]
    pos = jnp.arange(t)
    i, j = pos[:, None], pos[None, :]
    if block_len is not None:
        assert mem_len is not None  # defaults to block_len above
        in_window = j >= (i // block_len) * block_len - mem_len
        same_block = (i // block_len) == (j // block_len)

    key_grad = None  # None: every causal query
    if key_grad_window:
        key_grad = in_window
    if not cache_grad:
        key_grad = same_block
    scores = dense_scores(
        query,
        key,
        codebook,
        scale=scale,
        rel_query=rel_query,
        rel_table=rel_table,
        quantize_keys=quantize_keys,
        key_grad=key_grad,
    )
    keep = causal_distance(t) >= 0
    if not use_cache:
        assert mem_len is not None  # use_cache=False required it above
        keep = keep & ((i - j <= mem_len) if sliding_window else in_window)
    probs = jax.nn.softmax(jnp.where(keep, scores, MASK_VALUE), axis=-1)
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
