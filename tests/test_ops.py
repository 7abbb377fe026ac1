"""vq_attention: the linear-time xla form against the quadratic definition."""

import math

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import attention_inputs, shape_id
from conftest import assert_close, rel_err

import tvq_eqx
from tvq_eqx.ops import VQAttentionState, quantize
from tvq_eqx.ops import vq_attention_quadratic as _quadratic
from tvq_eqx.ops import vq_attention_xla as _xla
from tvq_eqx.ops._reference import vq_attention_reference as _reference

# Jitted once per shape: op-by-op dispatch would compile every primitive.
vq_attention_xla = jax.jit(
    _xla,
    static_argnames=(
        "block_len",
        "scale",
        "use_cache",
        "cache_grad",
        "mem_len",
        "sliding_window",
        "state_keys",
    ),
)
# The dense reference (the definition plus the linear-time form's options).
vq_attention_quadratic = jax.jit(
    _reference,
    static_argnames=(
        "scale",
        "block_len",
        "mem_len",
        "key_grad_window",
        "cache_grad",
        "use_cache",
        "sliding_window",
        "quantize_keys",
    ),
)

# (B, T, H, K, V, S, L): awkward sizes, d_k != d_v, codes > tokens (empty codes),
# a single code, one block only (empty cache), many small blocks.
SHAPES = [
    (1, 8, 1, 4, 4, 3, 8),
    (2, 48, 3, 8, 5, 7, 8),
    (2, 48, 3, 8, 5, 7, 6),
    (2, 60, 2, 5, 7, 11, 12),
    (1, 64, 1, 16, 16, 1, 16),
    (3, 30, 2, 6, 3, 40, 10),
    (1, 36, 2, 4, 9, 5, 3),
]


def make_inputs(getkey, shape, dtype=jnp.float32, mem_len=None):
    """(q, k, v, codebook, rel_query, rel_table); rel_table over 0..mem_len."""
    return tuple(attention_inputs(getkey(), shape, dtype, rel_len=mem_len).values())


@pytest.mark.parametrize(
    "shape,with_bias",
    [(s, True) for s in SHAPES] + [(SHAPES[0], False), (SHAPES[3], False)],
    ids=lambda x: (
        shape_id(x) if isinstance(x, tuple) else ("xlbias" if x else "nobias")
    ),
)
def test_xla_equals_quadratic_forward_f32(getkey, shape, with_bias):
    q, k, v, c, rq, rt = make_inputs(getkey, shape)
    block_len = shape[-1]
    bias = dict(rel_query=rq, rel_table=rt) if with_bias else {}
    ref = vq_attention_quadratic(q, k, v, c, scale=0.7, **bias)
    out, _ = vq_attention_xla(q, k, v, c, block_len=block_len, scale=0.7, **bias)
    assert out.shape == ref.shape == v.shape and out.dtype == jnp.float32
    assert rel_err(ref, out) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES[1:4], ids=shape_id)
def test_public_api_implementations_agree(getkey, shape):
    q, k, v, c, _, _ = make_inputs(getkey, shape)
    ref = tvq_eqx.vq_attention(
        q, k, v, c, block_len=shape[-1], implementation="quadratic"
    )
    out = tvq_eqx.vq_attention(q, k, v, c, block_len=shape[-1], implementation="xla")
    default = tvq_eqx.vq_attention(q, k, v, c, block_len=shape[-1])
    assert rel_err(ref, out) <= 1e-5
    assert rel_err(ref, default) <= 1e-5
    # Default scale is 1/sqrt(d_k), as in jax.nn.dot_product_attention.
    explicit = vq_attention_quadratic(q, k, v, c, scale=1 / math.sqrt(shape[3]))
    np.testing.assert_array_equal(ref, explicit)


def test_block_length_invariance(getkey):
    shape = (2, 48, 2, 8, 6, 9, 48)
    q, k, v, c, rq, rt = make_inputs(getkey, shape, mem_len=4)
    outs = [
        vq_attention_xla(
            q, k, v, c, block_len=l, scale=0.5, rel_query=rq, rel_table=rt
        )[0]
        for l in (4, 8, 12, 48)
    ]
    for out in outs[1:]:
        assert rel_err(outs[0], out) <= 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", SHAPES[1:4], ids=shape_id)
