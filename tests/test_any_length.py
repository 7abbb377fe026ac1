"""Any sequence length: a segment that is not whole blocks is padded at its
end inside the attention, its padded rows dropped, and the carried state is
that of its real tokens, so streaming goes on from token T.

References: one call on whole blocks (no padding), a hand-padded call whose
padding is masked (padding in front, cut off by a document start, the
positions moved back so the real tokens keep theirs; or padding at the end
with loss_mask 0), and the quadratic definition."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _inputs import attention_inputs, random_state
from conftest import assert_close

import tvq_eqx
from tvq_eqx import train
from tvq_eqx.loss import loss_fn
from tvq_eqx.ops import PallasConfig, VQAttentionState, vq_attention_quadratic

L = 4
SEGMENTS = (5, 3, 7, 1)  # 16 tokens in all: the one call needs no padding
SHAPE = (2, sum(SEGMENTS), 2, 4, 3, 5, L)  # B, T, H, d_k, d_v, codes, L


def _streamed(fn, arrays, state, lengths):
    """`fn` over consecutive segments of the `[B, T, ...]` arrays, the state
    passed along: (outputs concatenated, final state)."""
    outs, i = [], 0
    for n in lengths:
        out, state = fn({k: v[:, i : i + n] for k, v in arrays.items()}, state)
        outs.append(out)
        i += n
    return jnp.concatenate(outs, axis=1), state


def _assert_states_close(ref, got, rtol=1e-5):
    """Equal states: the same lengths, the same real window slots (the last
    `length`; the others are masked), the same cache."""
    np.testing.assert_array_equal(ref.length, got.length)
    m = ref.window_code.shape[1]
    real = np.arange(m)[None, :] >= m - np.asarray(ref.length)[:, None]  # [B, M]
    for field in ("window_code", "window_key", "window_value"):
        a, b = np.asarray(getattr(ref, field)), np.asarray(getattr(got, field))
        np.testing.assert_allclose(a[real], b[real], rtol=rtol, atol=1e-6)
    np.testing.assert_array_equal(ref.cache_count, got.cache_count)
    assert_close(ref.cache_mean, got.cache_mean, rtol, name="cache_mean")


def _history(key, codebook, mem_len):
    """A non-empty history with a window of `mem_len` keys (row 0 whole,
    the others empty) and a partly empty cache; the window's keys are the
    codewords of their codes, as a stream under one codebook carries them
    (after a codebook update, which stored codewords are read directly
    depends on where blocks begin, as it does on mem_len)."""
    h, s, d_k = codebook.shape
    st = random_state(key, (2, 0, h, d_k, 3, s, max(mem_len, 1)))
    code, value = st.window_code[:, :mem_len], st.window_value[:, :mem_len]
    return VQAttentionState(
        window_code=code,
        window_key=codebook[jnp.arange(h), code],
        window_value=value,
        length=jnp.minimum(st.length, mem_len),
        cache_count=st.cache_count,
        cache_mean=st.cache_mean,
    )


# ---- the op ------------------------------------------------------------------


@pytest.mark.parametrize(
    "mem_len, documents", [(L, False), (6, True), (2, False), (0, True)]
)
def test_streamed_odd_segments_equal_one_call(getkey, mem_len, documents):
    """Segments of 5, 3, 7 and 1 tokens (block_len 4) from a non-empty
    history equal one call on the 16 tokens (whole blocks: no padding),
    outputs and state, with the relative bias and any window length."""
    d = attention_inputs(getkey(), SHAPE, rel_len=mem_len)
    q, k, v, c, rq, rt = d.values()
    b = q.shape[0]
    state = _history(getkey(), c, mem_len)
    arrays = dict(q=q, k=k, v=v, rq=rq)
    if documents:
        starts = np.zeros((b, q.shape[1]), bool)
        # In the first segment, mid-block in the 3-token one, mid-segment,
        # and the 1-token last one (its start falls in the new window).
        starts[0, [2, 6, 13, 15]] = True
        starts[1, 8] = True  # at a block boundary
        arrays["docs"] = jnp.asarray(starts)
    bias = {} if mem_len == 0 else {"rel_table": rt}

    def call(a, st):
        return tvq_eqx.vq_attention_with_state(
            a["q"], a["k"], a["v"], c, st, block_len=L, mem_len=mem_len,
            rel_query=a["rq"] if bias else None, doc_starts=a.get("docs"),
            implementation="xla", **bias,
        )  # fmt: skip

    one, one_state = call(arrays, state)
    out, got_state = _streamed(call, arrays, state, SEGMENTS)
    assert out.shape == one.shape
    assert_close(one, out, 1e-5, name="output")
    _assert_states_close(one_state, got_state)
    # And the streamed state goes on like the one call's.
    nxt = {name: x[:, :3] for name, x in arrays.items()}
    assert_close(call(nxt, one_state)[0], call(nxt, got_state)[0], 1e-5, name="next")


def test_odd_length_equals_hand_padded_masked_call(getkey):
    """T = 13 from an empty history: the outputs and state of a call padded
    by hand in front with 3 tokens that a document start cuts off (whole
    blocks, so the unpadded path), and the outputs of a call padded at the
    end (the padded keys come after every real query), exactly."""
    t, pad = 13, 3
    d = attention_inputs(getkey(), (2, t + pad, 2, 4, 3, 5, L))
    q, k, v, c, rq, rt = d.values()
    kw = dict(block_len=L, rel_table=rt, implementation="xla")
    out, state = tvq_eqx.vq_attention_with_state(
        q[:, pad:], k[:, pad:], v[:, pad:], c, None, rel_query=rq[:, pad:], **kw
    )
    starts = jnp.zeros((2, t + pad), bool).at[:, pad].set(True)
    ref, ref_state = tvq_eqx.vq_attention_with_state(
        q, k, v, c, None, rel_query=rq, doc_starts=starts, **kw
    )
    assert_close(ref[:, pad:], out, 1e-5, name="output")
    _assert_states_close(ref_state, state)
    widths = [(0, 0), (0, pad), (0, 0), (0, 0)]
    end, _ = tvq_eqx.vq_attention_with_state(
        *(jnp.pad(x[:, pad:], widths) for x in (q, k, v)), c, None,
        rel_query=jnp.pad(rq[:, pad:], widths), **kw,
    )  # fmt: skip
    np.testing.assert_array_equal(end[:, :t], out)


@pytest.mark.parametrize("t", [1, 6, 13])
def test_odd_length_matches_quadratic_definition(getkey, t):
    """The linear form at a length that is not whole blocks equals the O(T^2)
    definition: the stateless op, the streaming op with the relative bias,
    and with packed documents."""
    d = attention_inputs(getkey(), (2, t, 2, 4, 3, 5, L))
    q, k, v, c, rq, rt = d.values()
    ref = vq_attention_quadratic(q, k, v, c, scale=0.5, rel_query=rq, rel_table=rt)
    out, _ = tvq_eqx.vq_attention_with_state(
        q, k, v, c, None, block_len=L, scale=0.5, rel_query=rq, rel_table=rt,
        implementation="xla",
    )  # fmt: skip
    assert_close(ref, out, 1e-5, name="with_state")
    starts = jax.random.bernoulli(getkey(), 0.3, (2, t))
    ref = vq_attention_quadratic(q, k, v, c, scale=0.5, doc_starts=starts)
    out = tvq_eqx.vq_attention(
        q, k, v, c, block_len=L, scale=0.5, doc_starts=starts, implementation="xla"
    )
    assert_close(ref, out, 1e-5, name="documents")
    # The stateless op pads any option, a decayed cache included (blocks
    # from the call's start, as the definition's).
    ref = vq_attention_quadratic(q, k, v, c, scale=0.5, cache_decay=0.5, block_len=L)
    out = tvq_eqx.vq_attention(
        q, k, v, c, block_len=L, scale=0.5, cache_decay=0.5, implementation="xla"
    )
    assert_close(ref, out, 1e-5, name="decayed")


def test_odd_length_gradients_equal_end_padded(getkey):
    """Gradients of a loss on the outputs at T = 13 equal those of the call
    padded at the end by hand (the padded rows weigh 0), and are finite;
    through the carried state they equal the streamed segments' (dq, dv,
    the window's keys: the same blocks)."""
    t, pad = 13, 3
    d = attention_inputs(getkey(), (2, t, 2, 4, 3, 5, L))
    q, k, v, c, rq, rt = d.values()
    w = jax.random.normal(getkey(), (2, t, 2, 3))

    def loss(q, k, v, n_pad):
        widths = [(0, 0), (0, n_pad), (0, 0), (0, 0)]
        out, state = tvq_eqx.vq_attention_with_state(
            jnp.pad(q, widths), jnp.pad(k, widths), jnp.pad(v, widths), c, None,
            block_len=L, rel_query=jnp.pad(rq, widths), rel_table=rt,
            implementation="xla",
        )  # fmt: skip
        return jnp.sum(out[:, :t] * w)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    grads, ref = grad(q, k, v, 0), grad(q, k, v, pad)
    for name, g, r in zip("qkv", grads, ref, strict=True):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert_close(r, g, 1e-5, name=f"d{name}")

    def through_state(q, v, lengths):
        # A loss on the outputs and on the carried cache and window.
        def call(a, st):
            return tvq_eqx.vq_attention_with_state(
                a["q"], a["k"], a["v"], c, st, block_len=L, implementation="xla"
            )

        out, st = _streamed(call, dict(q=q, k=k, v=v), None, lengths)
        return jnp.sum(out * w) + jnp.sum(st.cache_mean) + jnp.sum(st.window_value)

    grad = jax.jit(jax.grad(through_state, argnums=(0, 1)), static_argnums=2)
    got, ref = grad(q, v, (13,)), grad(q, v, (5, 3, 5))
    for name, g, r in zip("qv", got, ref, strict=True):
        assert bool(jnp.all(jnp.isfinite(g))), name
        assert_close(r, g, 1e-5, name=f"d{name} through the state")


