"""Backward kernels. With P = exp(s - lse), dP = dO . value^T and
dS = P * (dP - delta), delta = rowsum(O * dO) (XLA):

  ds kernel    grid (BH, T/bq):           recomputes P and dS for one query tile
                                          over codes + window, writes
                                          dq = scale * dS . [C; k_prev; k_cur],
                                          P and dS of the window ([BH, T, 2L]),
                                          P of the codes ([BH, T, S]) and the
                                          float32 d(window bias) = dS
  dk kernel    grid (BH, (T+L)/bk):       dk_j = scale * sum_i dS_ij q_i over the
                                          queries of the same block (causal) and
                                          of the next block (the window only)
  dv kernel    grid (BH, (T+L)/bk, V/bv): dv_j = sum_i P_ij dO_i, same queries
  dmean kernel grid (BH, N, S/bc, V/bv):  dmean_{n,s} = sum_{i in block n} P_is dO_i
                                          (the cache path; the reverse prefix over
                                          blocks that carries it to the values is
                                          the transpose of the XLA prefix sum)

P and dS are formed once (the expensive part: Q K^T and dO V^T over the whole
value width) and stored in the input dtype, linear in T (2L + S per query row);
the key-side kernels only read tiles of them, so the backward does the work of
flash attention's (Q K^T, dO V^T, dq, dk, dv once each per score) plus that
traffic. Every output tile is written by exactly one program; no atomics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._common import (
    MASK_VALUE,
    Static,
    document_mask,
    dot_nn,
    dot_nt,
    dot_tn,
    fori,
    iota,
    shift,
    spec_if_present,
    tile,
    window_mask,
)
from ._platform import pallas_call


def _dp(dout_ref, v_ref, keys, n_keys, n_v, bv, prec):
    """dP [bq, n_keys] = dO . V[keys]^T, accumulated over value chunks of bv
    columns in a loop: only one [bq, bv] and one [n_keys, bv] tile (times the
    pipeline stages) are live, whatever d_v is."""

    def step(t, dp):
        cols = tile(t, bv)
        return dp + dot_nt(dout_ref[:, cols], v_ref[keys, cols], prec)

    dp = jnp.zeros((dout_ref.shape[0], n_keys), jnp.float32)
    return fori(0, n_v, step, dp)


def _separate_dwb(st: Static) -> bool:
    """float32 d(window bias) needs its own output unless dS is float32 already."""
    return st.has_bias and not st.f32_inputs


def _want_pcode(st: Static) -> bool:
    return st.use_cache and st.cache_grad


# ------------------------------------------------- dq, P and dS (query side)
def _ds_kernel(
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
    dout_ref,
    lse_ref,
    delta_ref,
    dq_ref,
    p_window_ref,
    ds_window_ref,
    p_code_ref,
    dwindow_bias_ref,
    dp_ref=None,
    *,
    st: Static,
):
    """One (row, query tile) program; inputs as the forward kernel's (absent
    ones None). Outputs: dq, P and dS of the window, P of the codes (None
    unless the cache passes gradient) and the float32 d(window bias) (None
    unless separate from dS, `_separate_dwb`).

    Streamed value columns (`dp_ref` given: `tiles.dq_stream_v`, TPU): a
    third grid axis walks the value chunks in order; the value, cache and dO
    refs hold one chunk, whose dP = dO . value^T adds into the float32
    scratch `dp_ref` `[bq, codes + 2L]` (codes, previous block, current
    block) in the same chunk order as `_dp`, and the last chunk's program
    does the rest from it."""
    t = st.tiles
    bv, L = t.dq.block_v, t.block_len
    n_v = t.d_v // bv
    prec = st.precision
    # dP columns in the scratch: codes, then the previous and current block.
    offsets = {"code": 0, "prev": t.codes, "cur": t.codes + L}

    if dp_ref is not None:

        @pl.when(pl.program_id(2) == 0)
        def _():
            dp_ref[...] = jnp.zeros(dp_ref.shape, jnp.float32)

        dout = dout_ref[...]
        if st.use_cache:
            codes = pl.ds(0, t.codes)
            dp_ref[:, codes] += dot_nt(dout, cache_mean_ref[...], prec)
        for part, v_ref in (("prev", prev_value_ref), ("cur", value_ref)):
            cols = pl.ds(offsets[part], L)
            dp_ref[:, cols] += dot_nt(dout, v_ref[...], prec)

    def dp_of(part, v_ref, keys, n_keys):
        if dp_ref is None:
            return _dp(dout_ref, v_ref, keys, n_keys, n_v, bv, prec)
        return dp_ref[:, shift(keys, offsets[part])]

    # Read outside `pl.when`: the interpreter substitutes grid indices in the
    # kernel's top level only.
    qi = pl.program_id(1)

    def finish():
        _ds_finish(
            st, qi, q_ref, prev_key_ref, key_ref, prev_value_ref, value_ref,
            prev_valid_ref, codebook_ref, cache_bias_ref, cache_mean_ref,
            window_bias_ref, key_from_ref, lse_ref, delta_ref, dq_ref,
            p_window_ref, ds_window_ref, p_code_ref, dwindow_bias_ref, dp_of,
        )  # fmt: skip

    if dp_ref is None:
        finish()
    else:
        pl.when(pl.program_id(2) == pl.num_programs(2) - 1)(finish)


def _ds_finish(
    st, qi, q_ref, prev_key_ref, key_ref, prev_value_ref, value_ref,
    prev_valid_ref, codebook_ref, cache_bias_ref, cache_mean_ref,
    window_bias_ref, key_from_ref, lse_ref, delta_ref, dq_ref, p_window_ref,
    ds_window_ref, p_code_ref, dwindow_bias_ref, dp_of,
):  # fmt: skip
    """`_ds_kernel` once dP is at hand (`dp_of(part, v_ref, keys, n_keys)`):
    P, dS and dq over codes, previous and current block."""
    t = st.tiles
    kt = t.dq
    bq, bk, bc, L = kt.block_q, kt.block_k, kt.block_code, t.block_len
    prec = st.precision
    q_per_blk = L // bq
    n = qi // q_per_blk
    r0 = (qi % q_per_blk) * bq
    q = q_ref[...]
    lse = lse_ref[...]  # [bq, 1]
    delta = delta_ref[...]  # [bq, 1]
    key_from = None if key_from_ref is None else key_from_ref[...]  # [bq, 1]
    # Packed documents: does the row's document reach back into the cache?
    sees_cache = None if key_from is None else key_from < 0  # [bq, 1]

    def p_ds(s, part, v_ref, keys, n_keys):
        p = jnp.exp(s - lse)
        return p, p * (dp_of(part, v_ref, keys, n_keys) - delta)

    def store_window(cols, p, ds):
        p_window_ref[:, cols] = p.astype(p_window_ref.dtype)
        ds_window_ref[:, cols] = ds.astype(ds_window_ref.dtype)
        if dwindow_bias_ref is not None:
            dwindow_bias_ref[:, cols] = ds

    dq = jnp.zeros((bq, t.d_k), jnp.float32)
    if st.use_cache:

        def code_step(j, dq):
            sl = tile(j, bc)
            c = codebook_ref[sl, :]
            s = st.scale * dot_nt(q, c, prec) + cache_bias_ref[:, sl]
            if sees_cache is not None:
                s = jnp.where(sees_cache, s, MASK_VALUE)
            p, ds = p_ds(s, "code", cache_mean_ref, sl, bc)
            if p_code_ref is not None:
                p_code_ref[:, sl] = p.astype(p_code_ref.dtype)
            return dq + dot_nn(ds.astype(c.dtype), c, prec)

        dq = fori(0, t.codes // bc, code_step, dq)

    prev_valid = (n > 0) | (prev_valid_ref[...] > 0)
    rows = r0 + iota((bq, bk), 0)

    def prev_step(j, dq):
        sl = tile(j, bk)
        k = prev_key_ref[sl, :]
        s = st.scale * dot_nt(q, k, prec)
        if window_bias_ref is not None:
            s = s + window_bias_ref[:, sl]
        s = jnp.where(prev_valid, s, MASK_VALUE)
        cols = j * bk + iota((bq, bk), 1)
        if st.window_len is not None:
            s = window_mask(s, rows, cols - L, st.window_len)
        if key_from is not None:
            s = document_mask(s, cols, key_from)
        p, ds = p_ds(s, "prev", prev_value_ref, sl, bk)
        store_window(sl, p, ds)
        return dq + dot_nn(ds.astype(k.dtype), k, prec)

    dq = fori(0, L // bk, prev_step, dq)

    def cur_step(j, dq):
        sl = tile(j, bk)
        k = key_ref[sl, :]
        s = st.scale * dot_nt(q, k, prec)
        if window_bias_ref is not None:
            s = s + window_bias_ref[:, tile(j, bk, L)]
        cols = j * bk + iota((bq, bk), 1)
        s = jnp.where(cols <= rows, s, MASK_VALUE)
        if st.window_len is not None:
            s = window_mask(s, rows, cols, st.window_len)
        if key_from is not None:
            s = document_mask(s, cols + L, key_from)
        p, ds = p_ds(s, "cur", value_ref, sl, bk)
        store_window(tile(j, bk, L), p, ds)
        return dq + dot_nn(ds.astype(k.dtype), k, prec)

    n_cur = 1 if L // bk == 1 else (r0 + bq + bk - 1) // bk
    dq = fori(0, n_cur, cur_step, dq)
    dq_ref[...] = (st.scale * dq).astype(dq_ref.dtype)

    if L // bk > 1:  # key tiles above the diagonal: P = dS = 0

        def zero_step(j, c):
            zero = jnp.zeros((bq, bk), jnp.float32)
            store_window(tile(j, bk, L), zero, zero)
            return c

        fori(n_cur, L // bk, zero_step, 0)


def ds_call(
    st: Static,
    q,
    k_ext,
    v_ext,
    prev_valid,
    codebook,
    cache_bias,
    cache_mean,
    window_bias,
    key_from,
    dout,
    lse,
    delta,
):
    """Returns dq, P_win, dS_win, P_code (or None), dwbias f32 (or None)."""
    t = st.tiles
    bh, seq, _ = q.shape
    stream = t.dq_stream_v
    # Whole value rows per program, or (streamed) one value chunk per step
    # of a third grid axis: index maps take `(b, i, *v)`, v = () or (chunk,).
    grid = (bh, seq // t.dq.block_q)
    if stream:
        grid = (*grid, t.d_v // t.dq.block_v)
    args = (
        q, k_ext, k_ext, v_ext, v_ext, prev_valid, codebook, cache_bias, cache_mean,
        window_bias, key_from, dout, lse, delta,
    )  # fmt: skip
    out_specs, out_shape = _ds_outputs(st, q, v_ext)
    dq, p_win, ds_win, p_code, dwbias = pallas_call(
        functools.partial(_ds_kernel, st=st),
        name="vq_attention_bwd_dq",
        grid=grid,
        in_specs=_ds_in_specs(st, d_k=q.shape[-1], present=args),
        out_specs=out_specs,
        out_shape=out_shape,
        sequential_last=stream,
        scratch_shapes=(
            _dp_scratch(t.dq.block_q, t.codes + 2 * t.block_len) if stream else ()
        ),
        vmem_limit_bytes=st.tiles.vmem_limit_bytes,
        target=st.target,
        num_warps=t.dq.num_warps,
        num_stages=t.num_stages,
        interpret=st.interpret,
        debug=st.debug,
    )(*args)
    if window_bias is not None and not _separate_dwb(st):
        dwbias = ds_win  # float32 already
    return dq, p_win, ds_win, p_code, dwbias


def _ds_in_specs(st: Static, *, d_k: int, present):
    """The query-side backward kernel's input blocks, in `ds_call`'s argument
    order (`present`: those arguments, None where absent)."""
    t = st.tiles
    L, bq, H = t.block_len, t.dq.block_q, st.num_heads
    q_per_blk = L // bq
    V = t.dq.block_v if t.dq_stream_v else t.d_v
    codebook, cache_bias, cache_mean, window_bias, key_from = present[6:11]

    def chunk(v):
        return v[0] if v else 0

    row_tile = lambda width: pl.BlockSpec((None, bq, width), lambda b, i, *v: (b, i, 0))
    return [
        row_tile(d_k),
        pl.BlockSpec((None, L, d_k), lambda b, i, *v: (b, i // q_per_blk, 0)),
        pl.BlockSpec((None, L, d_k), lambda b, i, *v: (b, i // q_per_blk + 1, 0)),
        pl.BlockSpec((None, L, V), lambda b, i, *v: (b, i // q_per_blk, chunk(v))),
        pl.BlockSpec((None, L, V), lambda b, i, *v: (b, i // q_per_blk + 1, chunk(v))),
        pl.BlockSpec((None, 1, 1), lambda b, i, *v: (b, 0, 0)),
        spec_if_present(
            codebook,
            pl.BlockSpec((None, t.codes, d_k), lambda b, i, *v: (b % H, 0, 0)),
        ),
        spec_if_present(
            cache_bias,
            pl.BlockSpec(
                (None, None, 1, t.codes), lambda b, i, *v: (b, i // q_per_blk, 0, 0)
            ),
        ),
        spec_if_present(
            cache_mean,
            pl.BlockSpec(
                (None, None, t.codes, V),
                lambda b, i, *v: (b, i // q_per_blk, 0, chunk(v)),
            ),
        ),
        spec_if_present(window_bias, row_tile(2 * L)),
        spec_if_present(key_from, row_tile(1)),
        pl.BlockSpec((None, bq, V), lambda b, i, *v: (b, i, chunk(v))),  # dO
        row_tile(1),  # lse
        row_tile(1),  # delta
    ]


def _ds_outputs(st: Static, q, v_ext):
    """The query-side backward kernel's output blocks and shapes: dq, P and dS
    of the window, P of the codes (or None), float32 d(window bias) (or
    None)."""
    t = st.tiles
    bh, seq, d_k = q.shape
    L, bq = t.block_len, t.dq.block_q
    want_p_code, separate_dwb = _want_pcode(st), _separate_dwb(st)
    row_tile = lambda width: pl.BlockSpec((None, bq, width), lambda b, i, *v: (b, i, 0))
    out_specs = [
        row_tile(d_k),
        row_tile(2 * L),
        row_tile(2 * L),
        row_tile(t.codes) if want_p_code else None,
        row_tile(2 * L) if separate_dwb else None,
    ]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((bh, seq, 2 * L), v_ext.dtype),  # P of the window
        jax.ShapeDtypeStruct((bh, seq, 2 * L), q.dtype),  # dS of the window
        # P of the codes, float32 d(window bias):
        jax.ShapeDtypeStruct((bh, seq, t.codes), v_ext.dtype) if want_p_code else None,
        jax.ShapeDtypeStruct((bh, seq, 2 * L), jnp.float32) if separate_dwb else None,
    ]
    return out_specs, out_shape


def _dp_scratch(rows: int, cols: int):
    """The streamed dq kernel's float32 dP accumulator, in VMEM."""
    from jax.experimental.pallas import tpu as pltpu

    return [pltpu.VMEM((rows, cols), jnp.float32)]


