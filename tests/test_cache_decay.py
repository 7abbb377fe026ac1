"""The decayed compressive cache (`cache_decay` < 1): the xla form and the
Pallas kernels equal the updated quadratic definition (forward and gradients),
streaming equals one call, the carried counts stay bounded, and bad values
are named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import user_call

import tvq_eqx
from tvq_eqx.ops import (
    vq_attention,
    vq_attention_quadratic,
    vq_attention_with_state,
)
from tvq_eqx.ops._quadratic import cache_age_bias

B, T, H, K, V, S, L = 2, 48, 2, 8, 8, 4, 8


def _inputs(getkey, dtype=jnp.float32):
    q, k = (jax.random.normal(getkey(), (B, T, H, K), dtype) for _ in range(2))
    v = jax.random.normal(getkey(), (B, T, H, V), dtype)
    codebook = jax.random.normal(getkey(), (H, S, K), jnp.float32)
    return q, k, v, codebook


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_age_bias_matches_block_arithmetic():
    # Block 3 (queries 24..31), L = 8, M = 8: keys 0..15 are cached; keys
    # 0..7 left the window at block 2 (age 1), keys 8..15 at block 3 (age 0).
    bias = np.asarray(cache_age_bias(32, block_len=8, mem_len=8, cache_decay=0.5))
    row = bias[24]
    np.testing.assert_allclose(row[:8], np.log(0.5), rtol=1e-6)
    np.testing.assert_array_equal(row[8:], 0.0)
    # mem_len 12: key j enters at block (j + 12) // 8 + 1.
    bias = np.asarray(cache_age_bias(32, block_len=8, mem_len=12, cache_decay=0.5))
    assert np.all(bias[24, 12:] == 0.0)  # inside the window of block 3
    np.testing.assert_allclose(bias[24, :4], np.log(0.5), rtol=1e-6)  # age 1
    np.testing.assert_array_equal(bias[24, 4:12], 0.0)  # entered at block 3


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("decay", [0.9, 0.4])
def test_decayed_cache_equals_quadratic_definition(getkey, implementation, decay):
    q, k, v, codebook = _inputs(getkey)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v)))

    def linear(q, k, v):
        return vq_attention(
            q, k, v, codebook, block_len=L, cache_decay=decay,
            implementation=implementation,
        )  # fmt: skip

    def definition(q, k, v):
        return vq_attention_quadratic(
            q, k, v, codebook, scale=K**-0.5, cache_decay=decay, block_len=L
        )

    plain = vq_attention_quadratic(q, k, v, codebook, scale=K**-0.5)
    want = definition(q, k, v)
    assert _rel(want, plain) > 1e-2  # the decay is visible
    assert _rel(linear(q, k, v), want) < 1e-5
    # dq and dv are exact; dk follows the paper's window estimator, so it is
    # compared with the key gradient restricted to the window in both.
    g_want = jax.grad(lambda q, v: loss(definition, q, k, v), argnums=(0, 1))(q, v)
    g_got = jax.grad(lambda q, v: loss(linear, q, k, v), argnums=(0, 1))(q, v)
    for a, b in zip(g_got, g_want, strict=True):
        assert _rel(a, b) < 2e-5


def test_decayed_cache_with_a_longer_window_equals_definition(getkey):
    q, k, v, codebook = _inputs(getkey)
    got, _ = vq_attention_with_state(
        q, k, v, codebook, None, block_len=L, mem_len=12, cache_decay=0.7,
        implementation="xla",
    )  # fmt: skip
    want = vq_attention_quadratic(
        q, k, v, codebook, scale=K**-0.5, cache_decay=0.7, block_len=L, mem_len=12
    )
    assert _rel(got, want) < 1e-5


def test_bfloat16_decayed_cache_tracks_float32_definition(getkey):
    q, k, v, codebook = _inputs(getkey)
    want = vq_attention_quadratic(
        q, k, v, codebook, scale=K**-0.5, cache_decay=0.8, block_len=L
    )
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = vq_attention(*bf, codebook, block_len=L, cache_decay=0.8)
    assert got.dtype == jnp.bfloat16
    assert _rel(got.astype(jnp.float32), want) < 2e-2


def test_streamed_decayed_cache_equals_one_call_and_stays_bounded(getkey):
    q, k, v, codebook = _inputs(getkey)
    decay = 0.6
    kw = dict(block_len=L, cache_decay=decay, implementation="xla")
    whole, s_whole = vq_attention_with_state(q, k, v, codebook, None, **kw)
    state, outs = None, []
    for lo, hi in ((0, 16), (16, 24), (24, T)):
        out, state = vq_attention_with_state(
            q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], codebook, state, **kw
        )
        outs.append(out)
    assert _rel(jnp.concatenate(outs, axis=1), whole) < 1e-6
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s_whole), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    # After N blocks the cache holds blocks 0..N-2 with weights gamma^age:
    # total count L (1 - gamma^(N-1)) / (1 - gamma), below L / (1 - gamma).
    n = T // L
    total = np.asarray(s_whole.cache_count).sum(axis=-1)  # [B, H]
    np.testing.assert_allclose(
        total, L * (1 - decay ** (n - 1)) / (1 - decay), rtol=1e-6
    )


def test_model_with_decayed_cache_streams_exactly(getkey):
    cfg = tvq_eqx.TransformerConfig(
        n_vocab=16, d_model=16, d_k=8, d_v=8, n_head=1, n_code=4, n_layer=1,
        block_len=4, cache_decay=0.8,
    )  # fmt: skip
    model = tvq_eqx.Transformer(cfg, key=getkey())
    tokens = jax.random.randint(getkey(), (2, 32), 0, 16)
    forward = jax.jit(lambda m, x, s: m(x, s)[:2])
    whole, _ = forward(model, tokens, model.init_state(2))
    first, state = forward(model, tokens[:, :16], model.init_state(2))
    second, _ = forward(model, tokens[:, 16:], state)
    np.testing.assert_allclose(
        jnp.concatenate([first, second], axis=1), whole, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, float("nan"), True, "0.9", None])
def test_bad_cache_decay_is_named(getkey, bad):
    q, k, v, codebook = _inputs(getkey)
    with user_call(), pytest.raises(ValueError, match="cache_decay"):
        vq_attention(q, k, v, codebook, block_len=L, cache_decay=bad)
    with user_call(), pytest.raises(ValueError, match="cache_decay"):
        tvq_eqx.TransformerConfig(cache_decay=bad)


def test_config_cache_decay_rules():
    with user_call():
        cfg = tvq_eqx.TransformerConfig(cache_decay=np.float32(0.5))
    assert cfg.cache_decay == 0.5 and type(cfg.cache_decay) is float
    with pytest.raises(ValueError, match="cache_decay.*attention='window'"):
        tvq_eqx.TransformerConfig(cache_decay=0.9, attention="window")
    assert tvq_eqx.TransformerConfig(attention="window").cache_decay == 1.0