def test_pallas_kernels_take_odd_lengths(getkey):
    """The kernel form pads before its kernels: streamed odd segments equal
    the xla form's one call (interpret mode on CPU)."""
    d = attention_inputs(getkey(), SHAPE)
    q, k, v, c, rq, rt = d.values()
    cfg = PallasConfig(
        tvq_eqx.ops.BlockSizes(block_q=4, block_k=2, block_code=4, block_v=8),
        interpret=True,
    )
    ref, ref_state = tvq_eqx.vq_attention_with_state(
        q, k, v, c, None, block_len=L, rel_query=rq, rel_table=rt,
        implementation="xla",
    )  # fmt: skip

    def call(a, st):
        return tvq_eqx.vq_attention_with_state(
            a["q"], a["k"], a["v"], c, st, block_len=L, rel_query=a["rq"],
            rel_table=rt, implementation="pallas", pallas=cfg,
            doc_starts=a.get("docs"),
        )  # fmt: skip

    arrays = dict(q=q, k=k, v=v, rq=rq)
    out, state = _streamed(call, arrays, None, (5, 11))
    assert_close(ref, out, 1e-5, name="output")
    _assert_states_close(ref_state, state)
    # A history that begins shorter than a block leaves its window partly
    # filled: the kernels continue it with doc_starts all False (documented).
    arrays["docs"] = jnp.zeros(q.shape[:2], bool)
    out, state = _streamed(call, arrays, None, (3, 13))
    assert_close(ref, out, 1e-5, name="output after a short first segment")
    _assert_states_close(ref_state, state)


