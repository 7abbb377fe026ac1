"""The attention window (official semantics): general `mem_len` (M, below or
above `block_len`), `cache_grad=False` (official `grad_thru_cache=False`),
`use_cache=False` as a sliding window (official `agg_cache=False`), the
block-window baseline, and `state_keys` ("codewords" official, "codes" ours).

The xla form is held to the quadratic definition (with the matching gradient
options) in forward, every gradient and the returned state, float32 1e-5.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import attention_inputs
from conftest import assert_close, rel_err

import tvq_eqx
from tvq_eqx.ops import VQAttentionState, quantize
from tvq_eqx.ops import vq_attention_xla as _xla
from tvq_eqx.ops._reference import vq_attention_reference as _quadratic

XLA_STATIC = (
    "block_len",
    "scale",
    "use_cache",
    "cache_grad",
    "mem_len",
    "sliding_window",
    "state_keys",
)
QUAD_STATIC = (
    "scale",
    "block_len",
    "mem_len",
    "key_grad_window",
    "cache_grad",
    "use_cache",
    "sliding_window",
)
xla = jax.jit(_xla, static_argnames=XLA_STATIC)
quadratic = jax.jit(_quadratic, static_argnames=QUAD_STATIC)

B, T, H, K, V, S, L = 2, 24, 2, 4, 3, 5, 4
MEM_LENS = (0, L // 2, L, L + 3, 2 * L)


def make_inputs(seed, mem_len, *, t=T, dtype=jnp.float32, rel_len=None):
    """Inputs at the module's sizes; rel_table over 0..rel_len (default M)."""
    shape = (B, t, H, K, V, S, L)
    rel_len = mem_len if rel_len is None else rel_len
    return attention_inputs(jax.random.key(seed), shape, dtype, rel_len=rel_len)


MODES = {
    # name: (use_cache, sliding_window)
    "cache": (True, False),
    "sliding": (False, True),
    "block_window": (False, False),
}


@functools.partial(jax.jit, static_argnames=("form", "opts"))
def value_and_grads(form, opts, args, cot):
    """Output and the gradients of <output, cot> w.r.t. q, k, v, rel_query,
    rel_table."""
    opts = dict(opts)
    c = args["codebook"]

    def f(q, k, v, rq, rt):
        if form == "xla":
            out = _xla(q, k, v, c, rel_query=rq, rel_table=rt, **opts)[0]
        else:
            out = _quadratic(
                q, k, v, c, rel_query=rq, rel_table=rt, key_grad_window=True, **opts
            )
        return jnp.sum(out * cot), out

    names = ("query", "key", "value", "rel_query", "rel_table")
    grads, out = jax.grad(f, argnums=range(5), has_aux=True)(*(args[n] for n in names))
    return out, grads


GRAD_NAMES = ("dq", "dk", "dv", "drel_query", "drel_table")
# Measured worst relative errors on CPU (float32): <= 4e-7 over every case.
F32_TOL = 1e-5


