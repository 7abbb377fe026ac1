"""Reliability of generation and of the optimizer seen from user code (issue 11):
valid inputs accepted, bad ones named, bucketed compilation, bounded and
interruptible long generation, the EMA codebook in hand-written optax loops."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _inputs import sampling_config

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

CFG = sampling_config()


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
    """Two prompt lengths in one bucket (one complete block before the
    current one) and two step counts in one bucket (32) share one compiled
    prefill and one compiled decode chunk, and give the reference decode's
    tokens."""
    key = jax.random.key(3)
    long_prompt = jax.random.randint(jax.random.key(1), (2, 13), 0, 16)

    def compiled():
        return (
            sampling._prefill._cached._cache_size(),
            sampling._decode_chunk._cached._cache_size(),
        )

    sizes = []
    for p, steps in ((9, 20), (13, 29)):
        got = sample(model, long_prompt[:, :p], steps=steps, key=key, top_p=0.9)
        sizes.append(compiled())
        want = _reference(model, long_prompt[:, :p], steps, key, 1.0, 0.9)
        np.testing.assert_array_equal(np.asarray(got), want)
    assert sizes[0] == sizes[1]  # the second length compiled nothing new


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
            _check_steps(bad)
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


# ---- the EMA codebook in hand-written optax loops -------------------------


def _codebook_leaves(tree):
    return [
        x
        for u in tree.attention_units()
        for x in (
            u.quantizer.codebook_sum,
            u.quantizer.codebook_count,
            u.quantizer.ema_tally,
        )
    ]


def _fake_grads(params, key):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )


def test_with_ema_codebook_and_split_codebook_train_as_make_optimizer(model):
    """The recipe written by hand around `with_ema_codebook`, and a plain optax
    optimizer on `split_codebook`'s trainable half plus the EMA step applied
    directly, give `make_optimizer`'s parameters (two updates); the codebook
    moves by exactly minus its gradient (the EMA step), unclipped."""
    from tvq_eqx import train

    params = eqx.filter(model, eqx.is_inexact_array)
    grads = [_fake_grads(params, jax.random.key(i)) for i in range(2)]
    kw = dict(learning_rate=1e-2, warmup_steps=0, total_steps=10, weight_decay=0.0)
    schedule = train.lr_schedule(1e-2, 0, 10)

    def adam_recipe():  # make_optimizer's main chain, clip included
        return optax.chain(
            optax.clip_by_global_norm(0.5),
            optax.adam(schedule, b1=0.9, b2=0.98, eps=1e-9),
        )

    @eqx.filter_jit
    def run(opt, p):
        state = opt.init(p)
        for g in grads:
            updates, state = opt.update(g, state, p)
            p = optax.apply_updates(p, updates)
        return p

    want = run(train.make_optimizer(grad_clip=0.5, **kw), params)
    got = run(train.with_ema_codebook(adam_recipe()), params)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(a, b)

    # By hand: the plain optimizer sees only the trainable arrays.
    trainable, codebook = train.split_codebook(params)
    assert all(x is None for x in _codebook_leaves(trainable))
    assert all(x is not None for x in _codebook_leaves(codebook))
    assert len(jax.tree.leaves(codebook)) == len(_codebook_leaves(codebook))

    @eqx.filter_jit
    def by_hand(trainable, codebook):
        plain = adam_recipe()
        state = plain.init(trainable)
        for g in grads:
            g_trainable, g_codebook = train.split_codebook(g)
            updates, state = plain.update(g_trainable, state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            codebook = jax.tree.map(jnp.subtract, codebook, g_codebook)
        return eqx.combine(trainable, codebook)

    with jax.numpy_dtype_promotion("standard"):  # optax mixes dtypes
        manual = by_hand(trainable, codebook)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(manual), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The EMA step is minus the gradient, unclipped (the gradients' global
    # norm is far above the clip).
    for p0, p2, g0, g1 in zip(
        *(_codebook_leaves(t) for t in (params, got, *grads)), strict=True
    ):
        np.testing.assert_allclose(p2, p0 - g0 - g1, rtol=1e-6, atol=1e-6)


def test_wrong_optimizer_compositions_are_loud(model):
    """Chaining a whole-tree transformation before the codebook-routing
    optimizers (which would clip the EMA step) raises and says what to do;
    a plain optimizer behind `guard_no_codebook` refuses the codebook; a
    non-optimizer is named."""
    from tvq_eqx import train

    params = eqx.filter(model, eqx.is_inexact_array)
    for routed in (
        train.make_optimizer(),
        train.with_ema_codebook(optax.adamw(1e-3)),
    ):
        with pytest.raises(train.CodebookRoutingError, match="outermost") as info:
            optax.chain(optax.clip_by_global_norm(1.0), routed)
        assert "with_ema_codebook(optax.chain(" in str(info.value)
        with pytest.raises(train.CodebookRoutingError, match="outermost"):
            optax.chain(routed, optax.scale(0.5))
        routed.init(params)  # used as it should be, it works
    guarded = optax.chain(train.guard_no_codebook(), optax.adamw(1e-3))
    with pytest.raises(train.CodebookRoutingError, match="with_ema_codebook"):
        guarded.init(params)
    trainable, _ = train.split_codebook(params)
    with jax.numpy_dtype_promotion("standard"):
        guarded.init(trainable)  # the trainable half passes the guard


def _readme_loop() -> str:
    """The README's hand-written training loop, as written there."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    section = text.split("## Your own training loop", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_hand_written_loop_moves_codebook_exactly_to_ema_target(model):
    """The README's loop runs as written (clip at 1e-3, far below the
    gradients' norm, inside `with_ema_codebook`): after one step each codebook
    is exactly its EMA target, unclipped, and the other weights moved."""
    rows = jax.random.randint(jax.random.key(2), (8, 17), 0, 16)
    batch = {
        "inputs": rows[:, :-1],
        "targets": rows[:, 1:],
        "loss_mask": jnp.ones((8, 16), jnp.float32),
    }
    code = _readme_loop().replace(
        "clip_by_global_norm(1.0)", "clip_by_global_norm(1e-3)"
    )
    assert "clip_by_global_norm(1e-3)" in code
    scope = {"config": CFG, "batches": [batch]}
    exec(code, scope)
    trained = scope["model"]
    assert np.isfinite(float(scope["loss"]))
    forward = eqx.filter_jit(lambda m, x, s, mask: m(x, s, mask=mask))
    _, _, aux = forward(model, batch["inputs"], model.init_state(8), batch["loss_mask"])
    vq = aux["vq"]
    for i, (before, after) in enumerate(
        zip(model.attention_units(), trained.attention_units(), strict=True)
    ):
        target = before.quantizer.ema_update(vq["code_count"][i], vq["code_key_sum"][i])
        for got, want in (
            (after.quantizer.codebook_sum, target.codebook_sum),
            (after.quantizer.codebook_count, target.codebook_count),
        ):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert float(after.quantizer.ema_tally) == float(target.ema_tally) == 2.0
    assert not np.allclose(trained.embedding.weight, model.embedding.weight)