def test_whole_blocks_rule_where_the_state_needs_them(getkey):
    """A decayed cache and the block window carry a state that depends on
    where blocks begin: a streaming segment must be whole blocks there (the
    error says why); the sliding window takes any length."""
    d = attention_inputs(getkey(), (1, 6, 1, 4, 3, 5, L))
    q, k, v, c = list(d.values())[:4]
    with pytest.raises(ValueError, match=r"seq length 6 .*block_len=4.*cache_decay"):
        tvq_eqx.vq_attention_with_state(q, k, v, c, None, block_len=L, cache_decay=0.9)
    with pytest.raises(ValueError, match=r"seq length 6 .*block window"):
        tvq_eqx.vq_attention_with_state(
            q, k, v, c, None, block_len=L, use_cache=False, sliding_window=False
        )
    ref = vq_attention_quadratic(q, k, v, c, scale=0.5)
    out, state = tvq_eqx.vq_attention_with_state(
        q, k, v, c, None, block_len=L, scale=0.5, use_cache=False, mem_len=8
    )
    assert_close(ref, out, 1e-5, name="sliding window")
    assert isinstance(state, VQAttentionState) and int(state.length[0]) == 6


# ---- the model and the loss ----------------------------------------------------

CFG = tvq_eqx.TransformerConfig(
    n_vocab=32, d_model=16, d_k=4, d_v=8, n_head=2, n_code=8, n_layer=1,
    block_len=L, abs_pe=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return tvq_eqx.Transformer(CFG, key=jax.random.key(3))


def _tokens(key, b, t):
    return jax.random.randint(key, (b, t), 0, CFG.n_vocab)


def _model_states_close(ref, got, rtol=1e-5):
    assert int(ref.position) == int(got.position)
    for a, b in zip(ref.units(), got.units(), strict=True):
        _assert_states_close(a, b, rtol)


def test_model_streams_odd_segments(model, getkey):
    """The model on segments of 5, 3, 7 and 1 tokens equals one call on the
    16 (absolute positions go on from the real tokens), and the next segment
    too."""
    x = _tokens(getkey(), 2, 16)
    call = eqx.filter_jit(model)
    one, one_state, _ = call(x, None)
    streamed = eqx.filter_jit(
        lambda m, x: _streamed(
            lambda a, st: m(a["x"], st)[:2], dict(x=x), m.init_state(2), SEGMENTS
        )
    )
    out, state = streamed(model, x)
    assert_close(one, out, 1e-5, name="logprobs")
    _model_states_close(one_state, state)
    assert int(state.position) == 16
    nxt = _tokens(getkey(), 2, 6)
    assert_close(call(nxt, one_state)[0], call(nxt, state)[0], 1e-5, name="next")


def test_model_odd_length_equals_hand_padded_masked_call(model, getkey):
    """T = 13: the log-probs and state of the call padded by hand in front,
    its padding cut off by a document start, masked out of the codebook
    statistics and started at position -3 (so real tokens keep their
    positions); the statistics too."""
    t, pad = 13, 3
    x = _tokens(getkey(), 2, t + pad)
    logp, state, aux = eqx.filter_jit(model)(x[:, pad:], None)
    start = model.init_state(2)
    start = eqx.tree_at(lambda s: s.position, start, jnp.array(-pad, jnp.int32))
    mask = jnp.ones((2, t + pad)).at[:, :pad].set(0.0)
    starts = jnp.zeros((2, t + pad), bool).at[:, pad].set(True)
    ref, ref_state, ref_aux = eqx.filter_jit(model)(
        x, start, mask=mask, doc_starts=starts
    )
    assert_close(ref[:, pad:], logp, 1e-5, name="logprobs")
    _model_states_close(ref_state, state)
    for name in ("code_count", "code_key_sum", "commit_sum", "sq_err"):
        assert_close(ref_aux["vq"][name], aux["vq"][name], 1e-5, name=name)


def _batch(x, pad=0):
    """LM batch of `x` [B, T + 1] with `pad` masked positions at its end."""
    inputs, targets = x[:, :-1], x[:, 1:]
    mask = jnp.ones(inputs.shape)
    if pad:
        widths = [(0, 0), (0, pad)]
        inputs, targets = (
            jnp.pad(inputs, widths),
            jnp.pad(targets, widths, constant_values=-1),
        )
        mask = jnp.pad(mask, widths)
    return dict(inputs=inputs, targets=targets, loss_mask=mask)


def test_loss_at_odd_length_equals_masked_padded_batch(model, getkey):
    """loss_fn at T = 13 equals the batch padded by hand to 16 with
    loss_mask 0 on the padding: the same LM sum and tokens, the same codebook
    statistics (the padding counts nowhere), the same gradients of the
    per-token loss; the odd call's state is the real tokens' (the
    continuation equals one call on the whole)."""
    model = model.with_config(lm_loss_average="tokens", c_beta=0.0)
    x = _tokens(getkey(), 2, 14)
    odd, pad = _batch(x), _batch(x, pad=3)
    grad = eqx.filter_jit(eqx.filter_grad(lambda m, b: loss_fn(m, b)[0]))
    metrics = eqx.filter_jit(lambda m, b: loss_fn(m, b)[1]["metrics"])
    m_odd, m_pad = metrics(model, odd), metrics(model, pad)
    for name in ("lm_loss", "lm_loss_sum", "token_count", "codebook_loss"):
        assert_close(m_pad[name], m_odd[name], 1e-5, name=name)
    assert float(m_odd["token_count"]) == 26.0
    g_odd = jax.tree.leaves(grad(model, odd))
    g_pad = jax.tree.leaves(grad(model, pad))
    for a, b in zip(g_pad, g_odd, strict=True):
        assert bool(jnp.all(jnp.isfinite(b)))
        assert_close(a, b, 1e-5, name="grad")
    # The carried state: the 13 tokens' (continuing gives the 16's).
    y = _tokens(getkey(), 2, 17)

    @eqx.filter_jit
    def states(model, y):
        _, aux13 = loss_fn(model, _batch(y[:, :14]))
        _, aux_rest = loss_fn(model, _batch(y[:, 13:]), aux13["state"])
        return loss_fn(model, _batch(y))[1]["state"], aux_rest["state"]

    _model_states_close(*states(model, y))


# ---- runs: RunConfig, the train step, the data stream, the CLI ---------------


def test_run_config_and_train_step_take_any_update_len(getkey):
    """Neither the stream's seq_len nor update_len need be whole blocks
    (rows of 26 tokens, segments of 13, block_len 8); a decayed cache still
    needs them."""
    cfg = tvq_eqx.TransformerConfig(
        n_vocab=256, d_model=16, d_k=4, d_v=8, n_head=2, n_code=8, n_layer=1,
        block_len=8,
    )  # fmt: skip
    data = train.DataConfig(seq_len=26, batch_size=2)
    run = train.RunConfig(model=cfg, data=data, update_len=13, steps=2)
    assert run.updates_per_batch == 2
    with pytest.raises(ValueError, match=r"update_len=13: .*multiple of block_len=8"):
        run.replace(model=cfg.replace(cache_decay=0.5))
    stream = train.make_stream(run, np.arange(400) % 256, train=True)
    batch = next(iter(stream))
    assert batch["inputs"].shape == (2, 26)
    model = tvq_eqx.Transformer(cfg, key=getkey())
    opt = train.make_optimizer(learning_rate=1e-3, warmup_steps=0, total_steps=2)
    ts = train.init_train_state(model, opt, 2, key=getkey())
    ts, metrics = train.train_step(ts, batch, optimizer=opt, update_len=13)
    assert np.isfinite(float(metrics["loss"]))
    assert int(ts.attn_state.position) == 26


@pytest.mark.slow  # a whole run: the train and eval programs compile (~45 s)
def test_cli_trains_with_odd_update_len(tmp_path):
    """`tvq-eqx train` with segments of 20 tokens and block_len 16."""
    from tvq_eqx.cli import main

    argv = [
        "train", "--run-dir", str(tmp_path / "run"),
        "--model.d-model", "16", "--model.d-k", "4", "--model.d-v", "8",
        "--model.n-code", "8", "--model.n-layer", "1", "--model.block-len", "16",
        "--data.seq-len", "40", "--update-len", "20", "--context-len", "40",
        "--data.batch-size", "4",
        "--steps", "2", "--optimizer.warmup-steps", "0", "--eval-every", "0",
        "--eval-batches", "1", "--log-every", "1", "--sample-len", "0",
        "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