def test_xla_low_precision_close_to_f32_definition(getkey, shape, dtype):
    # Reference: the f32 definition on the same (rounded) inputs. The xla form
    # rounds codewords, cached means and the output to `dtype`: with unit-scale
    # scores that is a few parts in 1e3 (bf16 has an 8-bit mantissa), so 2e-2.
    q, k, v, c, rq, rt = make_inputs(getkey, shape, dtype)
    up = lambda x: x.astype(jnp.float32)
    ref = vq_attention_quadratic(
        up(q), up(k), up(v), c, scale=0.5, rel_query=up(rq), rel_table=up(rt)
    )
    out, state = vq_attention_xla(
        q, k, v, c, block_len=shape[-1], scale=0.5, rel_query=rq, rel_table=rt
    )
    # The carried cache is float32 whatever the activation dtype (long streams).
    assert out.dtype == dtype and state.cache_mean.dtype == jnp.float32
    tol = 2e-2 if dtype == jnp.bfloat16 else 4e-3
    assert rel_err(ref, out) <= tol
    assert np.isfinite(np.asarray(out, np.float32)).all()


def _grads(fn, q, k, v, c, rq, rt, cot):
    def f(q, k, v, c, rq, rt):
        return jnp.sum(fn(q, k, v, c, rq, rt) * cot)

    return jax.grad(f, argnums=(0, 1, 2, 3, 4, 5))(q, k, v, c, rq, rt)


@pytest.mark.parametrize("shape", SHAPES[1:], ids=shape_id)
def test_gradient_semantics(getkey, shape):
    q, k, v, c, rq, rt = make_inputs(getkey, shape)
    l = shape[-1]
    cot = jax.random.normal(getkey(), v.shape)

    def xla(q, k, v, c, rq, rt):
        return vq_attention_xla(
            q, k, v, c, block_len=l, scale=0.6, rel_query=rq, rel_table=rt
        )[0]

    def quad(window):
        def f(q, k, v, c, rq, rt):
            return vq_attention_quadratic(
                q,
                k,
                v,
                c,
                scale=0.6,
                rel_query=rq,
                rel_table=rt,
                block_len=l,
                key_grad_window=window,
            )

        return f

    gx = jax.jit(lambda *a: _grads(xla, *a))(q, k, v, c, rq, rt, cot)
    gq_full = jax.jit(lambda *a: _grads(quad(False), *a))(q, k, v, c, rq, rt, cot)
    gq_win = jax.jit(lambda *a: _grads(quad(True), *a))(q, k, v, c, rq, rt, cot)
    names = ["dq", "dk", "dv", "dcodebook", "drel_query", "drel_table"]
    for name, a, b in zip(names, gx, gq_win, strict=True):
        assert a.shape == b.shape, name
        if name == "dcodebook":
            continue
        assert_close(b, a, 1e-5, name=name)
    # dq, dv and the bias gradients equal the definition's exactly...
    for i in (0, 2, 4, 5):
        assert_close(gq_full[i], gx[i], 1e-5, name=names[i])
    # ...no gradient reaches the codebook from attention...
    assert not np.any(np.asarray(gx[3])) and not np.any(np.asarray(gq_full[3]))
    # ...and dk is the windowed straight-through estimator, which differs from
    # the definition's as soon as some key is older than the previous block.
    if shape[1] > 2 * l:
        assert rel_err(gq_full[1], gx[1]) > 1e-3
    else:
        assert_close(gq_full[1], gx[1], 1e-5, name="dk")


def test_straight_through_key_gradient_is_nonzero_and_matches_scores(getkey):
    # d out / d k through the straight-through path equals the gradient of
    # attention with the (frozen) codewords substituted, w.r.t. the codewords.
    shape = (1, 16, 1, 4, 3, 5, 8)
    q, k, v, c, _, _ = make_inputs(getkey, shape)
    cot = jax.random.normal(getkey(), v.shape)
    codes = quantize(k, c)
    khat = c[jnp.arange(1), codes]

    def dense(khat):
        s = 0.5 * jnp.einsum("bihk,bjhk->bhij", q, khat, precision="highest")
        s = jnp.where(jnp.tril(jnp.ones((16, 16), bool)), s, -jnp.inf)
        p = jax.nn.softmax(s, -1)
        return jnp.sum(jnp.einsum("bhij,bjhv->bihv", p, v, precision="highest") * cot)

    want = jax.grad(dense)(khat)
    got = jax.grad(
        lambda k: jnp.sum(vq_attention_quadratic(q, k, v, c, scale=0.5) * cot)
    )(k)
    assert np.abs(np.asarray(got)).max() > 0
    assert rel_err(want, got) <= 1e-5


