"""Linear-time VQ attention in pure jnp: the chunked (block-parallel) form,
on the blockwise core (`_blockwise`): every block attends its window and the
codebook (biased by log count, valued by the cached mean) under one softmax,
all blocks in parallel; O(T * (codes + M + L)) memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._blockwise import _blocks, block_windows, next_state, prologue, window_offsets
from ._common import (
    HIGHEST,
    MASK_VALUE,
    VQAttentionState,
    log_count_bias,
    relative_bias,
    require_rel_table,
    resolve_mem_len,
)
from ._padding import pad_to_blocks

sg = jax.lax.stop_gradient


def vq_attention_xla(
    query: Float[Array, "batch seq heads d_k"],
    key: Float[Array, "batch seq heads d_k"],
    value: Float[Array, "batch seq heads d_v"],
    codebook: Float[Array, "heads codes d_k"],
    *,
    block_len: int,
    scale: float | Float[Array, ""],
    state: VQAttentionState | None = None,
    rel_query: Float[Array, "batch seq heads d_k"] | None = None,
    rel_table: Float[Array, "dist heads d_k"] | None = None,
    use_cache: bool = True,
    cache_grad: bool = True,
    mem_len: int | None = None,
    sliding_window: bool | None = None,
    state_keys: str = "codewords",
    cache_decay: float = 1.0,
    doc_starts: Bool[Array, "batch seq"] | None = None,
    codes: Int[Array, "batch seq heads"] | None = None,
) -> tuple[Float[Array, "batch seq heads d_v"], VQAttentionState]:
    """Linear-time VQ attention; returns the output and the state after `seq`.

    `state=None` means an empty history; `mem_len` (M, default: the state's
    window, else `block_len`) is the number of keys before each block that it
    attends directly. `cache_grad=False` (official `grad_thru_cache=False`):
    no gradient through anything carried between blocks (window keys and
    values of earlier blocks, cached means, the incoming and outgoing state).
    `use_cache=False` drops the cache; with `sliding_window` (default: `not
    use_cache`) a query then sees only keys at distance <= M (official
    `agg_cache=False`), otherwise its whole window. `state_keys`: see `extend`.
    `cache_decay` (gamma): see `_summaries`. `doc_starts` (bool `[B, T]`,
    packed documents): a query sees only keys of its own document (from the
    last start at or before it; none: the history's document goes on).
    `codes` (int32 `[B, T, H]`): the keys' codes, if already computed.

    Any `seq`: a segment that is not whole blocks is padded at its end and
    carries the state of its real tokens (`pad_to_blocks`).
    """
    b, t, h, _ = query.shape
    d_v = value.shape[-1]
    L = block_len
    if sliding_window is None:
        sliding_window = not use_cache
    if t % L:
        # Not whole blocks: padded at the end, the state of the real tokens.
        return pad_to_blocks(
            vq_attention_xla, query, key, value, codebook, block_len=L,
            scale=scale, state=state, rel_query=rel_query, rel_table=rel_table,
            use_cache=use_cache, cache_grad=cache_grad,
            mem_len=resolve_mem_len(mem_len, state, L),
            sliding_window=sliding_window, state_keys=state_keys,
            cache_decay=cache_decay, doc_starts=doc_starts, codes=codes,
        )  # fmt: skip
    pro = prologue(
        key,
        value,
        codebook,
        state,
        block_len=L,
        mem_len=resolve_mem_len(mem_len, state, L),
        cache_grad=cache_grad,
        state_keys=state_keys,
        cache_decay=cache_decay,
        doc_starts=doc_starts,
        codes=codes,
    )
    state, ext = pro.state, pro.ext
    M = state.window_code.shape[1]
    q_start = None
    if ext.last_start is not None:
        q_start = _blocks(ext.last_start[:, M:], L)  # [B, N, L]
    q_blk = _blocks(query, L)  # [B, N, L, H, K]
    win_scores, v_win = _window_scores(
        q_blk, ext, q_start, scale=scale, rel_query=rel_query, rel_table=rel_table,
        mem_len=M, block_len=L, cache_grad=cache_grad,
        sliding=not use_cache and sliding_window,
    )  # fmt: skip
    cache_scores = None
    if use_cache:
        cache_scores = _cache_scores(q_blk, pro, q_start, scale=scale, block_len=L)
    out = _softmax_combine(
        win_scores, v_win, cache_scores, None if not use_cache else pro.block_mean
    )
    out = out.reshape(b, t, h, d_v).astype(value.dtype)
    return out, next_state(
        state, ext, pro.new_count, _present(pro.new_mean), cache_grad=cache_grad
    )


def _window_scores(
    q_blk, ext, q_start, *, scale, rel_query, rel_table, mem_len: int,
    block_len: int, cache_grad: bool, sliding: bool,
):  # fmt: skip
    """Each block's queries against its window (the `mem_len` keys before it
    and its own block), masked (causal, padding, `sliding`: distance <=
    `mem_len`, other documents): scores `[B, N, L, H, W]` and the window's
    values `[B, N, W, H, V]`."""
    M, L = mem_len, block_len
    t = q_blk.shape[1] * L
    k_win = block_windows(ext.khat, mem_len=M, block_len=L)  # [B, N, W, H, K]
    v_win = block_windows(ext.value, mem_len=M, block_len=L)  # [B, N, W, H, V]
    valid_win = block_windows(ext.valid, mem_len=M, block_len=L)  # [B, N, W]
    if not cache_grad:
        # Columns before the block come from the state between blocks: constant.
        k_win = jnp.concatenate([sg(k_win[:, :, :M]), k_win[:, :, M:]], axis=2)
        v_win = jnp.concatenate([sg(v_win[:, :, :M]), v_win[:, :, M:]], axis=2)
    win_scores = scale * jnp.einsum(
        "bnrhk,bnchk->bnrhc",
        q_blk,
        k_win,
        precision=HIGHEST,
        preferred_element_type=jnp.float32,
    )
    dist = window_offsets(M, L)  # [L, W]
    if rel_query is not None:
        win_scores = win_scores + relative_bias(
            _blocks(rel_query, L), require_rel_table(rel_table), dist
        )
    keep = dist >= 0
    if sliding:
        keep = keep & (dist <= M)
    keep = keep[None, None] & valid_win[:, :, None, :]  # [B, N, L, W]
    if q_start is not None:
        # Keys of earlier documents: before the query's last start.
        k_idx = block_windows(jnp.arange(M + t)[None], mem_len=M, block_len=L)
        keep = keep & (k_idx[:, :, None, :] >= q_start[..., None])
    return jnp.where(keep[:, :, :, None, :], win_scores, MASK_VALUE), v_win


def _cache_scores(q_blk, pro, q_start, *, scale, block_len: int):
    """Each block's queries against every codeword of the cache before its
    window, with the log-count bias (`[B, N, L, H, S]`); masked for queries
    whose document starts after the cache's keys."""
    L = block_len
    cache_scores = scale * jnp.einsum(
        "bnrhk,hsk->bnrhs",
        q_blk,
        pro.codebook,
        precision=HIGHEST,
        preferred_element_type=jnp.float32,
    )
    cache_scores = cache_scores + log_count_bias(pro.block_count)[:, :, None]
    if q_start is not None:
        # The cache holds keys before the block's window (ext < nL): none
        # of the query's document if its last start is at or after nL.
        n_first = (jnp.arange(q_blk.shape[1]) * L)[None, :, None]
        sees = (q_start < n_first)[..., None, None]  # [B, N, L, 1, 1]
        cache_scores = jnp.where(sees, cache_scores, MASK_VALUE)
    return cache_scores


