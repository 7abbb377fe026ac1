"""Reliability of the attention ops: odd and bad inputs give the right result
or a clear error naming the argument, and long bf16 streams keep a float32
cache state."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import attention_inputs, random_state
from conftest import assert_close, rel_err

import tvq_eqx
from pallas_kernels.vq_attention import vq_attention_core
from tvq_eqx.ops import (
    FullAttentionState,
    VQAttentionState,
    _dispatch,
    vq_attention,
    vq_attention_with_state,
)

SHAPE = (1, 16, 1, 4, 4, 3, 8)  # (B, T, H, d_k, d_v, codes, block_len)


def _qkvc(getkey, shape=SHAPE, dtype=jnp.float32):
    d = attention_inputs(getkey(), shape, dtype)
    return d["query"], d["key"], d["value"], d["codebook"]


def _empty_state(shape, dtype):
    b, _, h, k, v, s, blk = shape
    return VQAttentionState.empty(
        b, mem_len=blk, heads=h, codes=s, d_k=k, d_v=v, dtype=dtype
    )


# ---- long bf16 streams: the carried cache is float32 -------------------------


def test_bf16_stream_with_drifting_values_tracks_float32(getkey):
    """512 calls of 8 tokens, 2 codes, values drifting from 1 to 4: with the
    cache mean rounded to bf16 after every call, a code's mean freezes once
    its per-call increment is below half an ulp (the outputs then end 17%
    away from float32); carried in float32 it stays at bf16 input rounding."""
    b, h, k, v, s, blk, t, n_seg = 1, 1, 4, 4, 2, 8, 8, 512
    ks = jax.random.split(getkey(), 4)
    n = t * n_seg

    def bf16_exact(x):  # both runs see the same input values
        return x.astype(jnp.bfloat16).astype(jnp.float32)

    q = bf16_exact(jax.random.normal(ks[0], (n_seg, b, t, h, k)))
    key = bf16_exact(jax.random.normal(ks[1], (n_seg, b, t, h, k)))
    drift = 3.0 * (jnp.arange(n) / n).reshape(n_seg, 1, t, 1, 1)
    val = bf16_exact(1.0 + drift + 0.1 * jax.random.normal(ks[2], (n_seg, b, t, h, v)))
    codebook = jax.random.normal(ks[3], (h, s, k))

    @functools.partial(jax.jit, static_argnames="dtype")
    def stream(q, key, val, dtype):
        def step(state, seg):
            qs, ks_, vs = (x.astype(dtype) for x in seg)
            out, state = vq_attention_with_state(
                qs, ks_, vs, codebook, state, block_len=blk, implementation="xla"
            )
            return state, out.astype(jnp.float32)

        state = _empty_state((b, t, h, k, v, s, blk), dtype)
        return jax.lax.scan(step, state, (q, key, val))

    ref_state, ref = stream(q, key, val, jnp.float32)
    state, out = stream(q, key, val, jnp.bfloat16)
    assert state.cache_mean.dtype == jnp.float32
    assert state.cache_count.dtype == jnp.float32
    assert_close(ref_state.cache_mean, state.cache_mean, 1e-3, name="cache_mean")
    last = np.abs(np.asarray(out[-1] - ref[-1])) / np.abs(np.asarray(ref[-1]))
    # bf16 output rounding is 2^-9 relative; the frozen bf16 cache gave 0.17.
    assert last.mean() < 4e-3 and last.max() < 1.5e-2, (last.mean(), last.max())


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_returned_cache_is_float32_for_low_precision_inputs(getkey, impl):
    q, k, v, c = _qkvc(getkey, dtype=jnp.bfloat16)
    assert _empty_state(SHAPE, jnp.bfloat16).cache_mean.dtype == jnp.float32
    # A hand-made state with a bf16 cache (older code made these) is accepted.
    old = random_state(getkey(), SHAPE, jnp.bfloat16)
    assert old.cache_mean.dtype == jnp.bfloat16
    out, new = vq_attention_with_state(
        q, k, v, c, old, block_len=SHAPE[-1], implementation=impl
    )
    assert out.dtype == jnp.bfloat16
    assert new.cache_mean.dtype == jnp.float32
    assert new.cache_count.dtype == jnp.float32
    assert new.window_value.dtype == jnp.bfloat16


def test_model_state_cache_is_float32_with_bf16_activations(getkey):
    cfg = tvq_eqx.TransformerConfig(
        d_model=16,
        d_k=4,
        d_v=4,
        n_head=1,
        n_code=4,
        n_layer=1,
        block_len=4,
        dtype="bfloat16",
    )
    unit = tvq_eqx.nn.VQAttention(cfg, key=getkey())
    state = unit.init_state(2)
    assert isinstance(state, VQAttentionState)
    assert state.cache_mean.dtype == jnp.float32
    assert state.window_value.dtype == jnp.bfloat16


# ---- scale -------------------------------------------------------------------


@pytest.mark.parametrize(
    "scale",
    [
        float("nan"),
        float("inf"),
        -float("inf"),
        np.float32("nan"),
        jnp.asarray(jnp.inf),
        True,
        "0.5",
        jnp.ones(2),
        [0.5],
    ],
    ids=["nan", "inf", "-inf", "np-nan", "jnp-inf", "bool", "str", "vector", "list"],
)
def test_bad_scale_is_named(getkey, scale):
    q, k, v, c = _qkvc(getkey)
    # (TypeError: the type-checking import hook, where on, names it first.)
    with pytest.raises((ValueError, TypeError), match="scale"):
        vq_attention(q, k, v, c, block_len=8, scale=scale, implementation="xla")
    with pytest.raises((ValueError, TypeError), match="scale"):
        vq_attention_with_state(q, k, v, c, None, block_len=8, scale=scale)


def test_new_scale_value_does_not_recompile(getkey):
    q, k, v, c = _qkvc(getkey)
    outs = [vq_attention(q, k, v, c, block_len=8, scale=0.3, implementation="xla")]
    size = _dispatch._xla_jit._cache_size()
    for scale in (0.4, 0.55, np.float32(0.6), jnp.asarray(0.7), 1):
        outs.append(
            vq_attention(q, k, v, c, block_len=8, scale=scale, implementation="xla")
        )
    assert _dispatch._xla_jit._cache_size() == size
    assert rel_err(outs[0], outs[1]) > 1e-3  # the new value is used


@pytest.mark.parametrize("impl", ["xla", "quadratic", "pallas"])
def test_traced_scale_under_jit_and_grad(getkey, impl):
    """A learned temperature: a traced scale under jit equals the Python
    float, and its gradient matches finite differences and the quadratic
    form's (pallas: the scale is folded into the query; value only)."""
    q, k, v, c = _qkvc(getkey)
    w = jax.random.normal(getkey(), v.shape)

    def loss(scale, impl=impl):
        out = vq_attention(q, k, v, c, block_len=8, scale=scale, implementation=impl)
        return jnp.sum(out * w)

    s0 = 0.7
    eager = vq_attention(q, k, v, c, block_len=8, scale=s0, implementation=impl)
    traced = jax.jit(
        lambda s: vq_attention(q, k, v, c, block_len=8, scale=s, implementation=impl)
    )(jnp.float32(s0))
    assert_close(eager, traced, 1e-5, name="jit")
    # pallas: the traced scale is folded into q, so its gradient comes from
    # the kernels' dq.
    grad = float(jax.grad(loss)(jnp.float32(s0)))
    h = 1e-2
    fd = (float(loss(s0 + h)) - float(loss(s0 - h))) / (2 * h)
    ref = float(jax.grad(lambda s: loss(s, "quadratic"))(jnp.float32(s0)))
    assert abs(grad - ref) <= 1e-4 * abs(ref) + 1e-5, (grad, ref)
    assert abs(grad - fd) <= 1e-2 * abs(fd) + 1e-4, (grad, fd)