def test_cache_grad_off_matches_in_block_value_gradient(getkey):
    shape = (2, 40, 2, 4, 6, 5, 8)
    q, k, v, c, rq, rt = make_inputs(getkey, shape)
    cot = jax.random.normal(getkey(), v.shape)
    dv = jax.grad(
        lambda v: jnp.sum(
            vq_attention_xla(q, k, v, c, block_len=8, scale=0.5, cache_grad=False)[0]
            * cot
        )
    )(v)
    dv_ref = jax.grad(
        lambda v: jnp.sum(
            vq_attention_quadratic(q, k, v, c, scale=0.5, block_len=8, cache_grad=False)
            * cot
        )
    )(v)
    dv_full = jax.grad(
        lambda v: jnp.sum(vq_attention_quadratic(q, k, v, c, scale=0.5) * cot)
    )(v)
    assert rel_err(dv_ref, dv) <= 1e-5
    assert rel_err(dv_full, dv) > 1e-3


def test_window_only_equals_masked_definition(getkey):
    shape = (2, 48, 2, 6, 5, 7, 8)
    q, k, v, c, rq, rt = make_inputs(getkey, shape)
    ref = vq_attention_quadratic(
        q, k, v, c, scale=0.5, rel_query=rq, rel_table=rt, block_len=8, use_cache=False
    )
    out, _ = vq_attention_xla(
        q, k, v, c, block_len=8, scale=0.5, rel_query=rq, rel_table=rt, use_cache=False
    )
    assert rel_err(ref, out) <= 1e-5
    full = vq_attention_quadratic(q, k, v, c, scale=0.5, rel_query=rq, rel_table=rt)
    assert rel_err(full, out) > 1e-3  # the cache matters at this length


@pytest.mark.parametrize("splits", [(16, 16, 16), (8, 40), (32, 8, 8), (48,)])
def test_streaming_equals_one_call(getkey, splits):
    shape = (2, 48, 2, 6, 5, 7, 8)
    q, k, v, c, rq, rt = make_inputs(getkey, shape)
    full, full_state = vq_attention_xla(
        q, k, v, c, block_len=8, scale=0.5, rel_query=rq, rel_table=rt
    )
    state, outs, start = None, [], 0
    for n in splits:
        sl = slice(start, start + n)
        o, state = tvq_eqx.vq_attention_with_state(
            q[:, sl],
            k[:, sl],
            v[:, sl],
            c,
            state,
            block_len=8,
            scale=0.5,
            rel_query=rq[:, sl],
            rel_table=rt,
            implementation="xla",
        )
        outs.append(o)
        start += n
    assert rel_err(full, jnp.concatenate(outs, axis=1)) <= 1e-5
    np.testing.assert_array_equal(state.window_code, full_state.window_code)
    np.testing.assert_array_equal(state.cache_count, full_state.cache_count)
    assert rel_err(full_state.cache_mean, state.cache_mean) <= 1e-5


def test_state_contents(getkey):
    shape = (1, 32, 1, 4, 3, 6, 8)
    q, k, v, c, _, _ = make_inputs(getkey, shape)
    _, state = vq_attention_xla(q, k, v, c, block_len=8, scale=0.5)
    codes = np.asarray(quantize(k, c))[0, :, 0]  # [T]
    np.testing.assert_array_equal(state.window_code[0, :, 0], codes[24:])
    want_count = np.bincount(codes[:24], minlength=6)
    np.testing.assert_array_equal(state.cache_count[0, 0], want_count)
    vals = np.asarray(v)[0, :24, 0]
    for s in range(6):
        if want_count[s]:
            np.testing.assert_allclose(
                state.cache_mean[0, 0, s],
                vals[codes[:24] == s].mean(0),
                rtol=1e-5,
                atol=1e-6,
            )
    assert int(state.length[0]) == 8


