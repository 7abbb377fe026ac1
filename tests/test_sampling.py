"""Generation with the carried state (tvq_eqx.sampling)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import sampling_config

import tvq_eqx
from tvq_eqx.sampling import sample, sample_token

CFG = sampling_config()


@pytest.mark.parametrize("prompt_shape", [(1,), (2, 11)])
def test_greedy_equals_teacher_forced_argmax(prompt_shape, getkey):
    """Greedy tokens == argmax of one full forward pass over the generated
    text, across several block boundaries (so the carried state is exact).
    A 1-D prompt gives 1-D output."""
    model = tvq_eqx.Transformer(CFG, key=getkey())
    prompt = jax.random.randint(getkey(), prompt_shape, 0, 16)
    steps = 29
    out = sample(model, prompt, steps=steps, key=getkey(), temperature=0.0)
    assert out.shape == prompt_shape[:-1] + (steps,) and out.dtype == jnp.int32
    prompt, out = jnp.atleast_2d(prompt), jnp.atleast_2d(out)
    full = jnp.concatenate([prompt, out], axis=1)
    b, t = full.shape
    padded = jnp.pad(full, ((0, 0), (0, -t % 8)))
    logp, _, _ = model(padded, model.init_state(b))
    pred = jnp.argmax(logp, axis=-1)[:, prompt.shape[1] - 1 : t - 1]
    np.testing.assert_array_equal(pred, out)


def test_sampling_is_deterministic_per_key(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    prompt = jax.random.randint(getkey(), (2, 11), 0, 16)  # same shapes: no recompile
    a = sample(model, prompt, steps=29, key=jax.random.key(7), top_p=0.9)
    b = sample(model, prompt, steps=29, key=jax.random.key(7), top_p=0.9)
    c = sample(model, prompt, steps=29, key=jax.random.key(8), top_p=0.9)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert sample(model, jnp.array([1]), steps=0, key=getkey()).shape == (0,)


def _draws(logits, n, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    toks = jax.vmap(lambda k: sample_token(lp, k, **kw))(keys)
    return np.bincount(np.asarray(toks), minlength=len(logits)) / n


def test_top_p_keeps_the_nucleus_only():
    p = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(p)
    freq = _draws(logits, 4000, top_p=0.7)  # 0.5 then 0.3 reach 0.7
    assert freq[0] == 0 and freq[2] == 0
    np.testing.assert_allclose(freq[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
    freq = _draws(logits, 4000, top_p=0.85)
    assert freq[0] == 0 and freq[2] > 0.1
    freq = _draws(logits, 4000, top_p=1e-6)  # only the most likely token
    np.testing.assert_array_equal(freq, [0, 1, 0, 0])
    freq = _draws(logits, 6000, top_p=1.0)
    np.testing.assert_allclose(freq, p, atol=0.025)


def test_top_k_keeps_the_k_most_likely_and_combines_with_top_p():
    p = np.array([0.05, 0.5, 0.15, 0.3])
    logits = np.log(p)
    freq = _draws(logits, 4000, top_k=2)  # 0.5 and 0.3, renormalised
    assert freq[0] == 0 and freq[2] == 0
    np.testing.assert_allclose(freq[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
    np.testing.assert_array_equal(_draws(logits, 50, top_k=1), [0, 1, 0, 0])
    # top_k >= vocab changes nothing: the same draws as without it.
    np.testing.assert_array_equal(_draws(logits, 500, top_k=9), _draws(logits, 500))
    # Both filters: top_k=3 keeps 0.5, 0.3, 0.15; top_p=0.7 of those 0.5, 0.3.
    freq = _draws(logits, 2000, top_k=3, top_p=0.7)
    assert freq[0] == 0 and freq[2] == 0
    # Traced (one program for every k): k <= 0 is off.
    lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))
    draw = jax.jit(lambda k, top_k: sample_token(lp, k, top_k=top_k))
    keys = jax.random.split(jax.random.key(1), 300)
    one = {int(draw(k, jnp.int32(1))) for k in keys}
    off = {int(draw(k, jnp.int32(0))) for k in keys}
    assert one == {1} and off == {0, 1, 2, 3}


def test_sample_top_k_one_is_greedy(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    prompt = jax.random.randint(getkey(), (2, 11), 0, 16)
    greedy = sample(model, prompt, steps=13, key=getkey(), temperature=0.0)
    top1 = sample(model, prompt, steps=13, key=getkey(), top_k=1)
    np.testing.assert_array_equal(top1, greedy)
    for bad in (0, -2, True):
        with pytest.raises(ValueError, match="top_k must be None or an int >= 1"):
            sample(model, prompt, steps=3, key=getkey(), top_k=bad)
    # A float: the annotation's checker (in tests) or the same ValueError.
    with pytest.raises((TypeError, ValueError), match="top_k"):
        sample(model, prompt, steps=3, key=getkey(), top_k=1.5)  # pyright: ignore[reportArgumentType]


def test_temperature_sharpens_and_flattens():
    p = np.array([0.6, 0.3, 0.1])
    logits = np.log(p)
    for temp in (0.5, 2.0):
        want = np.exp(logits / temp) / np.exp(logits / temp).sum()
        np.testing.assert_allclose(
            _draws(logits, 6000, temperature=temp), want, atol=0.025
        )
    np.testing.assert_array_equal(_draws(logits, 50, temperature=0.0), [1, 0, 0])


def test_bad_arguments(getkey):
    model = tvq_eqx.Transformer(CFG, key=getkey())
    with pytest.raises(ValueError, match="length >= 1"):
        sample(model, jnp.zeros((2, 0), jnp.int32), steps=3, key=getkey())
    with pytest.raises(ValueError, match="top_p"):
        sample(model, jnp.array([1]), steps=3, key=getkey(), top_p=0.0)
    with pytest.raises(ValueError, match="steps"):
        sample(model, jnp.array([1]), steps=-1, key=getkey())


def test_decode_step_scanned_is_sample(getkey):
    """`decode_step` scanned from the prompt's carry gives `sample`'s tokens,
    and its log-probabilities equal a teacher-forced forward pass."""
    from tvq_eqx.sampling import DecodeCarry, decode_step

    model = tvq_eqx.Transformer(CFG, key=getkey())
    prompt = jax.random.randint(getkey(), (2, 1), 0, 16)
    key = getkey()
    steps = 12  # crosses a block boundary (block_len 8)
    want = sample(model, prompt, steps=steps, key=key, temperature=0.7, top_p=0.9)
    block = jnp.zeros((2, 8), jnp.int32).at[:, 0].set(prompt[:, 0])
    carry = DecodeCarry(model.init_state(2), block, jnp.int32(0))
    # One compile for every step (eagerly, each op inside would dispatch
    # on its own: minutes of the suite).
    step = eqx.filter_jit(
        lambda m, c, k: decode_step(m, c, k, temperature=0.7, top_p=0.9)
    )
    toks, lps = [], []
    for k in jax.random.split(key, steps):
        carry, tok, lp = step(model, carry, k)
        toks.append(tok)
        lps.append(lp)
    got = jnp.stack(toks, axis=1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    text = jnp.pad(jnp.concatenate([prompt, got], axis=1), ((0, 0), (0, 3)))  # 16
    ref, _, _ = model(text, model.init_state(2))
    np.testing.assert_allclose(
        np.asarray(jnp.stack(lps, axis=1)), np.asarray(ref[:, :steps]), atol=1e-4
    )
