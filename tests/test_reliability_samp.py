"""Reliability of generation and of the optimizer seen from user code (issue 11):
valid inputs accepted, bad ones named, bucketed compilation, bounded and
interruptible long generation, the EMA codebook in hand-written optax loops."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq_eqx
from tvq_eqx import sampling
from tvq_eqx.sampling import (
    DecodeCarry,
    SampleInterrupted,
    decode_step,
    sample,
    sample_iter,
    sample_token,
)

# The config of tests/test_sampling.py: same shapes, so compiled programs are
# shared when both files run in one process.
CFG = tvq_eqx.TransformerConfig(
    n_vocab=16,
    d_model=32,
    d_k=8,
    d_v=16,
    n_head=1,
    n_code=4,
    n_layer=1,
    block_len=8,
    abs_pe=True,
)


@pytest.fixture(scope="module")
def model():
    return tvq_eqx.Transformer(CFG, key=jax.random.key(0))


@eqx.filter_jit
def _model_call(model, tokens, state):
    return model(tokens, state)[1]


@eqx.filter_jit
def _reference_step(model, carry, key, i, temperature, top_p):
    return decode_step(
        model,
        carry,
        jax.random.fold_in(key, i),
        temperature=temperature,
        top_p=top_p,
    )[:2]


def _reference(model, prompt, steps, key, temperature, top_p):
    """The unbucketed semantics, written plainly: the prompt's complete blocks
    before the one holding its last token in one model call, that last block
    as the current block, then `decode_step` token by token."""
    prompt = jnp.asarray(prompt, jnp.int32)
    b, p = prompt.shape
    big_l = CFG.block_len
    n_full = (p - 1) // big_l
    state = model.init_state(b)
    if n_full:
        state = _model_call(model, prompt[:, : n_full * big_l], state)
    tail = prompt[:, n_full * big_l :]
    block = jnp.zeros((b, big_l), jnp.int32).at[:, : tail.shape[1]].set(tail)
    carry = DecodeCarry(state, block, jnp.int32(tail.shape[1] - 1))
    toks = []
    t, tp = jnp.float32(temperature), jnp.float32(top_p)
    for i in range(steps):
        carry, tok = _reference_step(model, carry, key, jnp.uint32(i), t, tp)
        toks.append(tok)
    return np.stack(toks, axis=1)


def test_bucketed_sample_equals_reference_and_reuses_compilation(model):
    """Two prompt lengths in one bucket (2 blocks) and two step counts in one
    bucket (32) compile once each, and give the reference decode's tokens."""
    key = jax.random.key(3)
    long_prompt = jax.random.randint(jax.random.key(1), (2, 13), 0, 16)
    prefill0 = sampling._prefill._cached._cache_size()
    decode0 = sampling._decode_chunk._cached._cache_size()
    for p, steps in ((9, 20), (13, 29)):
        got = sample(model, long_prompt[:, :p], steps=steps, key=key, top_p=0.9)
        want = _reference(model, long_prompt[:, :p], steps, key, 1.0, 0.9)
        np.testing.assert_array_equal(np.asarray(got), want)
    assert sampling._prefill._cached._cache_size() - prefill0 == 1
    assert sampling._decode_chunk._cached._cache_size() - decode0 == 1