def test_empty_state_is_nan_free_with_collapsed_codes(getkey):
    # All keys on one code, huge scores: no NaN/inf anywhere, fwd or bwd.
    b, t, h, d = 1, 32, 1, 4
    q = 30.0 * jax.random.normal(getkey(), (b, t, h, d))
    k = jnp.ones((b, t, h, d))
    v = jax.random.normal(getkey(), (b, t, h, d))
    c = jnp.concatenate([jnp.ones((h, 1, d)), 50 * jnp.ones((h, 3, d))], axis=1)
    out, g = jax.jit(
        jax.value_and_grad(
            lambda q, k, v: jnp.sum(_xla(q, k, v, c, block_len=8, scale=1.0)[0]),
            argnums=(0, 1, 2),
        )
    )(q, k, v)
    assert np.isfinite(out) and all(np.isfinite(np.asarray(x)).all() for x in g)


def test_causality_jacobian(getkey):
    shape = (1, 24, 1, 4, 2, 5, 8)
    q, k, v, c, rq, rt = make_inputs(getkey, shape)

    def f(q, k, v):
        return vq_attention_xla(
            q, k, v, c, block_len=8, scale=0.5, rel_query=rq, rel_table=rt
        )[0][0, :, 0, 0]

    jq, jk, jv = jax.jit(jax.jacrev(f, argnums=(0, 1, 2)))(q, k, v)
    for jac in (jq, jk, jv):
        per_pos = np.abs(np.asarray(jac))[:, 0, :, 0, :].sum(-1)  # [out t, in t]
        assert np.all(np.triu(per_pos, 1) == 0), "output depends on a future token"
    dv = np.abs(np.asarray(jv))[:, 0, :, 0, :].sum(-1)
    assert np.all(dv[np.tril_indices(24)] > 0), "output must depend on every past value"


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(
    n_blocks=st.integers(1, 5),
    block_len=st.integers(1, 7),
    heads=st.integers(1, 2),
    d_k=st.integers(1, 6),
    d_v=st.integers(1, 6),
    codes=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_property_xla_equals_quadratic(
    n_blocks, block_len, heads, d_k, d_v, codes, seed
):
    t = n_blocks * block_len
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (1, t, heads, d_k))
    k = jax.random.normal(ks[1], (1, t, heads, d_k))
    v = jax.random.normal(ks[2], (1, t, heads, d_v))
    c = jax.random.normal(ks[3], (heads, codes, d_k))
    ref = vq_attention_quadratic(q, k, v, c, scale=0.8)
    out, _ = vq_attention_xla(q, k, v, c, block_len=block_len, scale=0.8)
    assert rel_err(ref, out) <= 1e-5


# ---- bad input -------------------------------------------------------------


def _ok(getkey):
    return make_inputs(getkey, (2, 16, 2, 4, 3, 5, 8))[:4]


def test_rejects_wrong_rank(getkey):
    q, k, v, c = _ok(getkey)
    with pytest.raises(ValueError, match=r"query must have rank 4.*\(2, 16, 8\)"):
        tvq_eqx.vq_attention(q.reshape(2, 16, 8), k, v, c, block_len=8)
    with pytest.raises(ValueError, match="codebook must have rank 3"):
        tvq_eqx.vq_attention(q, k, v, c[0], block_len=8)


def test_seq_not_multiple_of_block_needs_block_free_state(getkey):
    # Any seq length, except in a streaming call whose carried state depends
    # on where blocks begin (tests/test_any_length.py has the rest).
    q, k, v, c = _ok(getkey)
    with pytest.raises(ValueError, match=r"seq length 16 .* block_len=5 .*cache_decay"):
        tvq_eqx.vq_attention_with_state(q, k, v, c, None, block_len=5, cache_decay=0.5)
    with pytest.raises(
        ValueError, match=r"seq length 16 .* block_len=5 .*block window"
    ):
        tvq_eqx.vq_attention_with_state(
            q, k, v, c, None, block_len=5, use_cache=False, sliding_window=False
        )
    with pytest.raises(ValueError, match="block_len must be a positive int"):
        tvq_eqx.vq_attention(q, k, v, c, block_len=0)