# ------------------------------------------------------------ dk and dv (window)
def _dkv_kernel(
    own_window_ref,
    own_operand_ref,
    next_window_ref,
    next_operand_ref,
    out_ref,
    *,
    st: Static,
    want: str,
):
    """Key tile of ext block e. `own_*`: the queries of the key's own block
    (segment block e-1; the key is in their current block: window columns
    L + c); `next_*`: the queries of the next block (segment block e; the key
    is in their previous block: columns c). `*_window_ref`: the stored window
    tile source (dS for dk, P for dv); `*_operand_ref`: the query-side operand
    (q for dk, dO's value tile for dv)."""
    t = st.tiles
    bq, bk, L = t.kv.block_q, t.kv.block_k, t.block_len
    prec = st.precision
    kt = pl.program_id(1)
    k_per_blk = L // bk
    e = kt // k_per_blk
    c0 = (kt % k_per_blk) * bk
    n_q = L // bq

    def side(window_ref, operand_ref, acc, *, current: bool):
        if L // bk == 1:
            cols = pl.ds(L if current else 0, bk)
        else:
            cols = pl.ds(pl.multiple_of((L if current else 0) + c0, bk), bk)

        def step(i, acc):
            rows = tile(i, bq)
            operand = operand_ref[rows, :]
            window = window_ref[rows, cols]  # [bq, bk]
            return acc + dot_tn(window.astype(operand.dtype), operand, prec)

        # Typed int32 bounds: jnp.where of two Python ints would take the
        # predicate's type (i1) in the Triton lowering, and scf.for then fails
        # to verify (its bounds must share one type).
        if current:  # query block e-1 exists for e >= 1; rows >= c0 only
            first = c0 // bq
            last = jnp.where(e >= 1, jnp.int32(n_q), first)
        else:  # query block e exists for e <= N-1
            first = jnp.int32(0)
            last = jnp.where(e < st.n_blocks, jnp.int32(n_q), jnp.int32(0))
        return lax.fori_loop(first, last, step, acc)

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    acc = side(own_window_ref, own_operand_ref, acc, current=True)
    if st.window_grad:  # else no gradient through the carried previous block
        acc = side(next_window_ref, next_operand_ref, acc, current=False)
    if want == "dk":
        acc = st.scale * acc
    out_ref[...] = acc.astype(out_ref.dtype)


