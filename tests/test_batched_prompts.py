"""Prompts of different lengths sampled in one batch, and the one-call
prefill (tvq_eqx.sampling): each row's tokens are its prompt's alone (with
its own key), and the prefill's state is that of reading the prompt's
blocks one call at a time, or in one unpadded call."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tvq_eqx
from tvq_eqx import sampling
from tvq_eqx.sampling import DecodeCarry, decode_step, sample

L = 4
LENGTHS = (1, 6, 11)  # 0, 1 and 2 complete blocks before the current one


def _config(**kw):
    return tvq_eqx.TransformerConfig(
        n_vocab=16, d_model=32, d_k=8, d_v=16, n_head=2, n_code=4, n_layer=1,
        block_len=L, abs_pe=True, **kw,
    )  # fmt: skip


def _model(key, **kw):
    """A model whose absolute positions matter: the learned scale of the
    position embedding starts at 0, so it is set to 1."""
    model = tvq_eqx.Transformer(_config(**kw), key=key)
    pe = model.position_embedding
    assert pe is not None
    return eqx.tree_at(lambda m: m.position_embedding.scale, model, jnp.float32(1.0))


def _prompts(key, lengths=LENGTHS):
    keys = jax.random.split(key, len(lengths))
    return [
        np.asarray(jax.random.randint(k, (n,), 0, 16), np.int32)
        for k, n in zip(keys, lengths, strict=True)
    ]


@pytest.mark.parametrize(
    "options",
    [{}, {"mem_len": 6}, {"attention": "full", "kv_cache_len": 32}],
    ids=["vq", "vq-mem6", "full"],
)
def test_prompts_of_different_lengths_sample_as_each_alone(getkey, options):
    """Rows of lengths 1, 6 and 11 (block_len 4) sampled together give, row by
    row, the tokens of each prompt sampled alone with that row's key (greedy,
    and with temperature, top_k and top_p), over 9 steps that cross block
    boundaries at a different step in each row; the list and the padded
    array with lengths are the same input. `mem_len` 6 leaves window slots
    that the prompt does not fill (and is not a multiple of the block);
    attention "full" prefills block by block."""
    model = _model(getkey(), **options)
    prompts = _prompts(getkey())
    keys = jax.random.split(getkey(), len(prompts))
    padded = np.full((3, max(LENGTHS)), 99, np.int32)  # ids past the ends: unread
    for r, p in enumerate(prompts):
        padded[r, : len(p)] = p
    greedy: dict = dict(temperature=0.0)
    sampled: dict = dict(temperature=0.8, top_k=5, top_p=0.9)
    for filters in (greedy, sampled):
        batch = np.asarray(sample(model, prompts, steps=9, key=keys, **filters))
        assert batch.shape == (3, 9)
        again = sample(model, padded, lengths=LENGTHS, steps=9, key=keys, **filters)
        np.testing.assert_array_equal(np.asarray(again), batch)
        for r, p in enumerate(prompts):
            alone = sample(model, p, steps=9, key=keys[r], **filters)
            np.testing.assert_array_equal(np.asarray(alone), batch[r])


def _first_logprobs(model, carry):
    return decode_step(model, carry, jax.random.key(0), temperature=0.0)[2]


@pytest.mark.parametrize(
    "options",
    [{}, {"mem_len": 6}, {"cache_decay": 0.8}],
    ids=["vq", "vq-mem6", "vq-decay"],
)
def test_one_call_prefill_equals_block_by_block_and_unpadded_call(getkey, options):
    """The prefill's one call over the bucket gives the state (and then the
    first log-probabilities) of reading the blocks one call at a time
    (`_prefill_blocks`) and of one unpadded model call per prompt; the
    padding before the prompt is unread (random ids there change nothing);
    and the one call is not a loop."""
    model = _model(getkey(), **options)
    lengths = np.array([3, 9, 21])  # 0, 2 and 5 complete blocks: bucket 8
    prompts = _prompts(getkey(), tuple(lengths))
    rows = np.zeros((3, 21), np.int32)
    for r, p in enumerate(prompts):
        rows[r, : len(p)] = p
    one = sampling._start(model, rows, lengths)
    loop = sampling._start(model, rows, lengths, prefill=sampling._prefill_blocks)
    np.testing.assert_array_equal(one.block, loop.block)
    np.testing.assert_array_equal(one.position, (lengths - 1) % L)
    np.testing.assert_array_equal(one.state.position, (lengths - 1) // L * L)

    def same_state(a, b, rtol=1e-6):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(
                np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6
            )

    same_state(one.state, loop.state)
    lp_one = _first_logprobs(model, one)
    np.testing.assert_allclose(lp_one, _first_logprobs(model, loop), atol=1e-5)
    forward = eqx.filter_jit(lambda m, x: m(x, None))
    for r, n in enumerate(lengths):
        k = (n - 1) // L * L
        row_state = jax.tree.map(lambda x, r=r: x[:, r : r + 1], one.state.stacked)
        if k:  # one unpadded call over the prompt's complete blocks
            _, want, _ = forward(model, jnp.asarray(rows[r : r + 1, :k]))
            same_state(row_state, want.stacked)
        else:
            same_state(row_state, model.init_state(1).stacked, rtol=0)
        # ... and the whole prompt in one call: its last log-probabilities.
        whole = np.zeros((1, k + L), np.int32)
        whole[0, :n] = rows[r, :n]
        lp, _, _ = forward(model, jnp.asarray(whole))
        np.testing.assert_allclose(lp_one[r], lp[0, n - 1], atol=1e-5)

    # The padding before each prompt is another document: unread.
    n_full = jnp.asarray((lengths - 1) // L, jnp.int32)
    history = np.zeros((3, 8 * L), np.int32)
    for r, n in enumerate(lengths):
        k = (n - 1) // L * L
        history[r, 8 * L - k :] = rows[r, :k]
    noisy = history.copy()
    pad = np.arange(8 * L)[None, :] < (8 * L - np.asarray(n_full)[:, None] * L)
    noisy[pad] = np.asarray(jax.random.randint(getkey(), (int(pad.sum()),), 0, 16))
    assert (noisy != history).any()
    same_state(
        sampling._prefill(model, jnp.asarray(noisy), n_full),
        sampling._prefill(model, jnp.asarray(history), n_full),
        rtol=0,
    )
    # One model call: the block-by-block prefill is a loop, this is not.
    jaxpr = str(jax.make_jaxpr(sampling._prefill)(model, jnp.asarray(history), n_full))
    loop_jaxpr = str(
        jax.make_jaxpr(sampling._prefill_blocks)(model, jnp.asarray(history), n_full)
    )
    assert "while[" in loop_jaxpr and "while[" not in jaxpr


def test_prompts_in_one_bucket_share_the_compiled_prefill(getkey):
    """Prompt lengths with the same power-of-two number of complete blocks
    (here 2 for the longest row) reuse one compiled prefill."""
    model = _model(getkey())
    key = jax.random.split(getkey(), 3)
    sample(model, _prompts(getkey(), (1, 6, 11)), steps=2, key=key)
    size = sampling._prefill._cached._cache_size()
    sample(model, _prompts(getkey(), (2, 12, 5)), steps=2, key=key)
    assert sampling._prefill._cached._cache_size() == size


def test_per_row_position_is_each_row_at_its_own_position(getkey):
    """`TransformerState.position` `[batch]`: row r runs as alone with the
    shared position `position[r]` (abs_pe on), which differs from position 0."""
    model = _model(getkey())
    tokens = jax.random.randint(getkey(), (2, 2 * L), 0, 16)
    state = model.init_state(2)
    per_row = eqx.tree_at(lambda s: s.position, state, jnp.array([0, 12], jnp.int32))
    model_call = eqx.filter_jit(lambda m, x, s: m(x, s)[:2])
    got, after = model_call(model, tokens, per_row)
    np.testing.assert_array_equal(after.position, [2 * L, 12 + 2 * L])
    for r, pos in enumerate((0, 12)):
        alone = eqx.tree_at(lambda s: s.position, model.init_state(1), jnp.int32(pos))
        want, _ = model_call(model, tokens[r : r + 1], alone)
        np.testing.assert_allclose(got[r], want[0], atol=1e-5)
    shared, _ = model_call(model, tokens, state)
    assert float(jnp.max(jnp.abs(shared[1] - got[1]))) > 1e-3  # positions matter
    bad = eqx.tree_at(lambda s: s.position, state, jnp.zeros(3, jnp.int32))
    with pytest.raises(
        ValueError, match=r"state.position must be a scalar or one per row \(2,\)"
    ):
        model(tokens, bad)


def test_bad_prompt_batches_are_named(getkey):
    model = _model(getkey())
    key = jax.random.key(0)
    padded = np.zeros((2, 5), np.int32)
    cases = [
        (dict(prompt=padded, lengths=[3]), r"lengths must be 2 ints"),
        (dict(prompt=padded, lengths=[0, 5]), r"lengths must be in \[1, 5\]"),
        (dict(prompt=padded, lengths=[3, 6]), r"lengths must be in \[1, 5\]"),
        (dict(prompt=padded, lengths=np.array([1.0, 2.0])), "lengths"),
        (dict(prompt=padded[0], lengths=[3]), "lengths needs a padded"),
        (dict(prompt=[padded[0]], lengths=[3]), "a list of prompts gives"),
        (dict(prompt=[]), "at least one prompt"),
        # The annotation's checker (in tests) looks at one item, at random.
        (dict(prompt=[np.array([1]), np.zeros((2, 2), np.int32)]), r"prompt\[1\] must be 1-D|Type-check error"),
        (dict(prompt=[np.array([1]), np.array([], np.int32)]), r"prompt\[1\] must be 1-D"),
        (dict(prompt=[np.array([1]), np.array([3, 16])]), r"prompt\[1\] token ids must be in \[0, n_vocab=16\)"),
        (dict(prompt=np.array([[1, 16, 2]]), lengths=[3]), r"prompt token ids must be in"),
    ]  # fmt: skip
    for kwargs, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            sample(model, steps=2, key=key, **kwargs)
    # Ids after a row's length are not read (any padding value).
    got = sample(
        model, np.array([[1, 2, -1], [3, 4, 5]]), lengths=[2, 3], steps=2, key=key
    )
    assert got.shape == (2, 2)
    # One key per row: as many keys as rows.
    with pytest.raises(
        TypeError, match=r"or one per row \(jax.random.split\(key, 2\)\)"
    ):
        sample(model, padded, steps=2, key=jax.random.split(key, 3))
    # A per-row block position needs per-row absolute positions.
    carry = DecodeCarry(
        model.init_state(2), jnp.zeros((2, L), jnp.int32), jnp.zeros(2, jnp.int32)
    )
    with pytest.raises(ValueError, match="per-row carry.state.position"):
        decode_step(model, carry, key)


def _guide_example() -> str:
    """The batched-prompts example of docs/training.md, as written there."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    section = text.split("**Prompts of different lengths in one batch.**", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_training_guide_example_runs_as_written(getkey):
    """The guide's example: each row is its prompt sampled alone with its
    key, and the padded array with lengths is the same batch."""
    scope = {"model": _model(getkey()), "np": np, "jax": jax, "sample": sample}
    exec(_guide_example(), scope)
    out, prompts, keys = np.asarray(scope["out"]), scope["prompts"], scope["keys"]
    assert out.shape == (3, 9)
    np.testing.assert_array_equal(np.asarray(scope["same"]), out)
    kw: dict = dict(steps=9, temperature=0.8, top_k=5, top_p=0.9)
    for r, p in enumerate(prompts):
        alone = sample(scope["model"], p, key=keys[r], **kw)
        np.testing.assert_array_equal(np.asarray(alone), out[r])


