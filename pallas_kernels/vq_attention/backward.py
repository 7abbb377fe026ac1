"""Backward kernels. With P = exp(s - lse), dP = dO . value^T and
dS = P * (dP - delta), delta = rowsum(O * dO):

  dq kernel    grid (BH, T/bq):          dq = scale * dS . [C; k_prev; k_cur],
                                          and dwbias = dS on the window columns
  dk kernel    grid (BH, (T+L)/bk):       dk_j = scale * sum_i dS_ij q_i over the
                                          queries of the same block (causal) and
                                          of the next block (the window only)
  dv kernel    grid (BH, (T+L)/bk, V/bv): dv_j = sum_i P_ij dO_i, same queries
  dmean kernel grid (BH, N, S/bc, V/bv):  dmean_{n,s} = sum_{i in block n} P_is dO_i
                                          (the cache path; the reverse prefix over
                                          blocks that carries it to the values is
                                          the transpose of the XLA prefix sum)
Every output tile is written by exactly one program; no atomics.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ._common import MASK_VALUE, Static, dot_nn, dot_nt, dot_tn, fori, iota, tile
from ._platform import pallas_call


def _dp(do_ref, v_ref, rows, keys, n_v, bv, prec):
    """dP [bq, bk] = dO[rows] . V[keys]^T, accumulated over value tiles."""
    dp = None
    for t in range(n_v):
        cols = pl.ds(t * bv, bv)
        part = dot_nt(do_ref[rows, cols], v_ref[keys, cols], prec)
        dp = part if dp is None else dp + part
    return dp


# ---------------------------------------------------------------- dq (+ dwbias)
def _dq_kernel(*refs, st: Static):
    t = st.tiles
    refs = list(refs)
    q_ref, kp_ref, kc_ref, vp_ref, vc_ref, pv_ref = refs[:6]
    rest = refs[6:]
    if st.use_cache:
        cb_ref, cbias_ref, cmean_ref, *rest = rest
    if st.has_bias:
        wb_ref, *rest = rest
    do_ref, lse_ref, delta_ref, dq_ref, *rest = rest
    dwb_ref = rest[0] if st.has_bias else None

    bq, bk, bc, bv, L = t.block_q, t.block_k, t.block_code, t.block_v, t.block_len
    n_v = t.d_v // bv
    prec = st.precision
    qi = pl.program_id(1)
    q_per_blk = L // bq
    n = qi // q_per_blk
    r0 = (qi % q_per_blk) * bq
    q = q_ref[...]
    lse = lse_ref[...]  # [bq, 1]
    delta = delta_ref[...]  # [bq, 1]
    all_rows = pl.ds(0, bq)

    def ds_of(s, v_ref, keys):
        p = jnp.exp(s - lse)
        return p * (_dp(do_ref, v_ref, all_rows, keys, n_v, bv, prec) - delta)

    dq = jnp.zeros((bq, t.d_k), jnp.float32)
    if st.use_cache:

        def code_step(j, dq):
            sl = tile(j, bc)
            c = cb_ref[sl, :]
            s = st.scale * dot_nt(q, c, prec) + cbias_ref[:, sl]
            ds = ds_of(s, cmean_ref, sl)
            return dq + dot_nn(ds.astype(c.dtype), c, prec)

        dq = fori(0, t.codes // bc, code_step, dq)

    prev_ok = (n > 0) | (pv_ref[...] > 0)

    def prev_step(j, dq):
        sl = tile(j, bk)
        k = kp_ref[sl, :]
        s = st.scale * dot_nt(q, k, prec)
        if st.has_bias:
            s = s + wb_ref[:, sl]
        s = jnp.where(prev_ok, s, MASK_VALUE)
        ds = ds_of(s, vp_ref, sl)
        if st.has_bias:
            dwb_ref[:, sl] = ds
        return dq + dot_nn(ds.astype(k.dtype), k, prec)

    dq = fori(0, L // bk, prev_step, dq)

    rows = r0 + iota((bq, bk), 0)

    def cur_step(j, dq):
        sl = tile(j, bk)
        k = kc_ref[sl, :]
        s = st.scale * dot_nt(q, k, prec)
        if st.has_bias:
            s = s + wb_ref[:, tile(j, bk, L)]
        cols = j * bk + iota((bq, bk), 1)
        s = jnp.where(cols <= rows, s, MASK_VALUE)
        ds = ds_of(s, vc_ref, sl)
        if st.has_bias:
            dwb_ref[:, tile(j, bk, L)] = ds
        return dq + dot_nn(ds.astype(k.dtype), k, prec)

    n_cur = 1 if L // bk == 1 else (r0 + bq + bk - 1) // bk
    dq = fori(0, n_cur, cur_step, dq)
    dq_ref[...] = (st.scale * dq).astype(dq_ref.dtype)

    if st.has_bias and L // bk > 1:

        def zero_step(j, c):
            dwb_ref[:, tile(j, bk, L)] = jnp.zeros((bq, bk), jnp.float32)
            return c

        fori(n_cur, L // bk, zero_step, 0)


def dq_call(
    st: Static, q, k_ext, v_ext, prev_ok, codebook, cbias, cmean, wbias, do, lse, delta
):
    t = st.tiles
    bh, seq, d_k = q.shape
    L, bq = t.block_len, t.block_q
    q_per_blk = L // bq
    H = st.num_heads
    V = t.d_v
    in_specs = [
        pl.BlockSpec((None, bq, d_k), lambda b, i: (b, i, 0)),
        pl.BlockSpec((None, L, d_k), lambda b, i: (b, i // q_per_blk, 0)),
        pl.BlockSpec((None, L, d_k), lambda b, i: (b, i // q_per_blk + 1, 0)),
        pl.BlockSpec((None, L, V), lambda b, i: (b, i // q_per_blk, 0)),
        pl.BlockSpec((None, L, V), lambda b, i: (b, i // q_per_blk + 1, 0)),
        pl.BlockSpec((None, 1, 1), lambda b, i: (b, 0, 0)),
    ]
    args = [q, k_ext, k_ext, v_ext, v_ext, prev_ok]
    if st.use_cache:
        in_specs += [
            pl.BlockSpec((None, t.codes, d_k), lambda b, i: (b % H, 0, 0)),
            pl.BlockSpec(
                (None, None, 1, t.codes), lambda b, i: (b, i // q_per_blk, 0, 0)
            ),
            pl.BlockSpec(
                (None, None, t.codes, V), lambda b, i: (b, i // q_per_blk, 0, 0)
            ),
        ]
        args += [codebook, cbias, cmean]
    if st.has_bias:
        in_specs.append(pl.BlockSpec((None, bq, 2 * L), lambda b, i: (b, i, 0)))
        args.append(wbias)
    in_specs += [
        pl.BlockSpec((None, bq, V), lambda b, i: (b, i, 0)),
        pl.BlockSpec((None, bq, 1), lambda b, i: (b, i, 0)),
        pl.BlockSpec((None, bq, 1), lambda b, i: (b, i, 0)),
    ]
    args += [do, lse, delta]
    out_specs = [pl.BlockSpec((None, bq, d_k), lambda b, i: (b, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if st.has_bias:
        out_specs.append(pl.BlockSpec((None, bq, 2 * L), lambda b, i: (b, i, 0)))
        out_shape.append(jax.ShapeDtypeStruct((bh, seq, 2 * L), jnp.float32))
    outs = pallas_call(
        functools.partial(_dq_kernel, st=st),
        name="vq_attention_bwd_dq",
        grid=(bh, seq // bq),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        sizes=st.sizes,
        interpret=st.interpret,
        debug=st.debug,
    )(*args)
    return outs[0], (outs[1] if st.has_bias else None)


# ------------------------------------------------------------ dk and dv (window)
def _dkv_kernel(*refs, st: Static, want: str):
    """Key tile j of ext block e: queries of block e-1 (key in their current
    block, causal) and of block e (key in their previous block)."""
    t = st.tiles
    bq, bk, bv, L = t.block_q, t.block_k, t.block_v, t.block_len
    n_v = t.d_v // bv
    prec = st.precision
    refs = list(refs)
    if want == "dk":
        k_ref, v_ref, pv_ref, *rest = refs
    else:
        k_ref, pv_ref, *rest = refs
    per_side = 4 if want == "dk" else 3
    per_side += int(st.has_bias)
    side_a, side_b, out_ref = rest[:per_side], rest[per_side : 2 * per_side], rest[-1]

    kt = pl.program_id(1)
    k_per_blk = L // bk
    e = kt // k_per_blk
    c0 = (kt % k_per_blk) * bk
    k = k_ref[...]  # [bk, K]
    n_q = L // bq
    width = t.d_k if want == "dk" else bv

    def side(refs, acc, *, current: bool):
        if want == "dk":
            q_ref, do_ref, lse_ref, delta_ref, *wb = refs
        else:
            q_ref, do_ref, lse_ref, *wb = refs
        wb_ref = wb[0] if wb else None

        def step(i, acc):
            rows = tile(i, bq)
            q = q_ref[rows, :]
            s = st.scale * dot_nt(q, k, prec)  # [bq, bk]
            if wb_ref is not None:
                cols = (
                    pl.ds(pl.multiple_of(L + c0, bk), bk)
                    if current
                    else pl.ds(pl.multiple_of(c0, bk), bk)
                )
                if L // bk == 1:
                    cols = pl.ds(L if current else 0, bk)
                s = s + wb_ref[rows, cols]
            if current:
                r = i * bq + iota((bq, bk), 0)
                c = c0 + iota((bq, bk), 1)
                s = jnp.where(c <= r, s, MASK_VALUE)
            else:
                ok = (e > 0) | (pv_ref[...] > 0)
                s = jnp.where(ok, s, MASK_VALUE)
            p = jnp.exp(s - lse_ref[rows, :])
            if want == "dk":
                ds = p * (
                    _dp(do_ref, v_ref, rows, pl.ds(0, bk), n_v, bv, prec)
                    - delta_ref[rows, :]
                )
                return acc + dot_tn(ds.astype(q.dtype), q, prec)
            do = do_ref[rows, :]
            return acc + dot_tn(p.astype(do.dtype), do, prec)

        if current:  # query blocks e-1 exist for e >= 1; rows >= c0 only
            first = c0 // bq
            last = jnp.where(e >= 1, n_q, first)
        else:  # query block e exists for e <= N-1
            first = 0
            last = jnp.where(e < st.n_blocks, n_q, 0)
        return fori(first, last, step, acc)

    acc = jnp.zeros((bk, width), jnp.float32)
    acc = side(side_a, acc, current=True)
    acc = side(side_b, acc, current=False)
    if want == "dk":
        acc = st.scale * acc
    out_ref[...] = acc.astype(out_ref.dtype)


def dkv_call(st: Static, want: str, q, k_ext, v_ext, prev_ok, wbias, do, lse, delta):
    """want="dk": dk_ext [BH, T+L, K]; want="dv": dv_ext [BH, T+L, V]."""
    t = st.tiles
    bh, seq_ext, d_k = k_ext.shape
    L, bk, bv = t.block_len, t.block_k, t.block_v
    k_per_blk = L // bk
    N = st.n_blocks
    V = t.d_v

    def blk_a(kt):  # query block e - 1 (clamped; skipped in the kernel when e = 0)
        return jnp.maximum(kt // k_per_blk - 1, 0)

    def blk_b(kt):  # query block e (clamped; skipped when e = N)
        return jnp.minimum(kt // k_per_blk, N - 1)

    if want == "dk":
        grid = (bh, seq_ext // bk)
        idx = lambda f: lambda b, kt: (b, f(kt), 0)  # noqa: E731
        in_specs = [
            pl.BlockSpec((None, bk, d_k), lambda b, kt: (b, kt, 0)),
            pl.BlockSpec((None, bk, V), lambda b, kt: (b, kt, 0)),
            pl.BlockSpec((None, 1, 1), lambda b, kt: (b, 0, 0)),
        ]
        args = [k_ext, v_ext, prev_ok]
        for f in (blk_a, blk_b):
            in_specs += [
                pl.BlockSpec((None, L, d_k), idx(f)),
                pl.BlockSpec((None, L, V), idx(f)),
                pl.BlockSpec((None, L, 1), idx(f)),
                pl.BlockSpec((None, L, 1), idx(f)),
            ]
            args += [q, do, lse, delta]
            if st.has_bias:
                in_specs.append(pl.BlockSpec((None, L, 2 * L), idx(f)))
                args.append(wbias)
        out_specs = pl.BlockSpec((None, bk, d_k), lambda b, kt: (b, kt, 0))
        out_shape = jax.ShapeDtypeStruct(k_ext.shape, k_ext.dtype)
    else:
        grid = (bh, seq_ext // bk, V // bv)
        in_specs = [
            pl.BlockSpec((None, bk, d_k), lambda b, kt, v: (b, kt, 0)),
            pl.BlockSpec((None, 1, 1), lambda b, kt, v: (b, 0, 0)),
        ]
        args = [k_ext, prev_ok]
        for f in (blk_a, blk_b):
            in_specs += [
                pl.BlockSpec((None, L, d_k), lambda b, kt, v, f=f: (b, f(kt), 0)),
                pl.BlockSpec((None, L, bv), lambda b, kt, v, f=f: (b, f(kt), v)),
                pl.BlockSpec((None, L, 1), lambda b, kt, v, f=f: (b, f(kt), 0)),
            ]
            args += [q, do, lse]
            if st.has_bias:
                in_specs.append(
                    pl.BlockSpec((None, L, 2 * L), lambda b, kt, v, f=f: (b, f(kt), 0))
                )
                args.append(wbias)
        out_specs = pl.BlockSpec((None, bk, bv), lambda b, kt, v: (b, kt, v))
        out_shape = jax.ShapeDtypeStruct(v_ext.shape, v_ext.dtype)
    return pallas_call(
        functools.partial(_dkv_kernel, st=st, want=want),
        name=f"vq_attention_bwd_{want}",
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        sizes=st.sizes,
        interpret=st.interpret,
        debug=st.debug,
    )(*args)


# ---------------------------------------------------------------- dmean (cache)
def _dmean_kernel(q_ref, cb_ref, cbias_ref, do_ref, lse_ref, out_ref, *, st: Static):
    t = st.tiles
    bq, L = t.block_q, t.block_len
    prec = st.precision
    c = cb_ref[...]  # [bc, K]
    cbias = cbias_ref[...]  # [1, bc]

    def step(i, acc):
        rows = tile(i, bq)
        s = st.scale * dot_nt(q_ref[rows, :], c, prec) + cbias
        p = jnp.exp(s - lse_ref[rows, :])
        do = do_ref[rows, :]
        return acc + dot_tn(p.astype(do.dtype), do, prec)

    acc = fori(0, L // bq, step, jnp.zeros(out_ref.shape, jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def dmean_call(st: Static, q, codebook, cbias, cmean, do, lse):
    t = st.tiles
    bh, seq, d_k = q.shape
    L, bc, bv = t.block_len, t.block_code, t.block_v
    H = st.num_heads
    N = st.n_blocks
    in_specs = [
        pl.BlockSpec((None, L, d_k), lambda b, n, c, v: (b, n, 0)),
        pl.BlockSpec((None, bc, d_k), lambda b, n, c, v: (b % H, c, 0)),
        pl.BlockSpec((None, None, 1, bc), lambda b, n, c, v: (b, n, 0, c)),
        pl.BlockSpec((None, L, bv), lambda b, n, c, v: (b, n, v)),
        pl.BlockSpec((None, L, 1), lambda b, n, c, v: (b, n, 0)),
    ]
    return pallas_call(
        functools.partial(_dmean_kernel, st=st),
        name="vq_attention_bwd_dmean",
        grid=(bh, N, t.codes // bc, t.d_v // bv),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bc, bv), lambda b, n, c, v: (b, n, c, v)),
        out_shape=jax.ShapeDtypeStruct(cmean.shape, cmean.dtype),
        sizes=st.sizes,
        interpret=st.interpret,
        debug=st.debug,
    )(q, codebook, cbias, do, lse)