def dkv_call(st: Static, want: str, window, operand, like):
    """want="dk": window = dS_win, operand = q, result like k_ext [BH, T+L, K];
    want="dv": window = P_win, operand = dO, result like v_ext [BH, T+L, V]."""
    t = st.tiles
    bh, seq_ext, width = like.shape
    L, bk = t.block_len, t.kv.block_k
    k_per_blk = L // bk
    N = st.n_blocks

    def blk_a(kt):  # query block e - 1 (clamped; skipped in the kernel when e = 0)
        return jnp.maximum(kt // k_per_blk - 1, 0)

    def blk_b(kt):  # query block e (clamped; skipped when e = N)
        return jnp.minimum(kt // k_per_blk, N - 1)

    if want == "dk":
        grid = (bh, seq_ext // bk)
        in_specs = []
        for f in (blk_a, blk_b):
            in_specs += [
                pl.BlockSpec((None, L, 2 * L), lambda b, kt, f=f: (b, f(kt), 0)),
                pl.BlockSpec((None, L, width), lambda b, kt, f=f: (b, f(kt), 0)),
            ]
        out_specs = pl.BlockSpec((None, bk, width), lambda b, kt: (b, kt, 0))
    else:
        bv = t.kv.block_v
        grid = (bh, seq_ext // bk, width // bv)
        in_specs = []
        for f in (blk_a, blk_b):
            in_specs += [
                pl.BlockSpec((None, L, 2 * L), lambda b, kt, v, f=f: (b, f(kt), 0)),
                pl.BlockSpec((None, L, bv), lambda b, kt, v, f=f: (b, f(kt), v)),
            ]
        out_specs = pl.BlockSpec((None, bk, bv), lambda b, kt, v: (b, kt, v))
    return pallas_call(
        functools.partial(_dkv_kernel, st=st, want=want),
        name=f"vq_attention_bwd_{want}",
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=jax.ShapeDtypeStruct(like.shape, like.dtype),
        vmem_limit_bytes=st.tiles.vmem_limit_bytes,
        target=st.target,
        num_warps=t.kv.num_warps,
        num_stages=t.num_stages,
        interpret=st.interpret,
        debug=st.debug,
    )(window, operand, window, operand)


# ---------------------------------------------------------------- dmean (cache)
def _dmean_kernel(p_code_ref, dout_ref, out_ref, *, st: Static):
    t = st.tiles
    bq, L = t.kv.block_q, t.block_len
    prec = st.precision

    def step(i, acc):
        rows = tile(i, bq)
        dout = dout_ref[rows, :]
        return acc + dot_tn(p_code_ref[rows, :].astype(dout.dtype), dout, prec)

    acc = fori(0, L // bq, step, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def dmean_call(st: Static, p_code, cmean, do):
    t = st.tiles
    bh = p_code.shape[0]
    L, bc, bv = t.block_len, t.kv.block_code, t.kv.block_v
    N = st.n_blocks
    in_specs = [
        pl.BlockSpec((None, L, bc), lambda b, n, c, v: (b, n, c)),
        pl.BlockSpec((None, L, bv), lambda b, n, c, v: (b, n, v)),
    ]
    return pallas_call(
        functools.partial(_dmean_kernel, st=st),
        name="vq_attention_bwd_dmean",
        grid=(bh, N, t.codes // bc, t.d_v // bv),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bc, bv), lambda b, n, c, v: (b, n, c, v)),
        out_shape=jax.ShapeDtypeStruct(cmean.shape, cmean.dtype),
        vmem_limit_bytes=st.tiles.vmem_limit_bytes,
        target=st.target,
        num_warps=t.kv.num_warps,
        num_stages=t.num_stages,
        interpret=st.interpret,
        debug=st.debug,
    )(p_code, do)