# ---- empty and zero sizes ----------------------------------------------------

EMPTY = {
    "seq0": (2, 0, 2, 4, 4, 3, 8),
    "batch0": (0, 16, 2, 4, 4, 3, 8),
    "heads0": (2, 16, 0, 4, 4, 3, 8),
    "d_v0": (2, 16, 2, 4, 0, 3, 8),
}


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("case", list(EMPTY))
def test_zero_sizes_give_the_empty_result(getkey, case, impl):
    shape = EMPTY[case]
    b, t, h, _, dv, _, blk = shape
    q, k, v, c = _qkvc(getkey, shape)
    out = vq_attention(q, k, v, c, block_len=blk, implementation=impl)
    assert out.shape == (b, t, h, dv) and out.dtype == v.dtype
    state = random_state(getkey(), shape) if b else None
    out, new = vq_attention_with_state(
        q, k, v, c, state, block_len=blk, implementation=impl
    )
    assert out.shape == (b, t, h, dv)
    assert new.cache_mean.shape == (b, h, 3, dv)
    assert new.cache_mean.dtype == jnp.float32
    if case == "seq0":  # nothing streamed: the state is unchanged
        for old_leaf, new_leaf in zip(
            jax.tree.leaves(state), jax.tree.leaves(new), strict=True
        ):
            np.testing.assert_array_equal(old_leaf, new_leaf)
    elif case == "heads0":  # the tokens still pass through the window
        np.testing.assert_array_equal(new.length, [blk, blk])
    elif case == "d_v0":  # the keys still enter the window and the cache
        v1 = jnp.ones(v.shape[:3] + (1,))
        state1 = VQAttentionState(
            **{
                **vars(state),
                "window_value": jnp.ones(state.window_value.shape[:3] + (1,)),
                "cache_mean": jnp.ones(state.cache_mean.shape[:3] + (1,)),
            }
        )
        _, ref = vq_attention_with_state(q, k, v1, c, state1, block_len=blk)
        np.testing.assert_array_equal(ref.cache_count, new.cache_count)
        np.testing.assert_array_equal(ref.window_code, new.window_code)
        assert float(new.cache_count.sum()) > float(state.cache_count.sum())