def _softmax_combine(win_scores, v_win, cache_scores, cache_means):
    """One softmax over the window's and the cache's scores (`cache_scores`
    None: the window alone), applied to the window's values and the cache's
    means: float32 `[B, N, L, H, V]`."""
    max_score = jnp.max(win_scores, axis=-1)  # [B, N, L, H]
    if cache_scores is not None:
        max_score = jnp.maximum(max_score, jnp.max(cache_scores, axis=-1))
    # The max is a constant shift (no gradient needed).
    max_score = sg(max_score)[..., None]
    win_p = jnp.exp(win_scores - max_score)
    denom = jnp.sum(win_p, axis=-1)
    out = jnp.einsum(
        "bnrhc,bnchv->bnrhv", win_p, v_win.astype(jnp.float32), precision=HIGHEST
    )
    if cache_scores is not None:
        cache_p = jnp.exp(cache_scores - max_score)
        denom = denom + jnp.sum(cache_p, axis=-1)
        out = out + jnp.einsum(
            "bnrhs,bnhsv->bnrhv",
            cache_p,
            _present(cache_means).astype(jnp.float32),
            precision=HIGHEST,
        )
    return out / denom[..., None]


def _present(x):
    """`x`, known not None (`prologue` computes the means by default)."""
    assert x is not None
    return x