@pytest.mark.parametrize(
    "options",
    [{}, {"mem_len": 6}, {"cache_decay": 0.8}],
    ids=["vq", "vq-mem6", "vq-decay"],
)
def test_chunked_prefill_equals_one_call_and_block_by_block(getkey, options):
    """`prefill_chunk` (tokens per model call while reading the prompt) gives
    the state and first log-probabilities of the one call and of the block
    loop, for rows of 0, 2, 5 and 7 complete blocks (bucket 8 blocks = 32
    tokens) and chunks of 1, 3 (not dividing the bucket: it grows to 36
    tokens) and 4 blocks, and 16 blocks (more than the bucket: the one
    call); random ids in the padding change nothing; `sample` draws the same
    tokens with any chunk (checked for the plain model)."""
    model = _model(getkey(), **options)
    lengths = np.array([3, 9, 21, 30])
    prompts = _prompts(getkey(), tuple(lengths))
    rows = np.zeros((4, 30), np.int32)
    for r, p in enumerate(prompts):
        rows[r, : len(p)] = p
    one = sampling._start(model, rows, lengths)
    loop = sampling._start(model, rows, lengths, prefill=sampling._prefill_blocks)
    lp_one = _first_logprobs(model, one)
    lp_loop = _first_logprobs(model, loop)

    def same_state(a, b, rtol=1e-6):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(
                np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-6
            )

    for chunk in (L, 3 * L, 4 * L, 16 * L):
        got = sampling._start(model, rows, lengths, prefill_chunk=chunk)
        np.testing.assert_array_equal(got.block, one.block)
        np.testing.assert_array_equal(got.position, one.position)
        np.testing.assert_array_equal(got.state.position, one.state.position)
        same_state(got.state, one.state)
        same_state(got.state, loop.state)
        lp = _first_logprobs(model, got)
        np.testing.assert_allclose(lp, lp_one, atol=1e-5)
        np.testing.assert_allclose(lp, lp_loop, atol=1e-5)
    # The padding before each prompt (36 tokens for chunks of 3 blocks) is
    # unread, however the chunks cut it.
    n_full = jnp.asarray((lengths - 1) // L, jnp.int32)
    history = np.zeros((4, 9 * L), np.int32)
    for r, n in enumerate(lengths):
        k = (n - 1) // L * L
        history[r, 9 * L - k :] = rows[r, :k]
    noisy = history.copy()
    pad = np.arange(9 * L)[None, :] < (9 * L - np.asarray(n_full)[:, None] * L)
    noisy[pad] = np.asarray(jax.random.randint(getkey(), (int(pad.sum()),), 0, 16))
    assert (noisy != history).any()
    same_state(
        sampling._prefill_chunks(model, jnp.asarray(noisy), n_full, 3 * L),
        sampling._prefill_chunks(model, jnp.asarray(history), n_full, 3 * L),
        rtol=0,
    )
    if options:
        return
    keys = jax.random.split(getkey(), 4)
    want = np.asarray(sample(model, prompts, steps=6, key=keys, temperature=0.0))
    for chunk in (3 * L,):
        got = sample(
            model, prompts, steps=6, key=keys, temperature=0.0, prefill_chunk=chunk
        )
        np.testing.assert_array_equal(np.asarray(got), want)


def test_chunked_prefill_compiles_once_per_bucket(getkey):
    """Prompts with the same power-of-two number of complete blocks reuse
    one compiled chunked prefill (the chunks are a loop inside it, not one
    program each)."""
    model = _model(getkey())
    key = jax.random.split(getkey(), 3)
    kw: dict = dict(steps=2, key=key, prefill_chunk=2 * L)
    sample(model, _prompts(getkey(), (1, 13, 30)), **kw)  # bucket 8 blocks
    size = sampling._prefill_chunks._cached._cache_size()
    sample(model, _prompts(getkey(), (22, 12, 33)), **kw)
    assert sampling._prefill_chunks._cached._cache_size() == size
    history = jnp.zeros((3, 8 * L), jnp.int32)
    n_full = jnp.array([0, 3, 7], jnp.int32)
    jaxpr = str(
        jax.make_jaxpr(sampling._prefill_chunks, static_argnums=3)(
            model, history, n_full, 2 * L
        )
    )
    assert jaxpr.count("while[") == 1


def test_bad_prefill_chunk_is_named(getkey):
    model = _model(getkey())
    prompt = np.arange(9) % 16
    key = jax.random.key(0)
    for bad, error in [
        (0, ValueError), (-4, ValueError), (6, ValueError), (2, ValueError),
        (8.0, TypeError), (True, TypeError), ("8", TypeError), ("Auto", TypeError),
    ]:  # fmt: skip
        # A non-int is caught first by the annotation's checker in tests.
        message = (
            rf'prefill_chunk must be None, "auto" or a positive multiple of '
            rf"block_len \({L}\); got {bad!r}"
        )
        if error is TypeError:
            message += "|typechecking parameter 'prefill_chunk'"
        with pytest.raises(error, match=message):
            sample(model, prompt, steps=2, key=key, prefill_chunk=bad)
        with pytest.raises(error, match="prefill_chunk"):
            sampling.sample_iter(model, prompt, steps=2, key=key, prefill_chunk=bad)


def test_auto_prefill_chunk_is_the_default_in_whole_blocks(getkey, monkeypatch):
    """The default `prefill_chunk="auto"` is `PREFILL_CHUNK` tokens rounded
    down to whole blocks (at least one), so any block length works; a
    prompt longer than it is read in chunks (the chunked prefill compiles),
    drawing the one call's tokens."""
    auto = sampling._auto_prefill_chunk
    assert auto(4) == sampling.PREFILL_CHUNK == 2048
    assert auto(48) == 42 * 48 and auto(3000) == 3000
    monkeypatch.setattr(sampling, "PREFILL_CHUNK", 3 * L + 1)  # -> 3 blocks
    model = _model(getkey())
    prompts = _prompts(getkey(), (5, 30))
    keys = jax.random.split(getkey(), 2)
    kw: dict = dict(steps=4, key=keys, temperature=0.0)
    before = sampling._prefill_chunks._cached._cache_size()
    got = sample(model, prompts, **kw)
    assert sampling._prefill_chunks._cached._cache_size() == before + 1
    want = sample(model, prompts, prefill_chunk=None, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