def test_uint8_prompt_samples_as_int32_and_wide_ids_cannot_wrap(model):
    """`load_bytes` gives uint8: ids up to 255 are read as such (not wrapped),
    so a valid uint8 / int8 prompt samples exactly as its int32 copy; ids out
    of range are named in their own dtype, never wrapped into range."""
    ids = np.array([[3, 15, 0, 7, 9], [1, 2, 14, 15, 4]])
    key = jax.random.key(5)
    want = sample(model, ids.astype(np.int32), steps=20, key=key, top_p=0.9)
    for dtype in (np.uint8, np.int8, np.uint16, np.int64):
        got = sample(model, ids.astype(dtype), steps=20, key=key, top_p=0.9)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    bad = {
        "uint8 255": np.array([1, 255], np.uint8),
        "uint8 16": np.array([16], np.uint8),
        "int8 -1": np.array([3, -1], np.int8),
        "uint32 2**32-1": np.array([2**32 - 1], np.uint32),
        "int64 2**32+3 (wraps to 3 in int32)": np.array([2**32 + 3], np.int64),
    }
    for prompt in bad.values():
        with pytest.raises(
            ValueError, match=r"prompt token ids must be in \[0, n_vocab=16\)"
        ):
            sample(model, prompt, steps=1, key=key)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
        (dict(top_p=float("nan")), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(steps=-1), "steps must be an int >= 0"),
        (dict(chunk_len=0), "chunk_len must be an int >= 1"),
        (dict(prompt=np.zeros((0, 3), np.int32)), "prompt must be"),
        (dict(prompt=np.zeros((1, 1, 3), np.int32)), "prompt must be"),
    ],
)
def test_bad_sampling_arguments_are_named(model, kwargs, match):
    """Bad values raise before anything runs (a NaN temperature used to emit
    NUL bytes), naming the argument; the stream checks eagerly too."""
    args = dict(prompt=np.array([1, 2]), steps=3, key=jax.random.key(0)) | kwargs
    prompt = args.pop("prompt")
    with pytest.raises(ValueError, match=match):
        sample(model, prompt, **args)
    with pytest.raises(ValueError, match=match):
        sample_iter(model, prompt, **args)  # raises before the first next()


def test_bad_sampling_argument_types_are_named(model):
    """Type checks of our own (they hold without jaxtyping/beartype, which
    the test suite turns on, so these call the checkers directly)."""
    from tvq_eqx.sampling import (
        _check_key,
        _check_prompt,
        _check_steps,
        _check_temperature,
    )

    for bad in ("1.0", True, np.ones(2), 1j):
        with pytest.raises(TypeError, match="temperature must be"):
            _check_temperature(bad)
    assert _check_temperature(np.float32(0.5)) == 0.5 and _check_temperature(2) == 2
    for bad in (2.0, True, "3"):
        with pytest.raises(TypeError, match="steps must be"):
            _check_steps(bad, allow_none=False)
    for bad in (0, jax.random.split(jax.random.key(0), 2), jnp.zeros(3, jnp.uint32)):
        with pytest.raises(TypeError, match="key must be"):
            _check_key(bad)
    with pytest.raises(TypeError, match="prompt must be integer"):
        _check_prompt(model, np.zeros(3, np.float32))


def test_sample_token_rejects_bad_concrete_temperature():
    lp = jax.nn.log_softmax(jnp.arange(4.0))
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(ValueError, match="temperature"):
            sample_token(lp, jax.random.key(0), temperature=t)
    with pytest.raises(ValueError, match="top_p"):
        sample_token(lp, jax.random.key(0), top_p=float("nan"))
    # 0 stays greedy.
    assert int(sample_token(lp, jax.random.key(0), temperature=0.0)) == 3


def test_long_generation_streams_in_bounded_chunks_and_stops_on_ctrl_c(
    model, monkeypatch
):
    """`sample_iter` yields chunks of at most `chunk_len` whose concatenation
    is `sample`'s output; an endless stream (`steps=None`) can be consumed
    lazily; a Ctrl-C between chunks stops `sample` with the tokens so far."""
    prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.uint8)
    key = jax.random.key(11)
    chunks = list(sample_iter(model, prompt, steps=64, key=key, chunk_len=32))
    assert [c.shape for c in chunks] == [(2, 32), (2, 32)]
    whole = sample(model, prompt, steps=64, key=key)
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), np.asarray(whole))
    endless = sample_iter(model, prompt, steps=None, key=key, chunk_len=32)
    np.testing.assert_array_equal(next(endless), np.asarray(whole)[:, :32])
    endless.close()

    real = sampling._decode_chunk
    calls = []

    def interrupted_after_one_chunk(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(sampling, "_decode_chunk", interrupted_after_one_chunk)
    with pytest.raises(SampleInterrupted) as info:
        sample(model, prompt, steps=10**8, key=key, chunk_len=32)
    assert isinstance(info.value, KeyboardInterrupt)
    np.testing.assert_array_equal(info.value.tokens, np.asarray(whole)[:, :32])