def test_rejects_mismatched_heads_and_dims(getkey):
    q, k, v, c = _ok(getkey)
    with pytest.raises(ValueError, match=r"key must have the same .* \(2, 16, 1, 4\)"):
        tvq_eqx.vq_attention(q, k[:, :, :1], v, c, block_len=8)
    with pytest.raises(ValueError, match=r"value must share .* \(2, 8, 2, 3\)"):
        tvq_eqx.vq_attention(q, k, v[:, :8], c, block_len=8)
    with pytest.raises(ValueError, match=r"codebook must be \[heads=2, codes, d_k=4\]"):
        tvq_eqx.vq_attention(q, k, v, c[:, :, :3], block_len=8)
    with pytest.raises(ValueError, match=r"codebook must be \[heads=2"):
        tvq_eqx.vq_attention(q, k, v, c[:1], block_len=8)


def test_rejects_integer_inputs(getkey):
    q, k, v, c = _ok(getkey)
    with pytest.raises(
        TypeError, match="query must be a floating-point array; got dtype int32"
    ):
        tvq_eqx.vq_attention(q.astype(jnp.int32), k, v, c, block_len=8)
    with pytest.raises(TypeError, match="value must be a floating-point"):
        tvq_eqx.vq_attention(q, k, v.astype(jnp.int32), c, block_len=8)


def test_rejects_unknown_implementation_and_bad_state(getkey):
    q, k, v, c = _ok(getkey)
    with pytest.raises(ValueError, match="implementation must be one of"):
        tvq_eqx.vq_attention(q, k, v, c, block_len=8, implementation="cuda")
    bad = VQAttentionState.empty(3, block_len=8, heads=2, codes=5, d_k=4, d_v=3)
    with pytest.raises(
        ValueError, match=r"state.window_code must have shape \(2, 8, 2\)"
    ):
        tvq_eqx.vq_attention_with_state(q, k, v, c, bad, block_len=8)
    with pytest.raises(ValueError, match="no streaming state"):
        tvq_eqx.vq_attention_with_state(
            q, k, v, c, None, block_len=8, implementation="quadratic"
        )


def test_rejects_bad_relative_bias(getkey):
    q, k, v, c = _ok(getkey)
    with pytest.raises(
        ValueError, match="rel_query and rel_table must be given together"
    ):
        tvq_eqx.vq_attention_with_state(q, k, v, c, None, block_len=8, rel_query=q)
    with pytest.raises(ValueError, match=r"bias range must be <= mem_len=8"):
        tvq_eqx.vq_attention_with_state(
            q, k, v, c, None, block_len=8, rel_query=q, rel_table=jnp.zeros((10, 2, 4))
        )


# ---- the "full" baseline ---------------------------------------------------


def test_full_attention_equals_unquantized_definition_and_streams(getkey):
    from tvq_eqx.ops import FullAttentionState, full_attention_with_state

    shape = (2, 24, 2, 6, 5, 7, 8)
    q, k, v, c, rq, rt = make_inputs(getkey, shape, mem_len=5)
    ref = vq_attention_quadratic(
        q, k, v, c, scale=0.5, rel_query=rq, rel_table=rt, quantize_keys=False
    )
    full = jax.jit(full_attention_with_state, static_argnames="scale")
    empty = FullAttentionState.empty(2, capacity=32, heads=2, d_k=6, d_v=5)
    out, _ = full(q, k, v, empty, scale=0.5, rel_query=rq, rel_table=rt)
    assert rel_err(ref, out) <= 1e-5
    state, outs = empty, []
    for sl in (slice(0, 8), slice(8, 9), slice(9, 24)):
        o, state = full(
            q[:, sl],
            k[:, sl],
            v[:, sl],
            state,
            scale=0.5,
            rel_query=rq[:, sl],
            rel_table=rt,
        )
        outs.append(o)
    assert rel_err(ref, jnp.concatenate(outs, 1)) <= 1e-5
    assert state.length.tolist() == [24, 24]
    # A cache smaller than the history forgets exactly the oldest tokens.
    small = FullAttentionState.empty(2, capacity=4, heads=2, d_k=6, d_v=5)
    _, st = full(q[:, :16], k[:, :16], v[:, :16], small, scale=0.5)
    o_small, _ = full(q[:, 16:], k[:, 16:], v[:, 16:], st, scale=0.5)
    kk = k.at[:, :12].set(0.0)
    want = _quadratic(
        q[:, 12:], kk[:, 12:], v[:, 12:], c, scale=0.5, quantize_keys=False
    )[:, 4:]
    assert rel_err(want, o_small) <= 1e-5
