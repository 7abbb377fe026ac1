"""Linear-time VQ attention in pure jnp: the chunked (block-parallel) form.

Per block n (length L) every query attends, under one softmax, to
  [codebook rows, biased by log(count) and valued by the cached mean]  (blocks <= n-2)
  [previous block]                                                    (causal window)
  [current block, causal]
The cache of block n is an exclusive prefix sum of per-block code histograms and
value sums, so all blocks run in parallel with no loop over blocks; memory is
O(T * (codes + 2 L)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._common import (
    HIGHEST,
    MASK_VALUE,
    VQAttentionState,
    gather_codes,
    log_count_bias,
    quantize,
    straight_through,
)

sg = jax.lax.stop_gradient


def _blocks(x, block_len):
    """[B, T, ...] -> [B, N, L, ...]."""
    b, t = x.shape[:2]
    return x.reshape(b, t // block_len, block_len, *x.shape[2:])


def _shift_in(first, blocks):
    """Blocks of the previous step: block n -> block n-1, with `first` as block -1."""
    return jnp.concatenate([first[:, None], blocks[:, :-1]], axis=1)


def window_relative_bias(
    rel_query: Float[Array, "batch blocks block heads d_k"],
    rel_table: Float[Array, "dist heads d_k"],
) -> Float[Array, "batch blocks block heads window"]:
    """Bias of query r (in block n) to window key c (c < L: block n-1, else block n).

    The distance is L + r - c; the bias is rel_query . rel_table[dist] for
    0 <= dist <= mem_len and 0 otherwise.
    """
    block_len = rel_query.shape[2]
    mem_len = rel_table.shape[0] - 1
    proj = jnp.einsum(
        "bnrhk,dhk->bnrhd",
        rel_query,
        rel_table,
        precision=HIGHEST,
        preferred_element_type=jnp.float32,
    )
    r = jnp.arange(block_len)[:, None]
    c = jnp.arange(2 * block_len)[None, :]
    dist = block_len + r - c  # [L, 2L]
    in_range = (dist >= 0) & (dist <= mem_len)
    idx = jnp.clip(dist, 0, mem_len)[None, None, :, None, :]
    idx = jnp.broadcast_to(idx, proj.shape[:4] + (2 * block_len,))
    bias = jnp.take_along_axis(proj, idx, axis=-1)
    return jnp.where(in_range[None, None, :, None, :], bias, 0.0)


def block_summaries(
    codes, value, state: VQAttentionState, *, n_code: int, block_len: int
):
    """The compressed cache seen by every block, and the cache after the last.

    Per-block code histograms `h_m = onehot(z_m)^T 1` and value sums
    `A_m = onehot(z_m)^T V_m` for blocks -1..N-1 (block -1 is the state's
    previous block), then an exclusive prefix over blocks starting from the
    state's cache: block n sees blocks <= n-2.

    Returns `(blk_count [B, N, H, S] f32, blk_mean [B, N, H, S, V],
    new_count [B, H, S] f32, new_mean [B, H, S, V])`, means in `value.dtype`.
    """
    b = codes.shape[0]
    n_blk = codes.shape[1] // block_len
    z_blk = _blocks(codes, block_len)
    v_blk = _blocks(value, block_len)
    z_all = jnp.concatenate([state.prev_code[:, None], z_blk], axis=1)
    v_all = jnp.concatenate(
        [state.prev_value[:, None].astype(value.dtype), v_blk], axis=1
    )
    valid_all = jnp.concatenate(
        [state.prev_valid[:, None], jnp.ones((b, n_blk), bool)], 1
    )
    onehot = jax.nn.one_hot(z_all, n_code, dtype=jnp.float32)  # [B, N+1, L, H, S]
    onehot = onehot * valid_all[:, :, None, None, None]
    counts = jnp.sum(onehot, axis=2)  # [B, N+1, H, S]
    if value.dtype in (jnp.bfloat16, jnp.float16):
        # 0/1 and the values are exact in the value dtype and products are
        # accumulated in float32: the same sums as a float32 einsum (up to
        # summation order), on the fast low-precision matmul path.
        sums = jnp.einsum(
            "bnlhs,bnlhv->bnhsv",
            onehot.astype(value.dtype),
            v_all,
            preferred_element_type=jnp.float32,
        )
    else:
        sums = jnp.einsum(
            "bnlhs,bnlhv->bnhsv", onehot, v_all.astype(jnp.float32), precision=HIGHEST
        )

    def prefix(x, total0):
        inclusive = jnp.cumsum(x, axis=1)
        before = jnp.concatenate(
            [jnp.zeros_like(x[:, :1]), inclusive[:, : n_blk - 1]], 1
        )
        return total0[:, None] + before, total0 + inclusive[:, n_blk - 1]

    count0 = state.cache_count
    sum0 = state.cache_mean.astype(jnp.float32) * count0[..., None]
    blk_count, new_count = prefix(counts, count0)
    blk_sum, new_sum = prefix(sums, sum0)
    blk_mean = (blk_sum / jnp.maximum(blk_count, 1.0)[..., None]).astype(value.dtype)
    new_mean = (new_sum / jnp.maximum(new_count, 1.0)[..., None]).astype(value.dtype)
    return blk_count, blk_mean, new_count, new_mean


def next_state(
    state: VQAttentionState, last_codes, last_values, cache_count, cache_mean
):
    """The state after a segment: its last block, and the cache of all older ones
    (dtypes kept from the incoming state)."""
    return VQAttentionState(
        prev_code=last_codes,
        prev_value=last_values.astype(state.prev_value.dtype),
        prev_valid=jnp.ones_like(state.prev_valid),
        cache_count=cache_count,
        cache_mean=cache_mean.astype(state.cache_mean.dtype),
    )


def vq_attention_xla(
    query: Float[Array, "batch seq heads d_k"],
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    codebook: Float[Array, "heads codes d_k"],
    *,
    block_len: int,
    scale: float,
    state: VQAttentionState | None = None,
    rel_query: Float[Array, "batch seq heads d_k"] | None = None,
    rel_table: Float[Array, "dist heads d_k"] | None = None,
    use_cache: bool = True,
    cache_grad: bool = True,
) -> tuple[Float[Array, "batch seq heads d_v"], VQAttentionState]:
    """Linear-time VQ attention; returns the output and the state after `seq`.

    `state=None` means an empty history. With `cache_grad=False` no gradient
    flows into values through the compressed cache (official
    `grad_thru_cache=False`). `use_cache=False` drops the cache (window-only
    baseline).
    """
    b, t, h, _ = query.shape
    n_code = codebook.shape[1]
    d_v = value.shape[-1]
    n_blk = t // block_len
    if state is None:
        state = VQAttentionState.empty(
            b, block_len=block_len, heads=h, codes=n_code, d_v=d_v, dtype=value.dtype
        )

    codes = quantize(key, codebook)  # [B, T, H]
    codebook = sg(codebook).astype(key.dtype)
    khat = straight_through(key, gather_codes(codebook, codes))

    q_blk = _blocks(query, block_len)  # [B, N, L, H, K]
    k_blk = _blocks(khat, block_len)
    v_blk = _blocks(value, block_len)  # [B, N, L, H, V]
    z_blk = _blocks(codes, block_len)  # [B, N, L, H]

    # Previous block of every block; block -1 comes from the carried state.
    prev_khat = gather_codes(codebook, state.prev_code)
    k_prev = _shift_in(prev_khat, k_blk)
    v_prev = _shift_in(state.prev_value.astype(value.dtype), v_blk)
    prev_valid = jnp.concatenate(
        [state.prev_valid[:, None], jnp.ones((b, n_blk - 1), bool)], axis=1
    )  # [B, N]

    k_win = jnp.concatenate([k_prev, k_blk], axis=2)  # [B, N, 2L, H, K]
    v_win = jnp.concatenate([v_prev, v_blk], axis=2)
    win_scores = scale * jnp.einsum(
        "bnrhk,bnchk->bnrhc",
        q_blk,
        k_win,
        precision=HIGHEST,
        preferred_element_type=jnp.float32,
    )
    if rel_query is not None:
        win_scores = win_scores + window_relative_bias(
            _blocks(rel_query, block_len), rel_table
        )
    r = jnp.arange(block_len)[:, None]
    c = jnp.arange(2 * block_len)[None, :]
    causal = c - block_len <= r  # [L, 2L]
    from_prev = c < block_len
    keep = causal[None, None] & (~from_prev[None, None] | prev_valid[:, :, None, None])
    win_scores = jnp.where(keep[:, :, :, None, :], win_scores, MASK_VALUE)
    max_score = jnp.max(win_scores, axis=-1)  # [B, N, L, H]

    if use_cache:
        blk_count, blk_mean, new_count, new_mean = block_summaries(
            codes, value, state, n_code=n_code, block_len=block_len
        )
        if not cache_grad:
            blk_mean = sg(blk_mean)
        cache_scores = scale * jnp.einsum(
            "bnrhk,hsk->bnrhs",
            q_blk,
            codebook,
            precision=HIGHEST,
            preferred_element_type=jnp.float32,
        )
        cache_scores = cache_scores + log_count_bias(blk_count)[:, :, None]
        max_score = jnp.maximum(max_score, jnp.max(cache_scores, axis=-1))
    else:
        new_count, new_mean = state.cache_count, state.cache_mean

    # One softmax over both parts; the max is a constant shift (no gradient needed).
    max_score = sg(max_score)[..., None]
    win_p = jnp.exp(win_scores - max_score)
    denom = jnp.sum(win_p, axis=-1)
    out = jnp.einsum(
        "bnrhc,bnchv->bnrhv", win_p, v_win.astype(jnp.float32), precision=HIGHEST
    )
    if use_cache:
        cache_p = jnp.exp(cache_scores - max_score)
        denom = denom + jnp.sum(cache_p, axis=-1)
        out = out + jnp.einsum(
            "bnrhs,bnhsv->bnrhv",
            cache_p,
            blk_mean.astype(jnp.float32),
            precision=HIGHEST,
        )
    out = (out / denom[..., None]).reshape(b, t, h, d_v).astype(value.dtype)

    return out, next_state(state, z_blk[:, -1], v_blk[:, -1], new_count, new_mean)