@pytest.mark.parametrize("impl", ["xla", "pallas", "quadratic"])
def test_zero_d_k_or_no_codes_is_named(getkey, impl):
    q, k, v, c = _qkvc(getkey)
    with pytest.raises(ValueError, match=r"d_k >= 1.*\(1, 16, 1, 0\)"):
        vq_attention(
            q[..., :0], k[..., :0], v, c[..., :0], block_len=8, implementation=impl
        )
    with pytest.raises(
        ValueError, match=r"codebook needs at least one code.*\(1, 0, 4\)"
    ):
        vq_attention(q, k, v, c[:, :0], block_len=8, implementation=impl)


# ---- integer arguments, states, implementation -------------------------------


def test_numpy_integers_accepted_bools_and_floats_rejected(getkey):
    q, k, v, c = _qkvc(getkey)
    ref, ref_state = vq_attention_with_state(q, k, v, c, None, block_len=8, mem_len=8)
    out, state = vq_attention_with_state(
        q, k, v, c, None, block_len=np.int64(8), mem_len=np.int32(8)
    )
    np.testing.assert_array_equal(ref, out)
    assert state.mem_len == 8
    np.testing.assert_array_equal(
        vq_attention(q, k, v, c, block_len=np.int16(8)),
        vq_attention(q, k, v, c, block_len=8),
    )
    empty = VQAttentionState.empty(
        np.int64(1),
        mem_len=np.int64(8),
        heads=np.int32(1),
        codes=np.int64(3),
        d_k=np.int64(4),
        d_v=np.int64(4),
    )
    assert empty.window_code.shape == (1, 8, 1) and empty.cache_mean.shape == (
        1,
        1,
        3,
        4,
    )
    for bad in (True, np.bool_(True), 8.0, np.float32(8), "8", 0, -8):
        with pytest.raises((ValueError, TypeError), match="block_len"):
            vq_attention(q, k, v, c, block_len=bad)
    for bad in (False, 8.0, np.float64(8), -1):
        with pytest.raises((ValueError, TypeError), match="mem_len"):
            vq_attention_with_state(q, k, v, c, None, block_len=8, mem_len=bad)
    with pytest.raises(ValueError, match="mem_len must be a non-negative int"):
        VQAttentionState.empty(1, mem_len=True, heads=1, codes=3, d_k=4, d_v=4)


