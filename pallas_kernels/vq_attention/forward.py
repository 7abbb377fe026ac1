"""Fused forward kernel: one online softmax over
[codebook rows, log-count bias, cached means] + [previous block] + [current
block, causal], float32 accumulation; writes the output and the per-row
log-sum-exp (the backward's residual).

Layout (BH = batch*heads flattened, head = bh % H):
  q           [BH, T, K]       queries
  k_ext       [BH, T + L, K]   quantized keys; ext block 0 is the state's
                               previous block, ext block n+1 is block n
  v_ext       [BH, T + L, V]   values, same extension
  prev_valid  [BH, 1, 1] f32   1 if the state's previous block is valid
  codebook    [H, S, K]        (cache only)
  cache_bias  [BH, N, 1, S]    log count per code and block, MASK for empty codes
  cache_mean  [BH, N, S, V]    cached mean value per code and block
  window_bias [BH, T, 2L] f32  bias of query row t to window column c
                               (c < L: previous block, else current block)
  key_from    [BH, T, 1] i32   packed documents: the first window column
                               query t may see (its document's start); the
                               cache only where it is negative
Absent inputs (no cache, no bias) are passed as None, and the kernel receives
None for their refs. Grid: (BH, T / bq, V / bv).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._common import (
    MASK_VALUE,
    Static,
    document_mask,
    dot_nn,
    dot_nt,
    fori,
    iota,
    spec_if_present,
    tile,
    window_mask,
)
from ._platform import pallas_call


def _online_update(carry, s, v, precision):
    """Fold scores s [bq, bk] (f32) and values v [bk, bv] into (m, denom, acc)."""
    m, denom, acc = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [bq, 1]
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    denom = alpha * denom + jnp.sum(p, axis=1, keepdims=True)
    acc = alpha * acc + dot_nn(p.astype(v.dtype), v, precision)
    return m_new, denom, acc


def _fwd_kernel(
    q_ref,
    prev_key_ref,
    key_ref,
    prev_value_ref,
    value_ref,
    prev_valid_ref,
    codebook_ref,
    cache_bias_ref,
    cache_mean_ref,
    window_bias_ref,
    key_from_ref,
    out_ref,
    lse_ref,
    *,
    st: Static,
):
    """One (row, query tile, value tile) program. `prev_*`: the block before
    the query's block (the state's window for block 0), `key_ref` /
    `value_ref`: the query's own block; the cache refs are None without the
    cache, `window_bias_ref` None without the relative bias."""
    t = st.tiles

    bq, bk, bc, bv, L = t.block_q, t.block_k, t.block_code, t.block_v, t.block_len
    prec = st.precision
    qi = pl.program_id(1)
    q_per_blk = L // bq
    n = qi // q_per_blk
    r0 = (qi % q_per_blk) * bq
    q = q_ref[...]  # [bq, K]
    key_from = None if key_from_ref is None else key_from_ref[...]  # [bq, 1]
    # Packed documents: does the row's document reach back into the cache?
    sees_cache = None if key_from is None else key_from < 0  # [bq, 1]

    carry = (
        jnp.full((bq, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((bq, 1), jnp.float32),
        jnp.zeros((bq, bv), jnp.float32),
    )

    if st.use_cache:

        def code_step(j, carry):
            sl = tile(j, bc)
            s = st.scale * dot_nt(q, codebook_ref[sl, :], prec)
            s = s + cache_bias_ref[:, sl]
            if sees_cache is not None:
                s = jnp.where(sees_cache, s, MASK_VALUE)
            return _online_update(carry, s, cache_mean_ref[sl, :], prec)

        carry = fori(0, t.codes // bc, code_step, carry)

    prev_valid = (n > 0) | (prev_valid_ref[...] > 0)  # [1, 1]

    rows = r0 + iota((bq, bk), 0)

    def prev_step(j, carry):
        sl = tile(j, bk)
        s = st.scale * dot_nt(q, prev_key_ref[sl, :], prec)
        if window_bias_ref is not None:
            s = s + window_bias_ref[:, sl]
        s = jnp.where(prev_valid, s, MASK_VALUE)
        cols = j * bk + iota((bq, bk), 1)
        if st.window_len is not None:
            s = window_mask(s, rows, cols - L, st.window_len)
        if key_from is not None:
            s = document_mask(s, cols, key_from)
        return _online_update(carry, s, prev_value_ref[sl, :], prec)

    carry = fori(0, L // bk, prev_step, carry)

    def cur_step(j, carry):
        sl = tile(j, bk)
        s = st.scale * dot_nt(q, key_ref[sl, :], prec)
        if window_bias_ref is not None:
            s = s + window_bias_ref[:, tile(j, bk, L)]
        cols = j * bk + iota((bq, bk), 1)
        s = jnp.where(cols <= rows, s, MASK_VALUE)
        if st.window_len is not None:
            s = window_mask(s, rows, cols, st.window_len)
        if key_from is not None:
            s = document_mask(s, cols + L, key_from)
        return _online_update(carry, s, value_ref[sl, :], prec)

    n_cur = (r0 + bq + bk - 1) // bk  # key tiles at or below the diagonal
    if L // bk == 1:
        n_cur = 1
    carry = fori(0, n_cur, cur_step, carry)

    m, denom, acc = carry
    out_ref[...] = (acc / denom).astype(out_ref.dtype)
    lse_ref[...] = m + jnp.log(denom)


def forward(
    st: Static,
    q,
    k_ext,
    v_ext,
    prev_valid,
    codebook,
    cache_bias,
    cache_mean,
    window_bias,
    key_from=None,
):
    """Returns (out [BH, T, V], lse [BH, T, 1] float32); the cache operands,
    `window_bias` and `key_from` may be None (module docstring)."""
    t = st.tiles
    bh, seq, d_k = q.shape
    L, bq, bv = t.block_len, t.block_q, t.block_v
    n_v = t.d_v // bv
    q_per_blk = L // bq
    H = st.num_heads

    in_specs = [
        pl.BlockSpec((None, bq, d_k), lambda b, i, v: (b, i, 0)),
        # k_ext and v_ext twice: the block before the query tile's block, and
        # its own block (ext block n + 1).
        pl.BlockSpec((None, L, d_k), lambda b, i, v: (b, i // q_per_blk, 0)),
        pl.BlockSpec((None, L, d_k), lambda b, i, v: (b, i // q_per_blk + 1, 0)),
        pl.BlockSpec((None, L, bv), lambda b, i, v: (b, i // q_per_blk, v)),
        pl.BlockSpec((None, L, bv), lambda b, i, v: (b, i // q_per_blk + 1, v)),
        pl.BlockSpec((None, 1, 1), lambda b, i, v: (b, 0, 0)),
        spec_if_present(
            codebook,
            pl.BlockSpec((None, t.codes, d_k), lambda b, i, v: (b % H, 0, 0)),
        ),
        spec_if_present(
            cache_bias,
            pl.BlockSpec(
                (None, None, 1, t.codes), lambda b, i, v: (b, i // q_per_blk, 0, 0)
            ),
        ),
        spec_if_present(
            cache_mean,
            pl.BlockSpec(
                (None, None, t.codes, bv), lambda b, i, v: (b, i // q_per_blk, 0, v)
            ),
        ),
        spec_if_present(
            window_bias,
            pl.BlockSpec((None, bq, 2 * L), lambda b, i, v: (b, i, 0)),
        ),
        spec_if_present(
            key_from, pl.BlockSpec((None, bq, 1), lambda b, i, v: (b, i, 0))
        ),
    ]
    args = (
        q,
        k_ext,
        k_ext,
        v_ext,
        v_ext,
        prev_valid,
        codebook,
        cache_bias,
        cache_mean,
        window_bias,
        key_from,
    )
    out_specs = [
        pl.BlockSpec((None, bq, bv), lambda b, i, v: (b, i, v)),
        pl.BlockSpec((None, None, bq, 1), lambda b, i, v: (b, v, i, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((bh, seq, t.d_v), v_ext.dtype),
        jax.ShapeDtypeStruct((bh, n_v, seq, 1), jnp.float32),
    ]
    out, lse = pallas_call(
        functools.partial(_fwd_kernel, st=st),
        name="vq_attention_fwd",
        grid=(bh, seq // bq, n_v),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        vmem_limit_bytes=st.tiles.vmem_limit_bytes,
        target=st.target,
        num_warps=t.fwd.num_warps,
        num_stages=t.num_stages,
        interpret=st.interpret,
        debug=st.debug,
    )(*args)
    return out, lse[:, 0]