@pytest.mark.parametrize("cache_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("mode", ["cache", "sliding"])
@pytest.mark.parametrize("mem_len", MEM_LENS, ids=lambda m: f"M{m}")
def test_xla_equals_quadratic(mem_len, mode, cache_grad):
    args = make_inputs(mem_len, mem_len)
    use_cache, sliding = MODES[mode]
    opts = dict(
        block_len=L,
        scale=0.6,
        mem_len=mem_len,
        use_cache=use_cache,
        sliding_window=sliding,
        cache_grad=cache_grad,
    )
    cot = jax.random.normal(jax.random.key(99), (B, T, H, V))
    ref_out, ref_g = value_and_grads("quadratic", tuple(opts.items()), args, cot)
    out, g = value_and_grads("xla", tuple(opts.items()), args, cot)
    assert rel_err(ref_out, out) <= F32_TOL
    for name, r, x in zip(GRAD_NAMES, ref_g, g, strict=True):
        assert_close(r, x, F32_TOL, name=name)


@pytest.mark.parametrize("mem_len", [2, L + 3], ids=lambda m: f"M{m}")
def test_block_window_baseline_equals_quadratic(mem_len):
    args = make_inputs(7 + mem_len, mem_len)
    opts = dict(
        block_len=L, scale=0.6, mem_len=mem_len, use_cache=False, sliding_window=False
    )
    cot = jax.random.normal(jax.random.key(98), (B, T, H, V))
    ref_out, ref_g = value_and_grads("quadratic", tuple(opts.items()), args, cot)
    out, g = value_and_grads("xla", tuple(opts.items()), args, cot)
    assert rel_err(ref_out, out) <= F32_TOL
    for name, r, x in zip(GRAD_NAMES, ref_g, g, strict=True):
        assert_close(r, x, F32_TOL, name=name)
    # It is not the sliding window: queries early in a block see further back.
    slide, _ = value_and_grads(
        "xla", tuple({**opts, "sliding_window": True}.items()), args, cot
    )
    assert rel_err(out, slide) > 1e-3


def test_semantics_are_the_official_ones():
    """The options change what they should, and only that."""
    m = L + 3
    # Bias at distance 0 only, so that it lies in every window compared here.
    args = make_inputs(3, m, rel_len=0)
    cot = jax.random.normal(jax.random.key(97), (B, T, H, V))
    base = dict(block_len=L, scale=0.6, mem_len=m)

    def run(**kw):
        return value_and_grads("xla", tuple({**base, **kw}.items()), args, cot)

    out, g = run()
    # mem_len changes no output (the cache is exact) and no dv, but dk.
    out0, g0 = run(mem_len=0)
    assert rel_err(out, out0) <= F32_TOL
    assert_close(g[2], g0[2], F32_TOL, name="dv")
    assert rel_err(g[1], g0[1]) > 1e-3
    # grad_thru_cache=False: same forward, dq equal, dk and dv smaller support.
    out_ng, g_ng = run(cache_grad=False)
    assert rel_err(out, out_ng) <= F32_TOL
    assert_close(g[0], g_ng[0], F32_TOL, name="dq")
    assert rel_err(g[1], g_ng[1]) > 1e-3 and rel_err(g[2], g_ng[2]) > 1e-3
    # The sliding window changes the forward at this length.
    out_w, _ = run(use_cache=False)
    assert rel_err(out, out_w) > 1e-3


def _reference_state(args, mem_len, t):
    """The state after one call on an empty history, from its definition."""
    codes = np.asarray(quantize(args["key"], args["codebook"]))  # [B, T, H]
    v = np.asarray(args["value"], np.float64)
    c = np.asarray(args["codebook"])
    old = max(t - mem_len, 0)  # keys older than the window go to the cache
    count = np.zeros((B, H, S))
    mean = np.zeros((B, H, S, V))
    for b in range(B):
        for h in range(H):
            z = codes[b, :old, h]
            count[b, h] = np.bincount(z, minlength=S)
            for s in range(S):
                if count[b, h, s]:
                    mean[b, h, s] = v[b, :old, h][z == s].mean(0)
    n_win = min(t, mem_len)
    win_codes = np.zeros((B, mem_len, H), np.int32)
    win_codes[:, mem_len - n_win :] = codes[:, t - n_win :]
    win_vals = np.zeros((B, mem_len, H, V))
    win_vals[:, mem_len - n_win :] = v[:, t - n_win :]
    win_keys = c[np.arange(H)[None, None], win_codes]
    return win_codes, win_keys, win_vals, n_win, count, mean


@pytest.mark.parametrize("mem_len", MEM_LENS + (30,), ids=lambda m: f"M{m}")
def test_state_contents(mem_len):
    args = make_inputs(11, mem_len)
    _, st = xla(
        args["query"],
        args["key"],
        args["value"],
        args["codebook"],
        block_len=L,
        scale=0.5,
        mem_len=mem_len,
    )
    codes, keys, vals, n_win, count, mean = _reference_state(args, mem_len, T)
    assert st.mem_len == mem_len
    np.testing.assert_array_equal(st.length, [n_win] * B)
    valid = slice(mem_len - n_win, mem_len)  # slots before are never read
    np.testing.assert_array_equal(st.window_code[:, valid], codes[:, valid])
    np.testing.assert_array_equal(st.window_key[:, valid], keys[:, valid])
    np.testing.assert_array_equal(st.window_value[:, valid], vals[:, valid])
    np.testing.assert_array_equal(st.cache_count, count)
    np.testing.assert_allclose(st.cache_mean, mean, rtol=1e-5, atol=1e-6)


@functools.partial(jax.jit, static_argnames=("splits", "opts"))
def _split_loss(args, splits, opts, c_state):
    """<outputs, cot> + <final state, c_state> over consecutive calls."""
    opts = dict(opts)

    def f(q, k, v, rq, rt):
        state, outs, start = None, [], 0
        for n in splits:
            sl = slice(start, start + n)
            o, state = tvq_eqx.vq_attention_with_state(
                q[:, sl],
                k[:, sl],
                v[:, sl],
                args["codebook"],
                state,
                rel_query=rq[:, sl],
                rel_table=rt,
                implementation="xla",
                **opts,
            )
            outs.append(o)
            start += n
        out = jnp.concatenate(outs, axis=1)
        loss = jnp.sum(out * c_state["out"])
        for field in ("window_key", "window_value", "cache_mean"):
            loss = loss + jnp.sum(getattr(state, field) * c_state[field])
        return loss, (out, state)

    names = ("query", "key", "value", "rel_query", "rel_table")
    return jax.grad(f, argnums=range(5), has_aux=True)(*(args[n] for n in names))


@pytest.mark.parametrize(
    "mem_len,cache_grad,state_keys,splits",
    [
        (L // 2, True, "codewords", (8, 4, 12)),
        (L + 3, True, "codewords", (4, 4, 16)),
        (L + 3, False, "codewords", (12, 12)),
        (2 * L, True, "codes", (16, 8)),
        (0, False, "codes", (4, 20)),
    ],
)
def test_streaming_equals_one_call_with_gradients(
    mem_len, cache_grad, state_keys, splits
):
    """Outputs, final state and every gradient (through the carried state too)
    are those of one call; with state_keys="codes" the key gradient across a
    call boundary is lost (the window re-reads the codebook), nothing else."""
    args = make_inputs(21 + mem_len, mem_len)
    ks = jax.random.split(jax.random.key(5), 4)
    c_state = dict(
        out=jax.random.normal(ks[0], (B, T, H, V)),
        window_key=jax.random.normal(ks[1], (B, mem_len, H, K)),
        window_value=jax.random.normal(ks[2], (B, mem_len, H, V)),
        cache_mean=jax.random.normal(ks[3], (B, H, S, V)),
    )
    opts = dict(
        block_len=L,
        scale=0.5,
        mem_len=mem_len,
        cache_grad=cache_grad,
        state_keys=state_keys,
    )
    opts = tuple(opts.items())
    g_one, (out_one, st_one) = _split_loss(args, (T,), opts, c_state)
    g_split, (out_split, st_split) = _split_loss(args, splits, opts, c_state)
    assert rel_err(out_one, out_split) <= F32_TOL
    for field in ("window_code", "length", "cache_count"):
        np.testing.assert_array_equal(
            getattr(st_one, field), getattr(st_split, field), err_msg=field
        )
    for field in ("window_key", "window_value", "cache_mean"):
        assert rel_err(getattr(st_one, field), getattr(st_split, field)) <= F32_TOL
    for name, a, b in zip(GRAD_NAMES, g_one, g_split, strict=True):
        if name == "dk" and state_keys == "codes" and cache_grad and mem_len:
            assert rel_err(a, b) > 1e-4, "codes mode: dk should differ"
            continue
        assert_close(a, b, F32_TOL, name=name)


@pytest.mark.parametrize("mode", ["cache", "sliding"])
def test_block_length_invariance_at_fixed_mem_len(mode):
    use_cache, sliding = MODES[mode]
    m = 5
    args = make_inputs(31, m)
    outs = [
        xla(
            args["query"],
            args["key"],
            args["value"],
            args["codebook"],
            block_len=blk,
            scale=0.5,
            rel_query=args["rel_query"],
            rel_table=args["rel_table"],
            mem_len=m,
            use_cache=use_cache,
            sliding_window=sliding,
        )[0]
        for blk in (1, 3, 4, 8, 24)
    ]
    for out in outs[1:]:
        assert rel_err(outs[0], out) <= F32_TOL


@pytest.mark.parametrize(
    "mem_len,mode", [(L + 3, "cache"), (L + 3, "sliding"), (2, "sliding")]
)
def test_dependence_support(mem_len, mode):
    """Output i depends on every past value (cache) or exactly on the last
    `mem_len` + 1 tokens (sliding window), never on a future one."""
    use_cache, sliding = MODES[mode]
    args = make_inputs(41, mem_len)
    t = 16

    def f(q, k, v):
        return _xla(
            q,
            k,
            v,
            args["codebook"],
            block_len=L,
            scale=0.5,
            rel_query=args["rel_query"][:1, :t],
            rel_table=args["rel_table"],
            mem_len=mem_len,
            use_cache=use_cache,
            sliding_window=sliding,
        )[0][0, :, 0, 0]

    q, k, v = (args[n][:1, :t] for n in ("query", "key", "value"))
    jq, jk, jv = jax.jit(jax.jacrev(f, argnums=(0, 1, 2)))(q, k, v)
    i, j = np.indices((t, t))
    for jac in (jq, jk, jv):
        per_pos = np.abs(np.asarray(jac))[:, 0, :, 0, :].sum(-1)  # [out t, in t]
        assert np.all(per_pos[j > i] == 0), "output depends on a future token"
    dv = np.abs(np.asarray(jv))[:, 0, :, 0, :].sum(-1)
    want = (j <= i) if use_cache else (j <= i) & (i - j <= mem_len)
    np.testing.assert_array_equal(dv > 0, want)


def test_codebook_update_between_calls_codewords_vs_codes():
    """After a codebook change, "codewords" attends the carried window with the
    old codewords (official) and the cache with the new codebook; "codes"
    re-reads the new codebook everywhere."""
    m = L + 3
    args = make_inputs(51, m, t=16)
    c1 = args["codebook"]
    c2 = c1 + 0.5 * jax.random.normal(jax.random.key(52), c1.shape)
    q, k, v = (args[n] for n in ("query", "key", "value"))
    opts = dict(block_len=L, scale=0.5, mem_len=m)
    _, st = xla(q[:, :8], k[:, :8], v[:, :8], c1, **opts)
    outs = {
        mode: xla(q[:, 8:], k[:, 8:], v[:, 8:], c2, state=st, state_keys=mode, **opts)[
            0
        ]
        for mode in ("codewords", "codes")
    }

    # Dense reference over all 16 keys for the queries 8..15: key j's codeword
    # is c1[z1_j] when j < 8 lies in the query's window, else c2 at its code.
    z1, z2 = quantize(k[:, :8], c1), quantize(k[:, 8:], c2)
    heads = jnp.arange(H)
    new_cw = jnp.concatenate([c2[heads, z1], c2[heads, z2]], axis=1)
    old_cw = jnp.concatenate([c1[heads, z1], c2[heads, z2]], axis=1)
    qi = q[:, 8:]

    def dense(keys_for):
        s_new = 0.5 * jnp.einsum("bihk,bjhk->bhij", qi, new_cw, precision="highest")
        s_old = 0.5 * jnp.einsum("bihk,bjhk->bhij", qi, old_cw, precision="highest")
        i = 8 + jnp.arange(8)[:, None]
        j = jnp.arange(16)[None, :]
        s = jnp.where(keys_for(i, j), s_old, s_new)
        s = jnp.where(j <= i, s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("bhij,bjhv->bihv", p, v, precision="highest")

    in_window = lambda i, j: j >= (i // L) * L - m
    never = lambda i, j: jnp.zeros_like(i + j, bool)
    assert rel_err(dense(in_window), outs["codewords"]) <= F32_TOL
    assert rel_err(dense(never), outs["codes"]) <= F32_TOL
    assert rel_err(outs["codes"], outs["codewords"]) > 1e-3
    # Without a codebook change the two agree exactly.
    same = [
        xla(q[:, 8:], k[:, 8:], v[:, 8:], c1, state=st, state_keys=mode, **opts)[0]
        for mode in ("codewords", "codes")
    ]
    np.testing.assert_array_equal(same[0], same[1])


@pytest.mark.parametrize("mem_len", [L + 3], ids=lambda m: f"M{m}")
@pytest.mark.parametrize("mode", ["cache", "sliding"])
def test_bf16_close_to_f32_definition(mem_len, mode):
    use_cache, sliding = MODES[mode]
    args = make_inputs(61, mem_len, dtype=jnp.bfloat16)
    up = {n: a.astype(jnp.float32) for n, a in args.items()}
    kw = dict(mem_len=mem_len, use_cache=use_cache, sliding_window=sliding)
    names = ("query", "key", "value", "codebook")
    ref = quadratic(
        *(up[n] for n in names),
        scale=0.5,
        rel_query=up["rel_query"],
        rel_table=up["rel_table"],
        block_len=L,
        **kw,
    )
    out, st = xla(
        *(args[n] for n in names),
        block_len=L,
        scale=0.5,
        rel_query=args["rel_query"],
        rel_table=args["rel_table"],
        **kw,
    )
    assert out.dtype == jnp.bfloat16 and st.window_key.dtype == jnp.bfloat16
    # Same bound as the block-window form (tests/test_ops.py): 2e-2.
    assert rel_err(ref, out) <= 2e-2


# ---- the Pallas path (interpret mode on CPU) ---------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("cache_grad", [True, False])
@pytest.mark.parametrize("mode", list(MODES))
def test_pallas_window_modes_equal_xla(mode, cache_grad):
    # The backward kernels themselves (no xla fallback): the sliding window is
    # their `window_len`, cache_grad=False stops the carried window in dk/dv.
    from tvq_eqx.ops._pallas import vq_attention_pallas

    use_cache, sliding = MODES[mode]
    args = make_inputs(71, L, t=16)
    cot = jax.random.normal(jax.random.key(72), (B, 16, H, V))
    names = ("query", "key", "value", "rel_query", "rel_table")

    def loss(fn, q, k, v, rq, rt):
        out, st = fn(
            q,
            k,
            v,
            args["codebook"],
            block_len=L,
            scale=0.5,
            rel_query=rq,
            rel_table=rt,
            use_cache=use_cache,
            sliding_window=sliding,
            cache_grad=cache_grad,
        )
        return jnp.sum(out * cot) + jnp.sum(st.window_value)

    g_ref = jax.grad(functools.partial(loss, _xla), argnums=range(5))(
        *(args[n] for n in names)
    )
    g = jax.grad(functools.partial(loss, vq_attention_pallas), argnums=range(5))(
        *(args[n] for n in names)
    )
    for name, r, x in zip(GRAD_NAMES, g_ref, g, strict=True):
        assert_close(r, x, F32_TOL, name=name)


# ---- bad input ---------------------------------------------------------------


def _small():
    args = make_inputs(0, L, t=8)
    return tuple(args[n] for n in ("query", "key", "value", "codebook"))


def test_rejects_bad_mem_len_and_state():
    q, k, v, c = _small()
    with pytest.raises(ValueError, match="mem_len must be a non-negative int"):
        tvq_eqx.vq_attention_with_state(q, k, v, c, None, block_len=L, mem_len=-1)
    st = VQAttentionState.empty(B, mem_len=3, heads=H, codes=S, d_k=K, d_v=V)
    with pytest.raises(ValueError, match=r"window of 3 keys .* mem_len=5"):
        tvq_eqx.vq_attention_with_state(q, k, v, c, st, block_len=L, mem_len=5)
    with pytest.raises(ValueError, match="needs mem_len"):
        VQAttentionState.empty(B, heads=H, codes=S, d_k=K, d_v=V)


def test_rejects_rel_table_longer_than_window():
    q, k, v, c = _small()
    with pytest.raises(
        ValueError, match=r"0\.\.6, but the bias range must be <= mem_len=5"
    ):
        tvq_eqx.vq_attention_with_state(
            q,
            k,
            v,
            c,
            None,
            block_len=L,
            mem_len=5,
            rel_query=q,
            rel_table=jnp.zeros((7, H, K)),
        )
    # A window above block_len takes the bias over all of it.
    out, st = tvq_eqx.vq_attention_with_state(
        q, k, v, c, None, block_len=L, mem_len=6, rel_query=q,
        rel_table=jnp.zeros((7, H, K)), implementation="xla",
    )  # fmt: skip
    assert out.shape == v.shape and st.mem_len == 6


def test_rejects_bad_options():
    q, k, v, c = _small()
    call = functools.partial(tvq_eqx.vq_attention_with_state, q, k, v, c, None)
    with pytest.raises(ValueError, match="sliding_window=True needs use_cache=False"):
        call(block_len=L, sliding_window=True)
    with pytest.raises(ValueError, match="state_keys must be one of"):
        call(block_len=L, state_keys="keys")
    # (the runtime type checker the tests enable may answer first)
    with pytest.raises((ValueError, TypeError), match="cache_grad"):
        call(block_len=L, cache_grad="no")


def test_pallas_rejects_mem_len_other_than_block_len():
    q, k, v, c = _small()
    with pytest.raises(
        ValueError, match=r"pallas' needs mem_len == block_len .* mem_len=6"
    ):
        tvq_eqx.vq_attention_with_state(
            q, k, v, c, None, block_len=L, mem_len=6, implementation="pallas"
        )


def test_pallas_rejects_partly_filled_window():
    # The kernels take one validity flag per row for the previous block.
    from tvq_eqx.ops._pallas import vq_attention_pallas

    q, k, v, c = _small()
    st = VQAttentionState.empty(B, mem_len=L, heads=H, codes=S, d_k=K, d_v=V)
    st = VQAttentionState(
        st.window_code,
        st.window_key,
        st.window_value,
        jnp.array([L, 2], jnp.int32),
        st.cache_count,
        st.cache_mean,
    )
    with pytest.raises(Exception, match="window whole or empty"):
        vq_attention_pallas(q, k, v, c, block_len=L, scale=0.5, state=st)