def test_bad_state_is_named(getkey):
    q, k, v, c = _qkvc(getkey)
    good = random_state(getkey(), SHAPE)
    full = FullAttentionState.empty(1, capacity=8, heads=1, d_k=4, d_v=4)
    for bad in ({"window_code": good.window_code}, full, (good,)):
        with pytest.raises(TypeError, match="state"):
            vq_attention_with_state(q, k, v, c, bad, block_len=8)
    # tree_at swaps a field without re-running the (type-checked) __init__,
    # as a state built without the type-checking hook would arrive.
    float_codes = eqx.tree_at(
        lambda st: st.window_code, good, good.window_code.astype(jnp.float32)
    )
    with pytest.raises(TypeError, match="state.window_code must have an integer dtype"):
        vq_attention_with_state(q, k, v, c, float_codes, block_len=8)
    int_mean = eqx.tree_at(
        lambda st: st.cache_mean, good, good.cache_mean.astype(jnp.int32)
    )
    with pytest.raises(TypeError, match="state.cache_mean must have a"):
        vq_attention_with_state(q, k, v, c, int_mean, block_len=8)
    other = random_state(getkey(), (2, 16, 1, 4, 4, 3, 8))  # another batch size
    with pytest.raises(
        ValueError, match=r"state.window_code must have shape \(1, 8, 1\)"
    ):
        vq_attention_with_state(q, k, v, c, other, block_len=8)


def test_integer_or_mixed_arrays_are_named(getkey):
    q, k, v, c = _qkvc(getkey)
    with pytest.raises(TypeError, match="codebook must be a floating-point array"):
        vq_attention(q, k, v, c.astype(jnp.int32), block_len=8)
    with pytest.raises(TypeError, match="query must be a floating-point array"):
        vq_attention(q.astype(jnp.int8), k, v, c, block_len=8)


def test_implementation_is_checked_before_the_arrays(getkey):
    q, k, v, c = _qkvc(getkey)
    with pytest.raises(ValueError, match="implementation must be one of"):
        vq_attention(q[0], k, v, c, block_len=8, implementation="flash")
    with pytest.raises(ValueError, match="implementation must be one of"):
        vq_attention_with_state(q[0], k, v, c, None, block_len=8, implementation="")
    with pytest.raises(ValueError, match="no streaming state"):
        vq_attention_with_state(
            q[0], k, v, c, None, block_len=8, implementation="quadratic"
        )


# ---- the kernels' own wrapper ------------------------------------------------


def test_kernel_wrapper_validation(getkey):
    bh, t, dk, dv, blk = 2, 8, 4, 4, 8
    ks = jax.random.split(getkey(), 3)
    q = jax.random.normal(ks[0], (bh, t, dk))
    k_ext = jax.random.normal(ks[1], (bh, t + blk, dk))
    v_ext = jax.random.normal(ks[2], (bh, t + blk, dv))
    valid = jnp.ones((bh, 1, 1))
    args = (q, k_ext, v_ext, valid)
    kw = dict(block_len=blk, num_heads=2)
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="scale must be"):
            vq_attention_core(*args, scale=bad, **kw)
    with pytest.raises(ValueError, match="scale must be a Python float"):
        jax.jit(lambda s: vq_attention_core(*args, scale=s, **kw))(1.0)
    with pytest.raises(ValueError, match="num_heads must be an int >= 1"):
        vq_attention_core(*args, scale=1.0, block_len=blk, num_heads=0)
    with pytest.raises(ValueError, match="block_len must be an int >= 1"):
        vq_attention_core(*args, scale=1.0, block_len=8.0, num_heads=2)
    with pytest.raises(ValueError, match="window_len must be an int"):
        vq_attention_core(*args, scale=1.0, window_len=2.5, **kw)
    with pytest.raises(ValueError, match="d_k must be >= 1"):
        vq_attention_core(q[..., :0], k_ext[..., :0], v_ext, valid, scale=1.0, **kw)
    empty = vq_attention_core(
        q[:, :0], k_ext[:, :blk], v_ext[:, :blk], valid, scale=1.0, **kw
    )
    assert empty.shape == (bh, 0, dv)


def test_nan_in_inputs_is_not_checked_and_reaches_its_block_onward(getkey):
    """NaN/inf inside the arrays is left to the user (checking costs a pass
    over the data). It reaches every output of its own block and after
    (masked weights are exactly 0, and 0 * NaN = NaN), none before."""
    q, k, v, c = _qkvc(getkey)
    v = v.at[0, 9].set(jnp.nan)  # block 1 (positions 8..15)
    out = vq_attention(q, k, v, c, block_len=8, implementation="xla")
    assert np.isfinite(np.asarray(out[0, :8])).all()
    assert np.isnan(np.asarray(out[0, 8:])).all()
